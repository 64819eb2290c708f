//! Shared subscription filters, `$share/{group}/{filter}` (MQTT 5.0 §4.8.2).

use super::TopicFilter;

/// A group and the filter its members share.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    pub group: String,
    pub filter: TopicFilter,
}

/// Why a `$share/` filter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SharedFilterError {
    #[error("shared subscription without a share name or filter [MQTT-4.8.2-1]")]
    Incomplete,
    #[error("share name contains a wildcard [MQTT-4.8.2-2]")]
    WildcardInGroup,
}

/// The group and inner filter of a `$share/{group}/{filter}` filter; `None` when the filter
/// is not shared.
pub fn parse_shared(filter: &TopicFilter) -> Option<Result<GroupKey, SharedFilterError>> {
    let rest = filter.as_str().strip_prefix("$share/")?;
    let Some((group, inner)) = rest.split_once('/') else {
        return Some(Err(SharedFilterError::Incomplete));
    };
    if group.is_empty() || inner.is_empty() {
        return Some(Err(SharedFilterError::Incomplete));
    }
    if group.contains(['+', '#']) {
        return Some(Err(SharedFilterError::WildcardInGroup));
    }
    let inner = bytes::Bytes::copy_from_slice(inner.as_bytes());
    Some(
        TopicFilter::new(inner)
            .map(|filter| GroupKey { group: group.to_string(), filter })
            .map_err(|_| SharedFilterError::Incomplete),
    )
}
