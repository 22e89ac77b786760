//! Topic names, topic filters, and the subscription tree that matches one
//! against the other (MQTT 3.1.1 §4.7, MQTT 5 §4.7–4.8).
//!
//! The tree has one node per filter level, so matching a topic costs its
//! number of levels, not the number of subscriptions: 100 000 terminals each
//! subscribed to `weir/commands/{id}/#` cost one lookup per level. Shared
//! subscriptions (`$share/{group}/{filter}`) sit in the same tree under
//! their filter, with the group kept beside the subscriber.

use std::collections::HashMap;

/// The most levels a topic name or filter may have (EMQX's default
/// `max_topic_levels`). The subscription tree has a node per level and is
/// walked, pruned and dropped recursively: a filter of 65 535 slashes, which
/// fits in one SUBSCRIBE, overflowed a connection task's stack and so
/// aborted weir. No fleet's topics come near it.
pub const MAX_TOPIC_LEVELS: usize = 128;

/// Whether `text` has more than [`MAX_TOPIC_LEVELS`] levels.
fn too_deep(text: &str) -> bool {
    text.bytes().filter(|&b| b == b'/').count() >= MAX_TOPIC_LEVELS
}

/// Why a topic name or filter is refused.
pub fn validate_topic(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        return Err("a topic name must not be empty");
    }
    if too_deep(topic) {
        return Err("a topic name has at most 128 levels");
    }
    if topic.contains(['+', '#']) {
        return Err("a topic name must not contain wildcards");
    }
    if topic.contains('\0') {
        return Err("a topic name must not contain NUL");
    }
    Ok(())
}

/// A filter, split from its share group: `$share/g/a/+` is (`Some("g")`, `a/+`).
pub fn parse_filter(text: &str) -> Result<(Option<&str>, &str), &'static str> {
    let (group, filter) = match text.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((group, filter)) if !group.is_empty() && !group.contains(['+', '#']) => {
                (Some(group), filter)
            }
            _ => return Err("a shared subscription is $share/{group}/{filter}"),
        },
        None => (None, text),
    };
    if filter.is_empty() {
        return Err("a topic filter must not be empty");
    }
    if filter.contains('\0') {
        return Err("a topic filter must not contain NUL");
    }
    if too_deep(filter) {
        return Err("a topic filter has at most 128 levels");
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if *level == "#" {
            if i + 1 != levels.len() {
                return Err("'#' must be the last level of a filter");
            }
        } else if *level != "+" && level.contains(['+', '#']) {
            return Err("a wildcard must fill a whole level");
        }
    }
    Ok((group, filter))
}

/// Whether `topic` matches `filter` (both valid). A topic starting with `$`
/// is not matched by a filter starting with a wildcard.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match level {
            "#" => return true,
            "+" => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            literal => {
                if topic_levels.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    topic_levels.next().is_none()
}

/// The subscription tree: `T` is what a subscription holds (its options).
#[derive(Debug)]
pub struct SubscriptionTree<T> {
    root: Node<T>,
    len: usize,
}

#[derive(Debug)]
struct Node<T> {
    children: HashMap<String, Node<T>>,
    /// Subscriptions whose filter ends at this node, by (client id, share group).
    here: HashMap<(String, Option<String>), T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Self {
            children: HashMap::new(),
            here: HashMap::new(),
        }
    }
}

impl<T> Default for SubscriptionTree<T> {
    fn default() -> Self {
        Self {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<T> SubscriptionTree<T> {
    /// Adds or replaces a subscription; true when it replaced one.
    pub fn insert(&mut self, filter: &str, client: &str, group: Option<&str>, value: T) -> bool {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.to_string()).or_default();
        }
        let replaced = node
            .here
            .insert((client.to_string(), group.map(str::to_string)), value)
            .is_some();
        if !replaced {
            self.len += 1;
        }
        replaced
    }

    /// Removes a subscription; true when there was one.
    pub fn remove(&mut self, filter: &str, client: &str, group: Option<&str>) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = Self::remove_at(&mut self.root, &levels, client, group);
        if removed {
            self.len -= 1;
        }
        removed
    }

    fn remove_at(node: &mut Node<T>, levels: &[&str], client: &str, group: Option<&str>) -> bool {
        let Some((first, rest)) = levels.split_first() else {
            return node
                .here
                .remove(&(client.to_string(), group.map(str::to_string)))
                .is_some();
        };
        let Some(child) = node.children.get_mut(*first) else {
            return false;
        };
        let removed = Self::remove_at(child, rest, client, group);
        if child.children.is_empty() && child.here.is_empty() {
            node.children.remove(*first);
        }
        removed
    }

