//! Alerts as stored, served and notified (DESIGN §5).
//!
//! An alert's id is 16 bytes, shown as 32 hex digits: the event time it
//! opened at (big-endian, sign bit flipped, so ids sort by opening time) and
//! an XXH3 of its rule and key. The same transition always gets the same id,
//! so a replay after a crash rewrites an alert instead of adding one.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Change, Severity, Transition};
use crate::obs::format_time;
use crate::window::Millis;

pub type AlertId = [u8; 16];

pub fn alert_id(rule: &str, key: &str, opened_at: Millis) -> AlertId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&crate::window::operator::time_key(opened_at));
    let mut hashed = Vec::with_capacity(rule.len() + key.len() + 1);
    hashed.extend_from_slice(rule.as_bytes());
    hashed.push(0);
    hashed.extend_from_slice(key.as_bytes());
    id[8..].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(&hashed).to_be_bytes());
    id
}

pub fn id_text(id: &AlertId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses the 32 hex digits of an id.
pub fn parse_id(text: &str) -> Option<AlertId> {
    if text.len() != 32 || !text.is_ascii() {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(id)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Firing,
    Resolved,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Firing => "firing",
            AlertState::Resolved => "resolved",
        }
    }
}

/// One alert: an episode of one rule for one key. Times are epoch ms;
/// `opened_at` and `resolved_at` are event times, `acked_at` wall time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub id: String,
    pub rule: String,
    pub key: String,
    pub severity: Severity,
    pub state: AlertState,
    pub opened_at: Millis,
    pub resolved_at: Option<Millis>,
    pub acked: bool,
    pub acked_at: Option<Millis>,
    pub fired_by: Value,
    pub cleared_by: Option<Value>,
}

/// The API's form of an alert, fields in DESIGN §5's order and times as
/// RFC 3339 (a `serde_json::Value` would sort the fields by name).
#[derive(Serialize)]
struct ApiAlert<'a> {
    id: &'a str,
    rule: &'a str,
    key: &'a str,
    severity: Severity,
    state: AlertState,
    opened_at: String,
    resolved_at: Option<String>,
    acked: bool,
    acked_at: Option<String>,
    fired_by: &'a Value,
    cleared_by: &'a Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    history: Option<&'a [Value]>,
}

impl Alert {
    fn api(&self) -> ApiAlert<'_> {
        ApiAlert {
            id: &self.id,
            rule: &self.rule,
            key: &self.key,
            severity: self.severity,
            state: self.state,
            opened_at: format_time(self.opened_at),
            resolved_at: self.resolved_at.map(format_time),
            acked: self.acked,
            acked_at: self.acked_at.map(format_time),
            fired_by: &self.fired_by,
            cleared_by: &self.cleared_by,
            history: None,
        }
    }

    /// The alert as the API returns it (a JSON object text).
    pub fn api_json(&self) -> String {
        serde_json::to_string(&self.api()).unwrap_or_default()
    }

    /// The alert with its history entries.
    pub fn api_json_with_history(&self, history: &[Value]) -> String {
        let mut api = self.api();
        api.history = Some(history);
        serde_json::to_string(&api).unwrap_or_default()
    }
}

/// What happened to an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Opened,
    Resolved,
    Acked,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Opened => "opened",
            ChangeKind::Resolved => "resolved",
            ChangeKind::Acked => "acked",
        }
    }

    /// Orders an alert's history entries of the same time.
    pub fn code(self) -> u8 {
        match self {
            ChangeKind::Opened => 1,
            ChangeKind::Resolved => 2,
            ChangeKind::Acked => 3,
        }
    }
}

/// One entry of an alert's history, and one notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertEvent {
    pub change: ChangeKind,
    /// Event time for opened/resolved, wall time for acked.
    pub at: Millis,
    /// The alert after the change.
    pub alert: Alert,
}

#[derive(Serialize)]
struct ApiEvent<'a> {
    change: ChangeKind,
    at: String,
    alert: ApiAlert<'a>,
}

impl AlertEvent {
    /// `{"change", "at", "alert"}`, as SSE and webhooks carry it.
    pub fn api_json(&self) -> String {
        serde_json::to_string(&ApiEvent {
            change: self.change,
            at: format_time(self.at),
            alert: self.alert.api(),
        })
        .unwrap_or_default()
    }
}

fn parse_row(row: &Option<String>) -> Value {
    row.as_deref()
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or(Value::Null)
}

/// Applies a rule's change to the alert stored under its id (`None` when
/// there is none yet). Returns the alert to store and the event to notify,
/// or `None` when the stored alert already shows this change — a replay.
pub fn apply_change(
    rule: &str,
    severity: Severity,
    change: &Change,
    stored: Option<Alert>,
) -> Option<AlertEvent> {
    let id = id_text(&alert_id(rule, &change.key, change.opened_at));
    match &change.transition {
        Transition::Opened { at, row } => {
            if stored.is_some() {
                return None;
            }
            Some(AlertEvent {
                change: ChangeKind::Opened,
                at: *at,
                alert: Alert {
                    id,
                    rule: rule.to_string(),
                    key: change.key.clone(),
                    severity,
                    state: AlertState::Firing,
                    opened_at: *at,
                    resolved_at: None,
                    acked: false,
                    acked_at: None,
                    fired_by: parse_row(row),
                    cleared_by: None,
                },
            })
        }
        Transition::Resolved { at, row } => {
            let mut alert = stored?;
            if alert.state == AlertState::Resolved {
                return None;
            }
            alert.state = AlertState::Resolved;
            alert.resolved_at = Some(*at);
            alert.cleared_by = Some(parse_row(row));
            Some(AlertEvent {
                change: ChangeKind::Resolved,
                at: *at,
                alert,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_round_trip_and_sort_by_opening_time() {
        let early = alert_id("low_battery", "t-1", -5);
        let late = alert_id("low_battery", "t-1", 1_700_000_000_000);
        assert!(early < late);
        assert_ne!(late, alert_id("low_battery", "t-2", 1_700_000_000_000));
        assert_eq!(parse_id(&id_text(&late)), Some(late));
        assert_eq!(parse_id("not-an-id"), None);
        assert_eq!(parse_id(&"zz".repeat(16)), None);
    }

    #[test]
    fn a_replayed_change_is_recognised() {
        let open = Change {
            key: "t-1".into(),
            opened_at: 10,
            transition: Transition::Opened {
                at: 10,
                row: Some(r#"{"b":3}"#.into()),
            },
        };
        let event = apply_change("r", Severity::Critical, &open, None).unwrap();
        assert_eq!(event.alert.fired_by, json!({"b": 3}));
        assert_eq!(
            apply_change("r", Severity::Critical, &open, Some(event.alert.clone())),
            None
        );
        let mut acked = event.alert.clone();
        acked.acked = true;
        let resolve = Change {
            key: "t-1".into(),
            opened_at: 10,
            transition: Transition::Resolved {
                at: 20,
                row: Some(r#"{"b":50}"#.into()),
            },
        };
        let resolved = apply_change("r", Severity::Critical, &resolve, Some(acked)).unwrap();
        assert_eq!(resolved.alert.state, AlertState::Resolved);
        assert!(resolved.alert.acked, "the ack survives the resolve");
        assert_eq!(
            apply_change("r", Severity::Critical, &resolve, Some(resolved.alert)),
            None
        );
    }
}
