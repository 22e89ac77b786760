//! Who may connect to weir's MQTT server and what they may do there
//! (DESIGN §7 "MQTT server").
//!
//! - With no users file every client is anonymous and may do anything a
//!   client may do: publish and subscribe anywhere but weir's own topics.
//! - With a users file (`mqtt.users_file`), a client logs in with its user
//!   name and password (checked against an argon2id or bcrypt PHC string),
//!   or presents a client certificate signed by `tls_client_ca_file`, whose
//!   subject CN is its user name. Anonymous clients are refused.
//! - Roles: a `terminal` publishes only under `terminals/{its name}/` and
//!   subscribes only to `weir/commands/{its name}/#`; a `reader` subscribes
//!   within `weir/alerts/#` and publishes nothing; an `admin` may do what an
//!   anonymous client may. A certificate's CN that is not in the users file
//!   is a `terminal`: the CA vouched for it.
//! - Always: client ids starting `weir` are weir's, and only weir publishes
//!   under `weir/alerts/` (it does so in-process, never as a client).
//! - Failed logins are counted and limited per address: after
//!   [`FAILURES_PER_WINDOW`] in [`FAILURE_WINDOW`], an address is refused
//!   without a password check until the window ends. Password checks (tens
//!   of milliseconds of CPU each, by design) run on the blocking pool,
//!   [`CONCURRENT_CHECKS`] at a time; a successful login is remembered (as
//!   a SHA-256 of the password, in memory) so that a fleet reconnecting after
//!   a restart does not pay for a hash each.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::source::server::topics;

/// Failed logins an address may have in [`FAILURE_WINDOW`].
pub const FAILURES_PER_WINDOW: u32 = 10;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses whose failures are tracked at most (memory stays bounded
/// whatever an attacker sends; beyond, expired entries go first).
const TRACKED_ADDRESSES: usize = 65_536;
/// Password checks running at once.
pub const CONCURRENT_CHECKS: usize = 2;

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Terminal,
    Reader,
    Admin,
}

/// One `[[user]]` of the users file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    pub name: String,
    /// A PHC string (`$argon2id$...`) or a bcrypt hash (`$2b$...`). None:
    /// the user can only log in with a client certificate.
    #[serde(default)]
    pub password_hash: Option<String>,
    pub role: Role,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    user: Vec<UserEntry>,
}

/// Who a connection is, once it is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// No users file: anyone.
    Anonymous,
    User {
        name: String,
        role: Role,
    },
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No credentials where they are needed.
    NotAuthorized,
    BadCredentials,
    /// Too many failures from this address lately.
    RateLimited,
}

/// Everything the server needs to decide who may connect.
pub struct MqttAuth {
    users: HashMap<String, UserEntry>,
    /// user name -> SHA-256 of the password that last logged in.
    verified: Mutex<HashMap<String, [u8; 32]>>,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    checks: tokio::sync::Semaphore,
}

impl std::fmt::Debug for MqttAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttAuth")
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

/// A user name may not hold topic syntax: it becomes a topic level.
pub fn valid_user_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a user name may not be empty".into());
    }
    if name.len() > 256 {
        return Err("a user name may be at most 256 bytes".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, '/' | '+' | '#' | '\0') || c.is_control())
    {
        return Err(format!(
            "user name {name:?} holds {c:?}, which cannot be part of a topic level"
        ));
    }
    Ok(())
}

impl MqttAuth {
    /// No users: every client is anonymous.
    pub fn open() -> MqttAuth {
        Self::with_users(Vec::new())
    }

    pub fn with_users(users: Vec<UserEntry>) -> MqttAuth {
        MqttAuth {
            users: users.into_iter().map(|u| (u.name.clone(), u)).collect(),
            verified: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            checks: tokio::sync::Semaphore::new(CONCURRENT_CHECKS),
        }
    }

