//! The subscription tree (to be written).

/// Placeholder.
pub struct SubscriptionTree;
