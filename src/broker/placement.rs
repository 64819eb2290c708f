//! Which shard owns a client identifier: a stable hash with fixed seeds, so every shard
//! computes the same owner. Never written to disk; recomputed when `--cores` changes.

const SEEDS: [u64; 4] =
    [0x243f_6a88_85a3_08d3, 0x1319_8a2e_0370_7344, 0xa409_3822_299f_31d0, 0x082e_fa98_ec4e_6c89];

/// The shard in `0..shards` that owns `client_id`.
pub fn owner(client_id: &str, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let hash = ahash::RandomState::with_seeds(SEEDS[0], SEEDS[1], SEEDS[2], SEEDS[3]).hash_one(client_id);
    (hash % shards as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::owner;

    #[test]
    fn owner_is_stable_and_in_range() {
        for shards in 1..8 {
            for i in 0..1000 {
                let id = format!("client-{i}");
                let o = owner(&id, shards);
                assert!(o < shards);
                assert_eq!(o, owner(&id, shards));
            }
        }
    }

    #[test]
    fn owners_spread_over_shards() {
        let mut counts = [0usize; 2];
        for i in 0..1000 {
            counts[owner(&format!("c{i}"), 2)] += 1;
        }
        assert!(counts.iter().all(|c| *c > 400), "{counts:?}");
    }
}
