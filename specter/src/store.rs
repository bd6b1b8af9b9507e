//! The store: where recorded events and the profile snapshot are kept across restarts.
//!
//! It sits between the record stage, which writes each batch of events together with the
//! current profile snapshot, and the serve stage, which reads events back for the API. The
//! [`Store`] trait is synchronous: the recorder calls it from its own writer thread and the API
//! through `tokio::task::spawn_blocking`, so no backend ever blocks the async runtime.
//!
//! Backends: [`StoreBackend::Redb`], one embedded file (see `store/redb.rs`), and
//! [`StoreBackend::Postgres`], a PostgreSQL database that several nodes may share (see
//! `store/postgres.rs`). The redb backend writes inside [`Store::commit`]; the PostgreSQL
//! backend queues the write and returns, so [`Store::flush`] is how a caller waits for it.

use std::{io, path::PathBuf, sync::Arc, time::Duration};

use serde::Serialize;
use thiserror::Error;
use tracing::info;

use crate::{
    config::{StoreBackend, StoreSection},
    event::Event,
};

mod postgres;
mod redb;

/// A PostgreSQL DSN with its password replaced, for logs and printouts.
pub fn redact_dsn(dsn: &str) -> String {
    postgres::redact_dsn(dsn)
}

/// Checks `store.postgres_dsn` the way opening the store does, without contacting the server.
pub fn check_postgres_dsn(dsn: &str) -> Result<(), StoreError> {
    postgres::parse_dsn(dsn).map(|_| ())
}

/// Keeps events and the profile snapshot; shared by the recorder and the API.
pub trait Store: Send + Sync + 'static {
    /// Appends events (their ids already assigned, increasing) and saves the opaque profile
    /// snapshot, in one transaction. Applies the retention limits: the oldest events are evicted
    /// beyond `max_events`, and events older than `max_age`.
    ///
    /// A backend may write later, in the background, and apply retention periodically: what
    /// it returns then is only whether the events could be queued, and [`Store::flush`] waits
    /// for the write.
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

    /// Waits, at most `timeout`, until every commit made before this call is written and
    /// readable, and the retention limits are applied. Backends that write inside
    /// [`Store::commit`] have nothing to wait for.
    fn flush(&self, timeout: Duration) -> Result<(), StoreError> {
        let _ = timeout;
        Ok(())
    }

    /// Whether writes are reaching the backend, and what is waiting or was lost. Backends that
    /// write inside [`Store::commit`] report errors from it instead and are always connected.
    fn health(&self) -> StoreHealth {
        StoreHealth::connected()
    }

    /// Like [`Store::recent`], but across every node that shares this store, newest (by
    /// `time_ms`) first. Backends that keep one node's events return [`Store::recent`].
    fn recent_all_nodes(
        &self,
        limit: usize,
        route: Option<&str>,
        divergent_only: bool,
    ) -> Result<Vec<Event>, StoreError> {
        self.recent(limit, route, divergent_only)
    }
}

/// How well a store is keeping up, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreHealth {
    /// The last attempt to reach the backend succeeded.
    pub connected: bool,
    /// Committed events waiting to be written.
    pub buffered: u64,
    /// Events lost since the store was opened: the buffer was full, or the backend refused
    /// them.
    pub dropped: u64,
    /// The most recent write error, kept after the backend recovers.
    pub last_error: Option<String>,
}

impl StoreHealth {
    /// Nothing waiting, nothing lost.
    pub fn connected() -> Self {
        Self {
            connected: true,
            buffered: 0,
            dropped: 0,
            last_error: None,
        }
    }
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
    /// `dsn` is shown without its password, here and in every postgres error.
    #[error(
        "store.postgres_dsn {dsn:?} is not a valid PostgreSQL connection string: {source}; write \
         it as key=value pairs, like \"host=127.0.0.1 user=specter dbname=specter\", or as a \
         postgresql:// URL"
    )]
    PostgresDsn {
        dsn: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "store.postgres_dsn {dsn} asks for TLS (sslmode=require), which Specter's PostgreSQL \
         connection does not do; reach the server over a trusted network or a TLS tunnel, \
         with sslmode=disable or prefer"
    )]
    PostgresTls { dsn: String },
    #[error(
        "cannot connect to the postgres store at {dsn}: {source}; check that PostgreSQL is \
         running and reachable there, and that store.postgres_dsn has the right host, port, user, \
         password and database"
    )]
    PostgresConnect {
        dsn: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "cannot bring the postgres store at {dsn} to schema version {version}: {source}; check \
         that the user in store.postgres_dsn may create tables in that database"
    )]
    PostgresMigrate {
        dsn: String,
        version: usize,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "the postgres store at {dsn} has schema version {found}, newer than this specter knows \
         ({known}); upgrade specter, or point store.postgres_dsn at another database"
    )]
    PostgresSchemaTooNew {
        dsn: String,
        found: usize,
        known: usize,
    },
    /// A read on an open postgres store failed; `store` is [`Store::describe`].
    #[error(
        "store {store} failed to {action}: {source}; check that PostgreSQL is running and \
         reachable, and its server log"
    )]
    Postgres {
        store: String,
        action: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "store {store} still has {buffered} events to write after waiting {waited:?} (last \
         error: {}); they stay buffered and are written once PostgreSQL is reachable",
        last_error.as_deref().unwrap_or("none")
    )]
    NotFlushed {
        store: String,
        buffered: u64,
        waited: Duration,
        last_error: Option<String>,
    },
    #[error("store {store} must be opened inside the tokio runtime; this is a bug in specter")]
    NoRuntime { store: String },
}

/// Opens (creating when missing) the store the config names, for the node `node`: a store
/// that several nodes share keeps each node's events, ids and profile apart.
///
/// The postgres backend needs to be opened inside the tokio runtime, and then only from a
/// thread that may block: a multi-threaded runtime's worker, a `spawn_blocking` thread or a
/// plain thread.
pub fn open(config: &StoreSection, node: &str) -> Result<Arc<dyn Store>, StoreError> {
    let store: Arc<dyn Store> = match config.backend {
        StoreBackend::Redb => Arc::new(self::redb::RedbStore::open(
            &config.path,
            config.max_events,
            config.max_age,
        )?),
        StoreBackend::Postgres => {
            // Validation makes sure the key is set; an empty DSN fails to connect and says so.
            let dsn = config.postgres_dsn.as_deref().unwrap_or_default();
            Arc::new(self::postgres::PostgresStore::open(
                self::postgres::Settings {
                    dsn: dsn.to_owned(),
                    node: node.to_owned(),
                    max_events: config.max_events,
                    max_age: config.max_age,
                    max_buffered: self::postgres::DEFAULT_MAX_BUFFERED,
                },
            )?)
        }
    };

    info!(
        store = %store.describe(),
        events = store.len()?,
        next_id = store.next_id()?,
        max_events = config.max_events,
        max_age = ?config.max_age,
        "Store opened"
    );
    Ok(store)
}

#[cfg(test)]
mod tests;
