//! Which live engine a group prefers (docs/ha.md, "Which engine owns what"): rendezvous
//! hashing, so that an engine joining or leaving moves only the groups it gains or loses.

/// The engine of `engines` that `group` prefers: the highest BLAKE3 of `group \0 engine`
/// (ties, which need equal hashes, go to the smaller name).
pub fn preferred<'a>(group: &str, engines: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    engines.into_iter().max_by_key(|e| (score(group, e), std::cmp::Reverse(*e)))
}

fn score(group: &str, engine: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(group.as_bytes());
    h.update(&[0]);
    h.update(engine.as_bytes());
    let bytes = h.finalize();
    u64::from_le_bytes(bytes.as_bytes()[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_spread_over_engines_and_a_new_engine_takes_only_its_share() {
        let groups: Vec<String> = (0..600).map(|i| format!("group-{i}")).collect();
        let three = ["a", "b", "c"];
        let owner3: Vec<&str> = groups.iter().map(|g| preferred(g, three).unwrap()).collect();
        for e in three {
            let n = owner3.iter().filter(|o| **o == e).count();
            assert!((150..=250).contains(&n), "engine {e} prefers {n} of 600");
        }
        let four = ["a", "b", "c", "d"];
        let mut moved = 0;
        for (g, before) in groups.iter().zip(&owner3) {
            let after = preferred(g, four).unwrap();
            if after != *before {
                assert_eq!(after, "d", "a group moves only to the new engine");
                moved += 1;
            }
        }
        assert!((100..=200).contains(&moved), "{moved} of 600 moved to the fourth engine");
        assert_eq!(preferred("g", std::iter::empty()), None);
    }
}
