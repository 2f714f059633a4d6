//! Which live engine a group prefers (docs/ha.md, "Which engine owns what"): rendezvous
//! hashing, so that an engine joining or leaving moves only the groups it gains or loses.

/// The engine of `engines` that `group` prefers: the highest BLAKE3 of `group \0 engine`
/// (ties, which need equal hashes, go to the smaller name).
pub fn preferred<'a>(group: &str, engines: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    engines.into_iter().max_by_key(|e| (score(group, e), std::cmp::Reverse(*e)))
}

/// The unit of ownership of each group: groups that share a VM are owned together (an
/// agent has one connection for all its disks), so each group maps to the first name, in
/// order, of the groups it is joined to through shared VMs. `groups` gives each group's VMs.
pub fn units<'a>(groups: impl IntoIterator<Item = (&'a str, Vec<&'a str>)>) -> std::collections::HashMap<String, String> {
    use std::collections::{BTreeMap, BTreeSet};
    let groups: BTreeMap<&str, BTreeSet<&str>> = groups.into_iter().map(|(g, vms)| (g, vms.into_iter().collect())).collect();
    let mut unit: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for &start in groups.keys() {
        if unit.contains_key(start) {
            continue;
        }
        // The groups reachable from `start` through shared VMs; `start` is the first of them
        // in name order, as the keys are visited in order.
        let mut todo = vec![start];
        while let Some(g) = todo.pop() {
            if unit.contains_key(g) {
                continue;
            }
            unit.insert(g.to_owned(), start.to_owned());
            for (&other, vms) in &groups {
                if !unit.contains_key(other) && !vms.is_disjoint(&groups[g]) {
                    todo.push(other);
                }
            }
        }
    }
    unit
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

    #[test]
    fn groups_that_share_a_vm_are_one_unit() {
        let u = units([
            ("erp", vec!["vm1", "vm2"]),
            ("crm", vec!["vm3"]),
            ("hr", vec!["vm2"]),
            ("web", vec!["vm3", "vm4"]),
            ("solo", vec!["vm9"]),
        ]);
        assert_eq!(u["erp"], "erp");
        assert_eq!(u["hr"], "erp", "hr shares vm2 with erp");
        assert_eq!(u["crm"], "crm");
        assert_eq!(u["web"], "crm");
        assert_eq!(u["solo"], "solo");
    }
}
