//! The redb backend: events and the profile snapshot in one embedded file.
//!
//! Two tables: `events` maps an event id to the event as JSON, and `meta` holds the profile
//! snapshot and the next event id. redb keeps keys ordered, so the oldest events are the first
//! keys (retention pops them) and the newest are the last (`recent` walks backwards).

use std::{
    cmp,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use serde::Deserialize;
use tracing::warn;

use super::{Store, StoreError};
use crate::event::{Event, Outcome};

/// Event id → the event as JSON.
pub(super) const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");

/// Named values: [`PROFILE_KEY`] and [`NEXT_ID_KEY`].
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// The opaque profile snapshot saved with each commit.
const PROFILE_KEY: &str = "profile";

/// The next event id, as 8 big-endian bytes.
const NEXT_ID_KEY: &str = "next_id";

/// How often commits evict events older than `max_age`: finding them decodes rows, so it is
/// not worth doing on every commit.
const AGE_SWEEP_EVERY: Duration = Duration::from_secs(60);

/// A store in one redb file.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
    max_events: u64,
    max_age: Option<Duration>,
    /// When the last commit evicted by age; `None` until the first commit does.
    last_age_sweep: Mutex<Option<Instant>>,
}

/// The one field of a stored event that age retention needs.
#[derive(Deserialize)]
struct RequestTime {
    time_ms: u64,
}

impl RedbStore {
    /// Opens the file at `path`, creating it and its directory when missing.
    pub fn open(
        path: &Path,
        max_events: u64,
        max_age: Option<Duration>,
    ) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                dir: dir.to_owned(),
                path: path.to_owned(),
                source,
            })?;
        }

        let db = Database::create(path).map_err(|error| match error {
            DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
                path: path.to_owned(),
            },
            other => StoreError::Open {
                path: path.to_owned(),
                source: Box::new(redb::Error::from(other)),
            },
        })?;
        let store = Self {
            db,
            path: path.to_owned(),
            max_events,
            max_age,
            last_age_sweep: Mutex::new(None),
        };

        // Both tables are created up front so that readers never find one missing.
        store
            .create_tables()
            .map_err(store.failed("create its tables"))?;

        Ok(store)
    }

    fn create_tables(&self) -> Result<(), redb::Error> {
        let txn = self.db.begin_write()?;
        txn.open_table(EVENTS)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(())
    }

    /// Wraps a redb error with this store's name and what it was doing.
    fn failed(&self, action: &'static str) -> impl FnOnce(redb::Error) -> StoreError + '_ {
        move |error| StoreError::Backend {
            store: self.describe(),
            action,
            source: Box::new(error),
        }
    }

    /// Decodes one row; a row that is not a valid event is skipped rather than failing the
    /// whole read, so one damaged row cannot hide every other event from the API.
    fn decode(&self, id: u64, bytes: &[u8]) -> Option<Event> {
        match serde_json::from_slice(bytes) {
            Ok(event) => Some(event),
            Err(error) => {
                let store = self.describe();
                warn!(%store, id, %error, "Skipping an event that cannot be decoded");
                None
            }
        }
    }
}

/// The next event id from what the tables hold: the saved counter, but never below the newest
/// kept event, so a missing or damaged counter cannot make ids repeat.
fn next_id_in(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    events: &impl ReadableTable<u64, &'static [u8]>,
) -> Result<u64, redb::StorageError> {
    let saved = match meta.get(NEXT_ID_KEY)? {
        Some(value) => match <[u8; 8]>::try_from(value.value()) {
            Ok(bytes) => u64::from_be_bytes(bytes),
            Err(_) => {
                warn!(
                    bytes = value.value().len(),
                    "Ignoring a next_id that is not 8 bytes"
                );
                1
            }
        },
        None => 1,
    };
    let after_newest = match events.last()? {
        Some((id, _)) => id.value().saturating_add(1),
        None => 1,
    };
    Ok(cmp::max(saved, after_newest))
}

/// Pops the oldest events while their request time is before `cutoff_ms`. Ids grow with
/// time, so the first young event ends the sweep; a row that cannot be decoded ends it too,
/// as its age is unknown.
fn evict_older_than(
    events: &mut redb::Table<u64, &'static [u8]>,
    cutoff_ms: u64,
) -> Result<(), redb::Error> {
    loop {
        let old = match events.first()? {
            Some((_, json)) => serde_json::from_slice::<RequestTime>(json.value())
                .is_ok_and(|event| event.time_ms < cutoff_ms),
            None => false,
        };
        if !old {
            return Ok(());
        }
        events.pop_first()?;
    }
}