    /// Reads and checks a users file; every problem is named with the file.
    pub fn load(path: &Path) -> Result<MqttAuth, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("mqtt.users_file {}: {e}", path.display()))?;
        let file: UsersFile =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut problems = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, user) in file.user.iter().enumerate() {
            if let Err(e) = valid_user_name(&user.name) {
                problems.push(format!("user[{i}]: {e}"));
            }
            if !seen.insert(user.name.as_str()) {
                problems.push(format!("user[{i}]: {:?} is listed twice", user.name));
            }
            if user.name.starts_with("weir") {
                problems.push(format!(
                    "user[{i}]: names starting \"weir\" are reserved for weir itself"
                ));
            }
            if let Some(hash) = &user.password_hash {
                if let Err(e) = check_hash_format(hash) {
                    problems.push(format!("user[{i}] ({}): {e}", user.name));
                }
            }
        }
        if file.user.is_empty() {
            problems.push("no [[user]] in it: nobody could connect".into());
        }
        if !problems.is_empty() {
            return Err(format!(
                "{}:\n  - {}",
                path.display(),
                problems.join("\n  - ")
            ));
        }
        Ok(Self::with_users(file.user))
    }

    /// True when clients must log in.
    pub fn required(&self) -> bool {
        !self.users.is_empty()
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Decides who a client is. `cert_name` is the CN of a client
    /// certificate the TLS handshake verified.
    pub async fn authenticate(
        &self,
        peer: IpAddr,
        username: Option<&str>,
        password: Option<&[u8]>,
        cert_name: Option<&str>,
    ) -> Result<Identity, Refusal> {
        if !self.required() {
            return Ok(Identity::Anonymous);
        }
        if let Some(cn) = cert_name {
            // The certificate names the client; a user name, if any, must agree.
            if username.is_some_and(|u| !u.is_empty() && u != cn) || valid_user_name(cn).is_err() {
                return Err(self.failed(peer));
            }
            let role = self.users.get(cn).map_or(Role::Terminal, |u| u.role);
            return Ok(Identity::User {
                name: cn.to_string(),
                role,
            });
        }
        let (Some(name), Some(password)) = (username, password) else {
            return Err(Refusal::NotAuthorized);
        };
        if self.limited(peer) {
            return Err(Refusal::RateLimited);
        }
        let Some(user) = self.users.get(name) else {
            // The same work as for a known user, so that a reply's timing
            // does not tell which names exist.
            let _ = self.check_password(None, password).await;
            return Err(self.failed(peer));
        };
        let digest: [u8; 32] = Sha256::digest(password).into();
        let remembered = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .is_some_and(|known| bool::from(known.ct_eq(&digest)));
        if !remembered {
            if !self
                .check_password(user.password_hash.clone(), password)
                .await
            {
                return Err(self.failed(peer));
            }
            self.verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.to_string(), digest);
        }
        Ok(Identity::User {
            name: name.to_string(),
            role: user.role,
        })
    }

    /// Verifies on the blocking pool, a few at a time.
    async fn check_password(&self, hash: Option<String>, password: &[u8]) -> bool {
        let Ok(_permit) = self.checks.acquire().await else {
            return false;
        };
        let password = password.to_vec();
        tokio::task::spawn_blocking(move || match hash {
            Some(hash) => verify_password(&hash, &password),
            None => {
                // A dummy check of the same cost.
                let _ = verify_password(dummy_hash(), &password);
                false
            }
        })
        .await
        .unwrap_or(false)
    }

    fn limited(&self, peer: IpAddr) -> bool {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.get(&peer).is_some_and(|(count, since)| {
            *count >= FAILURES_PER_WINDOW && since.elapsed() < FAILURE_WINDOW
        })
    }

    fn failed(&self, peer: IpAddr) -> Refusal {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= TRACKED_ADDRESSES && !failures.contains_key(&peer) {
            failures.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
            if failures.len() >= TRACKED_ADDRESSES {
                // Untracked; the password checks' concurrency still bounds the cost.
                return Refusal::BadCredentials;
            }
        }
        let entry = failures.entry(peer).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
        Refusal::BadCredentials
    }
}

/// A hash of the same kind and cost as `weir user new` makes, for the
/// check of an unknown user.
fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("not a password").unwrap_or_default())
}

fn check_hash_format(hash: &str) -> Result<(), String> {
    if hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$") {
        return hash
            .parse::<bcrypt::HashParts>()
            .map(|_| ())
            .map_err(|e| format!("password_hash is not a valid bcrypt hash: {e}"));
    }
    let parsed = argon2::PasswordHash::new(hash)
        .map_err(|e| format!("password_hash is not a PHC string: {e}"))?;
    if !parsed.algorithm.as_str().starts_with("argon2") {
        return Err(format!(
            "password_hash uses {}; weir verifies argon2id (and argon2i, argon2d) or bcrypt",
            parsed.algorithm
        ));
    }
    Ok(())
}