    /// Calls `f(client, group, value)` for every subscription matching `topic`.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&str, Option<&str>, &T)) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        Self::walk(&self.root, &levels, 0, dollar, &mut f);
    }

    fn walk(
        node: &Node<T>,
        levels: &[&str],
        depth: usize,
        dollar: bool,
        f: &mut impl FnMut(&str, Option<&str>, &T),
    ) {
        // Wildcards at the first level do not match `$` topics.
        let wild = !(dollar && depth == 0);
        if wild {
            if let Some(multi) = node.children.get("#") {
                Self::emit(multi, f);
            }
        }
        let Some((level, rest)) = levels.split_first() else {
            Self::emit(node, f);
            return;
        };
        if let Some(child) = node.children.get(*level) {
            Self::walk(child, rest, depth + 1, dollar, f);
        }
        if wild {
            if let Some(child) = node.children.get("+") {
                Self::walk(child, rest, depth + 1, dollar, f);
            }
        }
    }

    fn emit(node: &Node<T>, f: &mut impl FnMut(&str, Option<&str>, &T)) {
        for ((client, group), value) in &node.here {
            f(client, group.as_deref(), value);
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_as_the_spec_says() {
        let cases = [
            ("a/b", "a/b", true),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/#", "a", true), // '#' includes the parent level
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("+/+", "a/b", true),
            ("+", "/", false),
            ("+/+", "/", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("a/+/c", "a//c", true),
        ];
        for (filter, topic, want) in cases {
            assert_eq!(matches(filter, topic), want, "{filter} vs {topic}");
            let mut tree = SubscriptionTree::default();
            tree.insert(filter, "c", None, ());
            let mut hit = false;
            tree.for_each_match(topic, |_, _, _| hit = true);
            assert_eq!(hit, want, "tree: {filter} vs {topic}");
        }
    }

    #[test]
    fn invalid_filters_and_topics_are_refused() {
        for bad in [
            "",
            "a/#/b",
            "a/b#",
            "a+/b",
            "$share/g",
            "$share//a",
            "$share/g/",
        ] {
            assert!(parse_filter(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_filter("$share/g/a/+"), Ok((Some("g"), "a/+")));
        assert_eq!(parse_filter("a/#"), Ok((None, "a/#")));
        for bad in ["", "a/+", "a/#", "a\0b"] {
            assert!(validate_topic(bad).is_err(), "{bad:?}");
        }
    }

    /// 128 levels are a topic or filter; 129 are not (the tree recurses by
    /// level: a filter of 65 535 slashes once overflowed a task's stack).
    #[test]
    fn topics_and_filters_have_at_most_128_levels() {
        let deepest = vec!["l"; MAX_TOPIC_LEVELS].join("/");
        let deeper = format!("{deepest}/l");
        assert_eq!(parse_filter(&deepest), Ok((None, deepest.as_str())));
        assert!(validate_topic(&deepest).is_ok());
        assert!(parse_filter(&deeper).is_err());
        assert!(parse_filter(&format!("$share/g/{deeper}")).is_err());
        assert!(validate_topic(&deeper).is_err());
        assert!(parse_filter(&"/".repeat(65_535)).is_err());
        assert!(validate_topic(&"/".repeat(65_535)).is_err());
    }

    #[test]
    fn the_tree_finds_every_overlapping_subscription_and_forgets_removed_ones() {
        let mut tree = SubscriptionTree::default();
        tree.insert("a/+/c", "one", None, 1);
        tree.insert("a/#", "one", None, 2);
        tree.insert("a/b/c", "two", None, 0);
        tree.insert("a/b/c", "three", Some("g"), 1);
        assert!(
            tree.insert("a/b/c", "two", None, 2),
            "a second subscribe replaces"
        );
        assert_eq!(tree.len(), 4);
        let mut seen = Vec::new();
        tree.for_each_match("a/b/c", |c, g, v| {
            seen.push((c.to_string(), g.map(str::to_string), *v))
        });
        seen.sort();
        assert_eq!(
            seen,
            vec![
                ("one".into(), None, 1),
                ("one".into(), None, 2),
                ("three".into(), Some("g".into()), 1),
                ("two".into(), None, 2)
            ]
        );
        assert!(tree.remove("a/#", "one", None));
        assert!(!tree.remove("a/#", "one", None));
        assert!(tree.remove("a/b/c", "three", Some("g")));
        let mut n = 0;
        tree.for_each_match("a/b/c", |_, _, _| n += 1);
        assert_eq!((n, tree.len()), (2, 2));
    }
}
