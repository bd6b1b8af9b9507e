use std::collections::HashMap;

use super::*;

const KEYS: usize = 100_000;

fn names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("node-{i}")).collect()
}

fn keys() -> impl Iterator<Item = String> {
    (0..KEYS).map(|i| format!("user-{i}"))
}

fn owners(ring: &Ring) -> Vec<String> {
    keys()
        .map(|key| {
            ring.owner(key.as_bytes())
                .expect("ring has members")
                .to_owned()
        })
        .collect()
}

#[test]
fn empty_ring_owns_nothing() {
    let ring = Ring::new(Vec::<String>::new(), DEFAULT_VNODES);
    assert!(ring.is_empty());
    assert_eq!(ring.owner(b"user-1"), None);
}

#[test]
fn single_member_owns_every_key() {
    let ring = Ring::new(["solo"], DEFAULT_VNODES);
    assert!(
        keys()
            .take(1000)
            .all(|k| ring.owner(k.as_bytes()) == Some("solo"))
    );
}

#[test]
fn rings_built_from_the_same_members_in_any_order_agree() {
    let forward = Ring::new(names(4), DEFAULT_VNODES);
    let mut reversed = names(4);
    reversed.reverse();
    reversed.push("node-2".to_owned());
    let backward = Ring::new(reversed, DEFAULT_VNODES);
    assert_eq!(forward.members(), backward.members());
    assert_eq!(owners(&forward), owners(&backward));
}

/// With 128 points per member, each of 3 to 5 members owns its fair share of 100k keys to
/// within 25%. The names and keys are fixed, so this is deterministic, not a flaky bound.
#[test]
fn keys_spread_evenly_over_members() {
    // Long names and very short ones alike: names of a few bytes that differ only in their
    // last one once put nearly every key on one member.
    let mut families: Vec<Vec<String>> = (3..=5).map(names).collect();
    for family in [
        &["n01", "n02", "n03"][..],
        &["pga", "pgb", "pgc"],
        &["a", "b", "c", "d"],
        &["n1", "n2"],
    ] {
        families.push(family.iter().map(|n| (*n).to_owned()).collect());
    }
    for family in families {
        let n = family.len();
        let ring = Ring::new(family.clone(), DEFAULT_VNODES);
        let mut counts: HashMap<String, usize> = HashMap::new();
        for owner in owners(&ring) {
            *counts.entry(owner).or_default() += 1;
        }
        assert_eq!(counts.len(), n, "{family:?}: every member owns keys");
        let fair = KEYS as f64 / n as f64;
        for (name, count) in &counts {
            let off = (*count as f64 - fair).abs() / fair;
            assert!(
                off < 0.25,
                "{family:?}: {name} owns {count} keys, {:.1}% off the fair {fair:.0}",
                off * 100.0
            );
        }
    }
}

/// Adding a member moves about 1/(n+1) of the keys, and every moved key moves to it.
#[test]
fn adding_a_member_moves_only_its_share_to_it() {
    for n in 3..=5 {
        let before = owners(&Ring::new(names(n), DEFAULT_VNODES));
        let after = owners(&Ring::new(names(n + 1), DEFAULT_VNODES));
        let newcomer = format!("node-{}", n + 1);

        let moved: Vec<usize> = (0..KEYS).filter(|&i| before[i] != after[i]).collect();
        assert!(
            moved.iter().all(|&i| after[i] == newcomer),
            "a key moved between two members that were both there before"
        );
        let share = moved.len() as f64 / KEYS as f64;
        let expected = 1.0 / (n + 1) as f64;
        assert!(
            (share - expected).abs() / expected < 0.25,
            "adding one to {n} members moved {:.1}% of keys, expected about {:.1}%",
            share * 100.0,
            expected * 100.0
        );
    }
}

/// Removing a member moves exactly its keys, about 1/n of them, and nothing else.
#[test]
fn removing_a_member_moves_only_its_keys() {
    for n in 3..=5 {
        let all = names(n);
        let gone = all[1].clone();
        let before = owners(&Ring::new(all.clone(), DEFAULT_VNODES));
        let after = owners(&Ring::new(
            all.iter().filter(|name| **name != gone).cloned(),
            DEFAULT_VNODES,
        ));

        for i in 0..KEYS {
            if before[i] == gone {
                assert_ne!(after[i], gone);
            } else {
                assert_eq!(before[i], after[i], "a key of a surviving member moved");
            }
        }
        let share = before.iter().filter(|owner| **owner == gone).count() as f64 / KEYS as f64;
        let expected = 1.0 / n as f64;
        assert!(
            (share - expected).abs() / expected < 0.25,
            "removing one of {n} members moved {:.1}% of keys, expected about {:.1}%",
            share * 100.0,
            expected * 100.0
        );
    }
}
