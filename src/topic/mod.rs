//! Topic names, topic filters and the subscription tree that matches one against the other.
//!
//! Both newtypes are validated once, when made (MQTT 5.0 §4.7), and hold their text as
//! `Bytes` so a topic decoded from a packet is a slice of the read buffer, not a copy.

mod shared;
mod tree;

use bytes::Bytes;

pub use shared::{parse_shared, GroupKey, SharedFilterError};
pub use tree::{SubscriptionIter, SubscriptionTree};

/// Why a topic name or filter was refused. Carries the rule it breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("not valid UTF-8 [MQTT-1.5.4-1]")]
    InvalidUtf8,
    #[error("contains U+0000 [MQTT-4.7.3-2]")]
    NullCharacter,
    #[error("empty [MQTT-4.7.3-1]")]
    Empty,
    #[error("longer than 65535 bytes [MQTT-4.7.3-3]")]
    TooLong,
    #[error("wildcard character in a topic name [MQTT-3.3.2-2]")]
    WildcardInName,
    #[error("'#' not alone as the last level [MQTT-4.7.1-2]")]
    MisplacedMultiLevelWildcard,
    #[error("'+' not alone in its level [MQTT-4.7.1-3]")]
    MisplacedSingleLevelWildcard,
}

fn validate_text(bytes: &[u8]) -> Result<&str, TopicError> {
    if bytes.len() > u16::MAX as usize {
        return Err(TopicError::TooLong);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| TopicError::InvalidUtf8)?;
    if text.contains('\0') {
        return Err(TopicError::NullCharacter);
    }
    Ok(text)
}

/// A topic a message is published to: no wildcards.
///
/// Invariant: the bytes are valid UTF-8 without U+0000, `+` or `#`. Empty only when made
/// by [`TopicName::new_alias_placeholder`] (a v5 PUBLISH that names its topic by alias).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(Bytes);

impl TopicName {
    pub fn new(bytes: impl Into<Bytes>) -> Result<TopicName, TopicError> {
        let bytes = bytes.into();
        if bytes.is_empty() {
            return Err(TopicError::Empty);
        }
        Self::new_allow_empty(bytes)
    }

    /// As [`TopicName::new`], but an empty name is accepted: the v5 codec uses it for a
    /// PUBLISH that carries a Topic Alias instead of its topic.
    pub fn new_allow_empty(bytes: impl Into<Bytes>) -> Result<TopicName, TopicError> {
        let bytes = bytes.into();
        let text = validate_text(&bytes)?;
        if text.contains(['+', '#']) {
            return Err(TopicError::WildcardInName);
        }
        Ok(TopicName(bytes))
    }

    /// The same name held in `bytes`, a copy of its bytes the caller made (so the copy
    /// need not be validated again).
    pub(crate) fn with_bytes(&self, bytes: Bytes) -> TopicName {
        debug_assert_eq!(bytes, self.0);
        TopicName(bytes)
    }

    /// The empty name of a PUBLISH that names its topic by alias only.
    pub fn empty() -> TopicName {
        TopicName(Bytes::new())
    }

    pub fn from_static(text: &'static str) -> TopicName {
        TopicName(Bytes::from_static(text.as_bytes()))
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor validates UTF-8 (`validate_text`) or takes a `&'static
        // str`, and the bytes are private and never mutated. Re-validating here showed as
        // 2.4% of a QoS 1 profile: the tree walk and every encode call this.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Topics starting with `$` are not matched by filters starting with a wildcard
    /// (MQTT-4.7.2-1).
    pub fn is_dollar(&self) -> bool {
        self.0.first() == Some(&b'$')
    }

    pub fn levels(&self) -> impl Iterator<Item = &str> {
        self.as_str().split('/')
    }
}

/// Lets a map keyed by names be searched with raw bytes (a log record's topic). Equality
/// and hashing are those of the bytes, as derived.
impl std::borrow::Borrow<[u8]> for TopicName {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for TopicName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TopicName({:?})", self.as_str())
    }
}

impl std::fmt::Display for TopicName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A filter a client subscribes with: `+` matches one level, a final `#` the rest.
///
/// Invariant: non-empty, valid UTF-8 without U+0000; each `+` fills a whole level and a
/// `#` only the last level.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter(Bytes);

impl TopicFilter {
    pub fn new(bytes: impl Into<Bytes>) -> Result<TopicFilter, TopicError> {
        let bytes = bytes.into();
        if bytes.is_empty() {
            return Err(TopicError::Empty);
        }
        let text = validate_text(&bytes)?;
        let mut levels = text.split('/').peekable();
        while let Some(level) = levels.next() {
            if level.contains('#') && (level != "#" || levels.peek().is_some()) {
                return Err(TopicError::MisplacedMultiLevelWildcard);
            }
            if level.contains('+') && level != "+" {
                return Err(TopicError::MisplacedSingleLevelWildcard);
            }
        }
        Ok(TopicFilter(bytes))
    }

    pub fn from_static(text: &'static str) -> Result<TopicFilter, TopicError> {
        TopicFilter::new(Bytes::from_static(text.as_bytes()))
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: as for `TopicName::as_str`: validated when made, private, immutable.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn has_wildcards(&self) -> bool {
        self.0.iter().any(|b| *b == b'+' || *b == b'#')
    }

    pub fn levels(&self) -> impl Iterator<Item = &str> {
        self.as_str().split('/')
    }

    /// The same filter in a buffer of its own: a filter decoded from a packet is a slice of
    /// the read buffer, and a long-lived copy (as the subscription tree keeps) would hold
    /// that whole buffer alive.
    pub(crate) fn to_compact(&self) -> TopicFilter {
        TopicFilter(Bytes::copy_from_slice(&self.0))
    }

    /// Whether this filter matches `topic` (MQTT 5.0 §4.7), including the `$` rule.
    /// The reference matcher: the [`SubscriptionTree`] must agree with it.
    pub fn matches(&self, topic: &TopicName) -> bool {
        if topic.is_dollar() && matches!(self.0.first(), Some(b'+') | Some(b'#')) {
            return false;
        }
        let mut filter = self.levels();
        let mut name = topic.levels();
        loop {
            match (filter.next(), name.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(f), Some(n)) if f == n => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl std::fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TopicFilter({:?})", self.as_str())
    }
}

impl std::fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