/// The redb work behind each [`Store`] method, in redb's own error type; the trait methods
/// add what they were doing.
impl RedbStore {
    fn write(&self, rows: &[(u64, Vec<u8>)], profile: &[u8]) -> Result<(), redb::Error> {
        let txn = self.db.begin_write()?;
        {
            let mut events = txn.open_table(EVENTS)?;
            let mut meta = txn.open_table(META)?;

            let mut next_id = next_id_in(&meta, &events)?;
            for (id, json) in rows {
                events.insert(id, json.as_slice())?;
                next_id = cmp::max(next_id, id.saturating_add(1));
            }

            // Ids grow with time, so the first keys are the oldest events.
            let mut kept = events.len()?;
            while kept > self.max_events {
                if events.pop_first()?.is_none() {
                    break;
                }
                kept -= 1;
            }

            if let Some(cutoff_ms) = self.age_sweep_due() {
                evict_older_than(&mut events, cutoff_ms)?;
            }

            meta.insert(NEXT_ID_KEY, next_id.to_be_bytes().as_slice())?;
            meta.insert(PROFILE_KEY, profile)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// The request time (Unix ms) before which events are evicted, when `max_age` is set and
    /// the last sweep is long enough ago.
    fn age_sweep_due(&self) -> Option<u64> {
        let max_age = self.max_age?;
        let mut last = self
            .last_age_sweep
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if last.is_some_and(|at| at.elapsed() < AGE_SWEEP_EVERY) {
            return None;
        }
        *last = Some(Instant::now());

        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let cutoff_ms = now_ms.saturating_sub(max_age.as_millis());
        Some(u64::try_from(cutoff_ms).unwrap_or(u64::MAX))
    }

    fn read_recent(
        &self,
        limit: usize,
        route: Option<&str>,
        divergent_only: bool,
    ) -> Result<Vec<Event>, redb::Error> {
        let mut found = Vec::new();
        if limit == 0 {
            return Ok(found);
        }

        // Limitation: filters are applied to decoded rows, so asking for a rare route walks
        // back through every kept event; there is no index by route.
        let txn = self.db.begin_read()?;
        let events = txn.open_table(EVENTS)?;
        for row in events.iter()?.rev() {
            let (id, json) = row?;
            let Some(event) = self.decode(id.value(), json.value()) else {
                continue;
            };
            if route.is_some_and(|route| event.route != route) {
                continue;
            }
            if divergent_only && event.outcome == Outcome::Matched {
                continue;
            }

            found.push(event);
            if found.len() == limit {
                break;
            }
        }
        Ok(found)
    }

    fn read_event(&self, id: u64) -> Result<Option<Event>, redb::Error> {
        let txn = self.db.begin_read()?;
        let events = txn.open_table(EVENTS)?;
        let row = events.get(id)?;
        Ok(row.and_then(|json| self.decode(id, json.value())))
    }

    fn read_profile(&self) -> Result<Option<Vec<u8>>, redb::Error> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let profile = meta.get(PROFILE_KEY)?;
        Ok(profile.map(|bytes| bytes.value().to_vec()))
    }

    fn read_next_id(&self) -> Result<u64, redb::Error> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let events = txn.open_table(EVENTS)?;
        Ok(next_id_in(&meta, &events)?)
    }

    fn count(&self) -> Result<u64, redb::Error> {
        let txn = self.db.begin_read()?;
        let events = txn.open_table(EVENTS)?;
        Ok(events.len()?)
    }
}

impl Store for RedbStore {
    fn commit(&self, events: &[Event], profile: &[u8]) -> Result<(), StoreError> {
        // Encode everything before the transaction starts, so a bad event writes nothing.
        let rows = events
            .iter()
            .map(|event| match serde_json::to_vec(event) {
                Ok(json) => Ok((event.id, json)),
                Err(source) => Err(StoreError::Encode {
                    store: self.describe(),
                    id: event.id,
                    source,
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;

        self.write(&rows, profile)
            .map_err(self.failed("commit events"))
    }

    fn recent(
        &self,
        limit: usize,
        route: Option<&str>,
        divergent_only: bool,
    ) -> Result<Vec<Event>, StoreError> {
        self.read_recent(limit, route, divergent_only)
            .map_err(self.failed("read recent events"))
    }

    fn get(&self, id: u64) -> Result<Option<Event>, StoreError> {
        self.read_event(id).map_err(self.failed("read an event"))
    }

    fn load_profile(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.read_profile()
            .map_err(self.failed("read the profile snapshot"))
    }

    fn next_id(&self) -> Result<u64, StoreError> {
        self.read_next_id()
            .map_err(self.failed("read the next event id"))
    }

    fn len(&self) -> Result<u64, StoreError> {
        self.count().map_err(self.failed("count events"))
    }

    fn describe(&self) -> String {
        format!("redb at {}", self.path.display())
    }
}
