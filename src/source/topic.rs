//! Topic patterns: `terminals/{terminal_id}/telemetry` subscribes as
//! `terminals/+/telemetry` and binds the second level to `terminal_id`.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    /// `{name}`: one level, bound to a column.
    Bind(String),
    /// `+`: one level, not bound.
    Single,
    /// `#`: the rest.
    Multi,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    text: String,
    levels: Vec<Level>,
}

impl TopicPattern {
    pub fn parse(text: &str) -> Result<TopicPattern, String> {
        if text.is_empty() {
            return Err("topic must not be empty".into());
        }
        let parts: Vec<&str> = text.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let level = if *part == "#" {
                if i + 1 != parts.len() {
                    return Err(format!("topic {text:?}: '#' must be the last level"));
                }
                Level::Multi
            } else if *part == "+" {
                Level::Single
            } else if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!("topic {text:?}: invalid binding {part:?}"));
                }
                Level::Bind(name.to_string())
            } else if part.contains(['+', '#', '{', '}']) {
                return Err(format!("topic {text:?}: invalid level {part:?}"));
            } else {
                Level::Literal(part.to_string())
            };
            levels.push(level);
        }
        Ok(TopicPattern {
            text: text.to_string(),
            levels,
        })
    }

    /// The pattern as written (`terminals/{terminal_id}/telemetry`).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The MQTT subscription filter (`terminals/+/telemetry`).
    pub fn filter(&self) -> String {
        self.levels
            .iter()
            .map(|l| match l {
                Level::Literal(s) => s.as_str(),
                Level::Bind(_) | Level::Single => "+",
                Level::Multi => "#",
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// Names of the columns bound by `{name}` levels.
    pub fn bindings(&self) -> impl Iterator<Item = &str> {
        self.levels.iter().filter_map(|l| match l {
            Level::Bind(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// Matches a concrete topic; on a match, calls `bind` for each `{name}` level.
    pub fn matches<'t>(&self, topic: &'t str, mut bind: impl FnMut(&str, &'t str)) -> bool {
        let mut parts = topic.split('/');
        for level in &self.levels {
            match level {
                Level::Multi => return true,
                _ => {
                    let Some(part) = parts.next() else {
                        return false;
                    };
                    match level {
                        Level::Literal(s) if s != part => return false,
                        Level::Bind(name) => bind(name, part),
                        _ => {}
                    }
                }
            }
        }
        parts.next().is_none()
    }

    /// The values bound by a topic, in the order of `bindings()`, or `None` when it does not match.
    pub fn bind<'t>(&self, topic: &'t str) -> Option<Vec<(&str, &'t str)>> {
        let mut out = Vec::new();
        let mut names = self.bindings();
        if self.matches(topic, |_, value| {
            if let Some(name) = names.next() {
                out.push((name, value));
            }
        }) {
            Some(out)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_levels() {
        let p = TopicPattern::parse("terminals/{terminal_id}/telemetry").unwrap();
        assert_eq!(p.filter(), "terminals/+/telemetry");
        assert_eq!(
            p.bind("terminals/T1/telemetry").unwrap(),
            vec![("terminal_id", "T1")]
        );
        assert!(p.bind("terminals/T1/status").is_none());
        assert!(p.bind("terminals/T1/telemetry/x").is_none());
        assert!(p.bind("terminals/telemetry").is_none());
    }

    #[test]
    fn multi_level() {
        let p = TopicPattern::parse("fleet/#").unwrap();
        assert!(p.bind("fleet/a/b/c").is_some());
        assert!(TopicPattern::parse("fleet/#/x").is_err());
        assert!(TopicPattern::parse("a/{bad name}").is_err());
    }
}