/// True when `password` matches the PHC string or bcrypt hash.
pub fn verify_password(hash: &str, password: &[u8]) -> bool {
    use argon2::PasswordVerifier;
    if hash.starts_with("$2") {
        return bcrypt::verify(password, hash).unwrap_or(false);
    }
    match argon2::PasswordHash::new(hash) {
        Ok(parsed) => argon2::Argon2::default()
            .verify_password(password, &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// An argon2id PHC string of `password` with a fresh salt (the crate's
/// default cost: 19 MiB, 2 passes).
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Topics under this prefix are weir's alerts: only weir publishes there.
pub const ALERTS_FILTER: &str = "weir/alerts/#";

/// True for client ids that are weir's own.
pub fn reserved_client_id(client_id: &str) -> bool {
    client_id.starts_with("weir")
}

impl Identity {
    pub fn name(&self) -> Option<&str> {
        match self {
            Identity::Anonymous => None,
            Identity::User { name, .. } => Some(name),
        }
    }

    /// May this client publish to `topic` (a valid topic name)?
    pub fn may_publish(&self, topic: &str) -> bool {
        if topics::matches(ALERTS_FILTER, topic) {
            return false;
        }
        match self {
            Identity::Anonymous
            | Identity::User {
                role: Role::Admin, ..
            } => true,
            Identity::User {
                role: Role::Reader, ..
            } => false,
            Identity::User {
                name,
                role: Role::Terminal,
            } => {
                let mut levels = topic.split('/');
                levels.next() == Some("terminals")
                    && levels.next() == Some(name.as_str())
                    && levels.next().is_some()
            }
        }
    }

    /// May this client subscribe to `filter` (a valid filter, without a
    /// `$share/group/` prefix)? Only when every topic it can match is one
    /// the role may read.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        match self {
            Identity::Anonymous
            | Identity::User {
                role: Role::Admin, ..
            } => true,
            Identity::User {
                role: Role::Reader, ..
            } => filter_within(filter, ALERTS_FILTER),
            Identity::User {
                name,
                role: Role::Terminal,
            } => filter_within(filter, &format!("weir/commands/{name}/#")),
        }
    }
}

/// True when every topic `filter` matches is matched by `allowed`.
pub fn filter_within(filter: &str, allowed: &str) -> bool {
    let mut f = filter.split('/');
    let mut a = allowed.split('/');
    loop {
        match (f.next(), a.next()) {
            (_, Some("#")) => return true,
            (Some("#"), _) => return false,
            (Some(fl), Some("+")) => {
                if fl == "#" {
                    return false;
                }
            }
            (Some(fl), Some(al)) => {
                if fl != al {
                    return false;
                }
            }
            // The filter ends where `allowed` goes on: only `x/#` also
            // matches the parent `x`.
            (None, Some(rest)) => return rest == "#" && a.next().is_none(),
            (Some(_), None) => return false,
            (None, None) => return true,
        }
    }
}

/// Shared with the server's connection tasks.
pub type SharedAuth = Arc<MqttAuth>;

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, role: Role) -> Identity {
        Identity::User {
            name: name.into(),
            role,
        }
    }

    #[test]
    fn a_terminal_publishes_only_as_itself() {
        let t = user("T1", Role::Terminal);
        assert!(t.may_publish("terminals/T1/telemetry"));
        assert!(t.may_publish("terminals/T1/a/b"));
        assert!(!t.may_publish("terminals/T2/telemetry"));
        assert!(!t.may_publish("terminals/T1"));
        assert!(!t.may_publish("terminals/T10/telemetry"));
        assert!(!t.may_publish("weir/alerts/low_battery/T1"));
        assert!(!t.may_publish("weir/commands/T1/reboot"));
        assert!(t.may_subscribe("weir/commands/T1/#"));
        assert!(t.may_subscribe("weir/commands/T1/reboot"));
        assert!(t.may_subscribe("weir/commands/T1/+"));
        assert!(!t.may_subscribe("weir/commands/+/reboot"));
        assert!(!t.may_subscribe("weir/commands/#"));
        assert!(!t.may_subscribe("#"));
        assert!(!t.may_subscribe("terminals/T1/telemetry"));
    }

    #[test]
    fn a_reader_reads_alerts_only_and_nobody_forges_them() {
        let r = user("dash", Role::Reader);
        assert!(r.may_subscribe("weir/alerts/#"));
        assert!(r.may_subscribe("weir/alerts"));
        assert!(r.may_subscribe("weir/alerts/+/T1"));
        assert!(!r.may_subscribe("weir/+/#"));
        assert!(!r.may_subscribe("+/alerts/#"));
        assert!(!r.may_subscribe("terminals/#"));
        assert!(!r.may_publish("weir/alerts/x/y"));
        assert!(!r.may_publish("terminals/dash/telemetry"));
        for who in [Identity::Anonymous, user("ops", Role::Admin)] {
            assert!(!who.may_publish("weir/alerts/low_battery/T1"));
            assert!(!who.may_publish("weir/alerts"));
            assert!(who.may_publish("weir/commands/T1/reboot"));
            assert!(who.may_subscribe("#"));
        }
    }

    #[test]
    fn filter_containment() {
        assert!(filter_within("a/b/c", "a/#"));
        assert!(filter_within("a", "a/#"));
        assert!(!filter_within("a", "a/+"));
        assert!(filter_within("a/x", "a/+"));
        assert!(filter_within("a/+", "a/+"));
        assert!(!filter_within("a/#", "a/+"));
        assert!(!filter_within("a/x/y", "a/+"));
        assert!(!filter_within("+", "a"));
        assert!(filter_within("a", "a"));
        assert!(!filter_within("a/b", "a"));
        assert!(filter_within("#", "#"));
    }

    #[test]
    fn user_names_cannot_hold_topic_syntax() {
        assert!(valid_user_name("T00042").is_ok());
        for bad in ["", "a/b", "+", "#", "a\0b", "a\nb"] {
            assert!(valid_user_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn argon2_and_bcrypt_hashes_verify() {
        let hash = hash_password("s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(check_hash_format(&hash).is_ok());
        assert!(verify_password(&hash, b"s3cret"));
        assert!(!verify_password(&hash, b"s3cret "));
        let b = bcrypt::hash("s3cret", 4).unwrap();
        assert!(check_hash_format(&b).is_ok());
        assert!(verify_password(&b, b"s3cret"));
        assert!(!verify_password(&b, b"wrong"));
        assert!(check_hash_format("plaintext").is_err());
        assert!(check_hash_format("$pbkdf2-sha256$i=1000$c2FsdA$aGFzaA").is_err());
        assert!(!verify_password("garbage", b"x"));
    }

    #[tokio::test]
    async fn logins_are_checked_remembered_and_limited() {
        let auth = MqttAuth::with_users(vec![
            UserEntry {
                name: "T1".into(),
                password_hash: Some(hash_password("pw1").unwrap()),
                role: Role::Terminal,
            },
            UserEntry {
                name: "certonly".into(),
                password_hash: None,
                role: Role::Reader,
            },
        ]);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(
            auth.authenticate(ip, Some("T1"), Some(b"pw1"), None).await,
            Ok(user("T1", Role::Terminal))
        );
        // remembered, and still checked
        assert_eq!(
            auth.authenticate(ip, Some("T1"), Some(b"pw1"), None).await,
            Ok(user("T1", Role::Terminal))
        );
        assert_eq!(
            auth.authenticate(ip, Some("T1"), Some(b"pw2"), None).await,
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            auth.authenticate(ip, None, None, None).await,
            Err(Refusal::NotAuthorized)
        );
        assert_eq!(
            auth.authenticate(ip, Some("certonly"), Some(b""), None)
                .await,
            Err(Refusal::BadCredentials)
        );
        // a certificate names the client; its CN need not be listed
        assert_eq!(
            auth.authenticate(ip, None, None, Some("certonly")).await,
            Ok(user("certonly", Role::Reader))
        );
        assert_eq!(
            auth.authenticate(ip, None, None, Some("T77")).await,
            Ok(user("T77", Role::Terminal))
        );
        assert_eq!(
            auth.authenticate(ip, Some("T1"), None, Some("T77")).await,
            Err(Refusal::BadCredentials)
        );
        // failures from one address lock that address out, not others
        for _ in 0..FAILURES_PER_WINDOW {
            let _ = auth
                .authenticate(ip, Some("nobody"), Some(b"x"), None)
                .await;
        }
        assert_eq!(
            auth.authenticate(ip, Some("T1"), Some(b"pw1"), None).await,
            Err(Refusal::RateLimited)
        );
        assert_eq!(
            auth.authenticate(other, Some("T1"), Some(b"pw1"), None)
                .await,
            Ok(user("T1", Role::Terminal))
        );
        assert_eq!(
            MqttAuth::open().authenticate(ip, None, None, None).await,
            Ok(Identity::Anonymous)
        );
    }
}
