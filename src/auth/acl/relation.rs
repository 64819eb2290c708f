//! How two topic filters relate as sets of topics, decided on their levels: whether one
//! covers the other and whether they overlap. A SUBSCRIBE's verdict rests on these.
//!
//! Both take valid filters (`+` alone in its level, `#` only as the last level) and follow
//! [`TopicFilter::matches`](crate::topic::TopicFilter::matches), including its `$` rule: a
//! filter starting with a wildcard matches no topic starting with `$`. They count valid
//! topics only, so not the empty one (MQTT-4.7.3-1), which as levels is one empty level:
//! `/#` matches it, and no other topic of one level.

/// Whether the filter's first level is a wildcard, so it matches no `$` topic.
fn starts_with_wildcard(filter: &str) -> bool {
    filter.starts_with(['+', '#'])
}

/// Whether every topic matched by `filter` is matched by `rule`.
pub(crate) fn covers(rule: &str, filter: &str) -> bool {
    // `filter`'s topics all start with `$` then, and `rule` matches none of them.
    if starts_with_wildcard(rule) && filter.starts_with('$') {
        return false;
    }
    let (mut rule, mut filter) = (rule.split('/'), filter.split('/'));
    let mut depth = 0;
    let mut first_empty = false;
    loop {
        match (rule.next(), filter.next()) {
            // Whatever is left of the filter, including nothing: `a/#` matches `a`.
            (Some("#"), _) => return true,
            (None, None) => return true,
            // A filter's `#` matches the levels before it alone, which `+/#` does not, and
            // two levels more, which `+` does not. The levels before it are no topic at the
            // root, and only the empty one after an empty level.
            (Some("+"), Some("#")) => {
                return rule.next() == Some("#") && (depth == 0 || (depth == 1 && first_empty))
            }
            (Some("+"), Some(level)) => first_empty |= depth == 0 && level.is_empty(),
            (Some(a), Some(b)) if a == b => first_empty |= depth == 0 && b.is_empty(),
            _ => return false,
        }
        depth += 1;
    }
}

/// Whether some topic is matched by both filters.
pub(crate) fn overlaps(a: &str, b: &str) -> bool {
    // A filter starting with a literal `$` level matches only `$` topics, which one
    // starting with a wildcard never matches. Two wildcards can agree on a topic without
    // `$`, so that is the only case the levels below cannot see.
    if (starts_with_wildcard(a) && b.starts_with('$')) || (starts_with_wildcard(b) && a.starts_with('$')) {
        return false;
    }
    let (mut a, mut b) = (a.split('/'), b.split('/'));
    let mut depth = 0;
    let mut first_empty = false;
    loop {
        match (a.next(), b.next()) {
            // The topics both match are the levels so far alone: not the empty topic.
            (Some("#"), None) | (None, Some("#")) | (None, None) => return !(depth == 1 && first_empty),
            // The `#` takes whatever the other has left, at least one level more.
            (Some("#"), Some(_)) | (Some(_), Some("#")) => return true,
            (Some(x), Some(y)) if x == "+" || y == "+" || x == y => {
                first_empty |= depth == 0 && (x.is_empty() || y.is_empty());
            }
            _ => return false,
        }
        depth += 1;
    }
}
