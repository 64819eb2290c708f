//! A map that keeps its values in one dense array, found through a small index. A hash
//! map holding values inline pays for its empty buckets at the value's size (a table of
//! 9,500 sessions of 288 B sat in 16,384 buckets: 500 B a session); here an empty bucket
//! costs the index's 16 B, and the array grows by a quarter at a time, so a session costs
//! about its own size. Lookups are one probe in the index and one array access.

use ahash::AHashMap;

pub struct DenseMap<V> {
    index: AHashMap<u64, u32>,
    slots: Vec<(u64, V)>,
}

impl<V> Default for DenseMap<V> {
    fn default() -> Self {
        DenseMap { index: AHashMap::new(), slots: Vec::new() }
    }
}

impl<V> DenseMap<V> {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn contains_key(&self, key: &u64) -> bool {
        self.index.contains_key(key)
    }

    pub fn get(&self, key: &u64) -> Option<&V> {
        let slot = *self.index.get(key)? as usize;
        self.slots.get(slot).map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, key: &u64) -> Option<&mut V> {
        let slot = *self.index.get(key)? as usize;
        self.slots.get_mut(slot).map(|(_, v)| v)
    }

    /// Inserts or replaces; returns the value replaced.
    pub fn insert(&mut self, key: u64, value: V) -> Option<V> {
        if let Some(slot) = self.index.get(&key) {
            let old = self.slots.get_mut(*slot as usize)?;
            return Some(std::mem::replace(&mut old.1, value));
        }
        if self.slots.len() == self.slots.capacity() {
            // A quarter more, not double: at most a fifth of the array is spare.
            self.slots.reserve_exact((self.slots.len() / 4).max(16));
        }
        self.index.insert(key, self.slots.len() as u32);
        self.slots.push((key, value));
        None
    }

    /// Removes `key`; the last value takes its place in the array.
    pub fn remove(&mut self, key: &u64) -> Option<V> {
        let slot = self.index.remove(key)? as usize;
        if slot >= self.slots.len() {
            return None;
        }
        let (_, value) = self.slots.swap_remove(slot);
        if let Some((moved, _)) = self.slots.get(slot) {
            self.index.insert(*moved, slot as u32);
        }
        Some(value)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.slots.iter().map(|(_, v)| v)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.slots.iter_mut().map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::DenseMap;

    proptest! {
        /// Behaves as a hash map under any sequence of inserts and removes.
        #[test]
        fn behaves_as_a_map(ops in proptest::collection::vec((any::<bool>(), 0u64..40, any::<u32>()), 0..300)) {
            let mut dense = DenseMap::default();
            let mut model = std::collections::HashMap::new();
            for (insert, key, value) in ops {
                if insert {
                    prop_assert_eq!(dense.insert(key, value), model.insert(key, value));
                } else {
                    prop_assert_eq!(dense.remove(&key), model.remove(&key));
                }
                prop_assert_eq!(dense.len(), model.len());
                for (k, v) in &model {
                    prop_assert_eq!(dense.get(k), Some(v));
                }
                let mut values: Vec<u32> = dense.values().copied().collect();
                let mut expected: Vec<u32> = model.values().copied().collect();
                values.sort_unstable();
                expected.sort_unstable();
                prop_assert_eq!(values, expected);
            }
        }
    }
}
