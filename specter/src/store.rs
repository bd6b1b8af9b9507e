//! The store: where recorded events and the profile snapshot are kept across restarts.
//!
//! It sits between the record stage, which writes each batch of events together with the
//! current profile snapshot, and the serve stage, which reads events back for the API. The
//! [`Store`] trait is synchronous: the recorder calls it from its own writer thread and the API
//! through `tokio::task::spawn_blocking`, so no backend ever blocks the async runtime.
//!
//! Backends: [`StoreBackend::Redb`], one embedded file (see `store/redb.rs`).

use std::{io, path::PathBuf, sync::Arc};

use thiserror::Error;
use tracing::info;

use crate::{
    config::{StoreBackend, StoreSection},
    event::Event,
};

mod redb;

/// Keeps events and the profile snapshot; shared by the recorder and the API.
pub trait Store: Send + Sync + 'static {
    /// Appends events (their ids already assigned, increasing) and saves the opaque profile
    /// snapshot, in one transaction. Applies the retention cap: the oldest events are evicted
    /// beyond `max_events`.
    fn commit(&self, events: &[Event], profile: &[u8]) -> Result<(), StoreError>;

    /// Newest first, at most `limit`; only events whose `route` equals `route` when given, and
    /// only those whose outcome is not `Matched` when `divergent_only`.
    fn recent(
        &self,
        limit: usize,
        route: Option<&str>,
        divergent_only: bool,
    ) -> Result<Vec<Event>, StoreError>;

    /// The event with this id, if it is still kept.
    fn get(&self, id: u64) -> Result<Option<Event>, StoreError>;

    /// The last saved profile snapshot, if any.
    fn load_profile(&self) -> Result<Option<Vec<u8>>, StoreError>;

    /// One more than the highest event id ever stored (kept even after eviction); 1 for an empty
    /// store.
    fn next_id(&self) -> Result<u64, StoreError>;

    /// Events currently kept.
    fn len(&self) -> Result<u64, StoreError>;

    /// True when no event is kept.
    fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    /// Human name for logs and errors, e.g. "redb at ./data/specter.redb".
    fn describe(&self) -> String;
}

/// Everything that can go wrong opening or using a store.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error(
        "cannot create directory {dir} for the redb store at {path}: {source}; create it by hand \
         or set store.path to a writable place"
    )]
    CreateDir {
        dir: PathBuf,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the redb store at {path} is already open in another process; is another specter using \
         it? Stop it or set store.path to another file"
    )]
    Locked { path: PathBuf },
    #[error(
        "cannot open redb store at {path}: {source}; is another specter using it? If the file is \
         damaged or not a specter store, move it aside and specter starts with an empty one"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A read or write failed on an open store; `store` is [`Store::describe`].
    #[error(
        "store {store} failed to {action}: {source}; check the disk (free space, permissions) \
         and restart specter"
    )]
    Backend {
        store: String,
        action: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot encode event {id} for store {store}: {source}; this is a bug in specter")]
    Encode {
        store: String,
        id: u64,
        #[source]
        source: serde_json::Error,
    },
}

/// Opens (creating when missing) the store the config names.
pub fn open(config: &StoreSection) -> Result<Arc<dyn Store>, StoreError> {
    let store: Arc<dyn Store> = match config.backend {
        StoreBackend::Redb => Arc::new(self::redb::RedbStore::open(
            &config.path,
            config.max_events,
        )?),
    };

    info!(
        store = %store.describe(),
        events = store.len()?,
        next_id = store.next_id()?,
        max_events = config.max_events,
        "Store opened"
    );
    Ok(store)
}

#[cfg(test)]
mod tests;
