//! The store suite, written against `&dyn Store` so every backend runs the same checks, and the
//! redb-specific tests (files, locks, damaged rows).

use std::{cell::Cell, path::Path, sync::Arc};

use anyhow::{Context as _, ensure};
use serde_json::json;

use super::{Store, StoreError, open, redb::EVENTS};
use crate::{
    config::{StoreBackend, StoreSection},
    event::{DiffKind, DiffOp, Difference, Event, Outcome, StoredBody, StoredResponse},
};

/// One check of the suite: it gets an empty store and may commit to it.
type Check = fn(&dyn Store) -> anyhow::Result<()>;

/// A suite entry named after its check function.
macro_rules! case {
    ($check:ident, max_events = $max_events:expr) => {
        (stringify!($check), $max_events, $check as Check)
    };
}

/// Every check, with the `max_events` its empty store is opened with.
const SUITE: &[(&str, u64, Check)] = &[
    case!(
        empty_store_has_nothing_and_starts_at_id_one,
        max_events = 100
    ),
    case!(committed_event_reads_back_unchanged, max_events = 100),
    case!(recent_is_newest_first_and_limited, max_events = 100),
    case!(recent_filters_by_route, max_events = 100),
    case!(recent_divergent_only_skips_matched, max_events = 100),
    case!(
        retention_keeps_the_newest_and_ids_keep_growing,
        max_events = 3
    ),
    case!(latest_profile_snapshot_wins, max_events = 100),
];

/// Runs the whole suite; `make(max_events)` must return a new, empty store each call.
fn run_suite(make: impl Fn(u64) -> Arc<dyn Store>) {
    for (name, max_events, check) in SUITE {
        // Printed first so that a failing assertion inside a check shows which one it was.
        eprintln!("store suite: {name}");
        let store = make(*max_events);
        if let Err(error) = check(store.as_ref()) {
            panic!(
                "store suite: {name} failed on {}: {error:#}",
                store.describe()
            );
        }
    }
}

/// Checks that a store opened again at the same place still holds what was committed;
/// `open` opens the same store each call, and the previous one is dropped before the next.
fn run_reopen_check(open: impl Fn() -> Arc<dyn Store>) {
    let events: Vec<Event> = (1..=4)
        .map(|id| event(id, "/users", Outcome::Diverged))
        .collect();
    {
        let store = open();
        store.commit(&events[..2], b"first").unwrap();
        store.commit(&events[2..], b"second").unwrap();
    }

    let store = open();
    assert_eq!(store.len().unwrap(), 4);
    assert_eq!(store.next_id().unwrap(), 5);
    assert_eq!(store.get(3).unwrap().as_ref(), Some(&events[2]));
    assert_eq!(ids(&store.recent(10, None, false).unwrap()), [4, 3, 2, 1]);
    assert_eq!(
        store.load_profile().unwrap().as_deref(),
        Some(&b"second"[..])
    );
}

/// A test event; the outcome decides whether it has a shadow response, differences or an error.
fn event(id: u64, route: &str, outcome: Outcome) -> Event {
    let live = StoredResponse {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: StoredBody::from_bytes(br#"{"ok":true}"#),
        latency_ms: 1.5,
    };
    let (shadow, differences, error) = match outcome {
        Outcome::Matched => (Some(live.clone()), Vec::new(), None),
        Outcome::Diverged => (
            Some(StoredResponse {
                status: 500,
                ..live.clone()
            }),
            vec![Difference {
                kind: DiffKind::Status,
                path: String::new(),
                op: DiffOp::Changed,
                live: Some(json!(200)),
                shadow: Some(json!(500)),
            }],
            None,
        ),
        Outcome::ShadowError => (None, Vec::new(), Some("connection refused".into())),
    };
    Event {
        id,
        time_ms: 1_700_000_000_000 + id,
        node: "test-node".into(),
        outcome,
        method: "GET".into(),
        target: format!("{route}?n={id}"),
        route: route.into(),
        routing_key: None,
        live,
        shadow,
        differences,
        error,
    }
}

fn ids(events: &[Event]) -> Vec<u64> {
    events.iter().map(|event| event.id).collect()
}

fn empty_store_has_nothing_and_starts_at_id_one(store: &dyn Store) -> anyhow::Result<()> {
    ensure!(store.len()? == 0, "len is {}", store.len()?);
    ensure!(store.is_empty()?);
    ensure!(store.next_id()? == 1, "next_id is {}", store.next_id()?);
    ensure!(store.recent(10, None, false)?.is_empty());
    ensure!(store.get(1)?.is_none());
    ensure!(store.load_profile()?.is_none());
    Ok(())
}

fn committed_event_reads_back_unchanged(store: &dyn Store) -> anyhow::Result<()> {
    let diverged = event(1, "/users/{id}", Outcome::Diverged);
    let failed = event(2, "/users/{id}", Outcome::ShadowError);
    store.commit(&[diverged.clone(), failed.clone()], b"profile")?;

    assert_eq!(store.get(1)?, Some(diverged));
    assert_eq!(store.get(2)?, Some(failed));
    assert_eq!(store.get(3)?, None);
    assert_eq!(store.len()?, 2);
    assert_eq!(store.next_id()?, 3);
    Ok(())
}

fn recent_is_newest_first_and_limited(store: &dyn Store) -> anyhow::Result<()> {
    let events: Vec<Event> = (1..=5)
        .map(|id| event(id, "/a", Outcome::Matched))
        .collect();
    store.commit(&events[..3], b"")?;
    store.commit(&events[3..], b"")?;

    assert_eq!(ids(&store.recent(3, None, false)?), [5, 4, 3]);
    assert_eq!(ids(&store.recent(10, None, false)?), [5, 4, 3, 2, 1]);
    assert_eq!(ids(&store.recent(0, None, false)?), Vec::<u64>::new());
    Ok(())
}

fn recent_filters_by_route(store: &dyn Store) -> anyhow::Result<()> {
    let events: Vec<Event> = (1..=6)
        .map(|id| {
            event(
                id,
                if id % 2 == 0 { "/orders" } else { "/users" },
                Outcome::Matched,
            )
        })
        .collect();
    store.commit(&events, b"")?;

    assert_eq!(ids(&store.recent(10, Some("/users"), false)?), [5, 3, 1]);
    assert_eq!(ids(&store.recent(2, Some("/orders"), false)?), [6, 4]);
    assert_eq!(
        ids(&store.recent(10, Some("/nowhere"), false)?),
        Vec::<u64>::new()
    );
    Ok(())
}

fn recent_divergent_only_skips_matched(store: &dyn Store) -> anyhow::Result<()> {
    store.commit(
        &[
            event(1, "/users", Outcome::Diverged),
            event(2, "/users", Outcome::Matched),
            event(3, "/orders", Outcome::ShadowError),
            event(4, "/users", Outcome::Matched),
            event(5, "/users", Outcome::ShadowError),
            event(6, "/orders", Outcome::Matched),
        ],
        b"",
    )?;

    assert_eq!(ids(&store.recent(10, None, true)?), [5, 3, 1]);
    assert_eq!(ids(&store.recent(2, None, true)?), [5, 3]);
    assert_eq!(ids(&store.recent(10, Some("/users"), true)?), [5, 1]);
    Ok(())
}

/// Runs with `max_events` 3.
fn retention_keeps_the_newest_and_ids_keep_growing(store: &dyn Store) -> anyhow::Result<()> {
    let events: Vec<Event> = (1..=12)
        .map(|id| event(id, "/a", Outcome::Diverged))
        .collect();

    store.commit(&events[..2], b"")?;
    store.commit(&events[2..5], b"")?;
    store.commit(&events[5..6], b"")?;
    assert_eq!(store.len()?, 3);
    assert_eq!(ids(&store.recent(10, None, false)?), [6, 5, 4]);
    assert_eq!(store.get(1)?, None);
    assert_eq!(store.get(3)?, None);
    assert_eq!(store.next_id()?, 7);

    // One batch larger than the cap keeps only its own newest events.
    store.commit(&events[6..], b"")?;
    assert_eq!(store.len()?, 3);
    assert_eq!(ids(&store.recent(10, None, false)?), [12, 11, 10]);
    assert_eq!(store.next_id()?, 13);

    // A commit with only a profile snapshot neither evicts nor moves the ids.
    store.commit(&[], b"snapshot")?;
    assert_eq!(store.len()?, 3);
    assert_eq!(store.next_id()?, 13);
    Ok(())
}

fn latest_profile_snapshot_wins(store: &dyn Store) -> anyhow::Result<()> {
    store.commit(&[], b"first")?;
    assert_eq!(store.load_profile()?.as_deref(), Some(&b"first"[..]));
    assert_eq!(store.next_id()?, 1, "a profile-only commit assigns no id");

    let binary = [0_u8, 159, 146, 150, 255];
    store.commit(&[event(1, "/a", Outcome::Matched)], &binary)?;
    assert_eq!(store.load_profile()?.as_deref(), Some(&binary[..]));

    store.commit(&[], b"")?;
    assert_eq!(store.load_profile()?.as_deref(), Some(&b""[..]));
    Ok(())
}

fn redb_section(path: &Path, max_events: u64) -> StoreSection {
    StoreSection {
        backend: StoreBackend::Redb,
        path: path.to_owned(),
        max_events,
    }
}

#[test]
fn redb_passes_the_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    let opened = Cell::new(0);
    run_suite(|max_events| {
        opened.set(opened.get() + 1);
        // A directory that does not exist yet: opening must create it.
        let path = dir
            .path()
            .join(format!("data-{}/specter.redb", opened.get()));
        open(&redb_section(&path, max_events)).unwrap()
    });
}

#[test]
fn redb_keeps_everything_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("specter.redb");
    run_reopen_check(|| open(&redb_section(&path, 100)).unwrap());
}

#[test]
fn redb_describes_itself_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("specter.redb");
    let store = open(&redb_section(&path, 100)).unwrap();
    assert_eq!(store.describe(), format!("redb at {}", path.display()));
}

#[test]
fn redb_open_names_the_path_when_its_directory_cannot_be_created() {
    let dir = tempfile::tempdir().unwrap();

    // A regular file where a directory should be: create_dir_all fails even for root.
    let blocker = dir.path().join("not-a-directory");
    std::fs::write(&blocker, b"").unwrap();
    let path = blocker.join("data/specter.redb");

    let error = open(&redb_section(&path, 100))
        .err()
        .expect("open must fail");
    assert!(matches!(error, StoreError::CreateDir { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("store.path"), "{message}");
}

#[test]
fn redb_second_open_of_the_same_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("specter.redb");
    let _first = open(&redb_section(&path, 100)).unwrap();

    let error = open(&redb_section(&path, 100))
        .err()
        .expect("second open must fail");
    assert!(matches!(error, StoreError::Locked { .. }), "{error:?}");
    assert!(
        error.to_string().contains(&path.display().to_string()),
        "{error}"
    );
}

#[test]
fn redb_skips_an_undecodable_row() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("specter.redb");
    let events: Vec<Event> = (1..=3)
        .map(|id| event(id, "/a", Outcome::Diverged))
        .collect();
    open(&redb_section(&path, 100))?.commit(&events, b"")?;

    // Damage row 2 behind the store's back.
    {
        let db = ::redb::Database::create(&path).context("raw open")?;
        let txn = db.begin_write()?;
        txn.open_table(EVENTS)?.insert(2, &b"{not json"[..])?;
        txn.commit()?;
    }

    let store = open(&redb_section(&path, 100))?;
    assert_eq!(ids(&store.recent(10, None, false)?), [3, 1]);
    assert_eq!(store.get(2)?, None);
    assert_eq!(store.get(3)?, Some(events[2].clone()));
    assert_eq!(store.next_id()?, 4);
    Ok(())
}
