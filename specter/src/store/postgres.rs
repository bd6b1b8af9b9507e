//! The PostgreSQL backend: events and profile snapshots in a database several nodes may share.
//!
//! Every row carries the node name the store was opened with, and every read is for that node
//! only (except [`Store::recent_all_nodes`]), so nodes sharing a database never see each
//! other's ids or profiles. The schema is versioned in `specter_schema` and migrated when the
//! store opens.
//!
//! The recorder must never wait on the network, so [`Store::commit`] only queues: the events
//! go into an in-memory buffer, bounded by [`Settings::max_buffered`], and a writer task on
//! the tokio runtime appends them in batches, each batch in one transaction with the latest
//! profile snapshot. While PostgreSQL cannot be reached the writer retries with exponential
//! backoff; events that do not fit in the buffer are dropped and counted in
//! [`Store::health`]. Retention (by count and by age) runs periodically in the writer and on
//! [`Store::flush`], not on every commit.
//!
//! Reads run on the same runtime, waited for from the calling thread, which must be allowed to
//! block (see [`super::open`]).

use std::{
    collections::VecDeque,
    future::Future,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use thiserror::Error;
use tokio::{
    runtime::Handle,
    sync::{Notify, watch},
};
use tokio_postgres::{NoTls, types::ToSql};
use tracing::{debug, info, warn};

use super::{Store, StoreError, StoreHealth};
use crate::event::{Event, Outcome};

/// Events held in memory while PostgreSQL is unreachable, unless the caller says otherwise.
pub const DEFAULT_MAX_BUFFERED: usize = 10_000;

/// Events written per transaction at most, so one write stays short after a long outage.
const WRITE_BATCH: usize = 1_000;

/// Connections kept: one for the writer, the rest for API reads.
const POOL_SIZE: usize = 4;

/// How long connecting may take, unless the DSN sets `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a read or a write may take before its connection is given up.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Retry delays after a failed write: doubled after each failure, between these bounds.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How often the writer applies retention and prunes idle connections.
const UPKEEP_EVERY: Duration = Duration::from_secs(30);

/// Pooled connections unused this long are closed at the next upkeep.
const IDLE_CONNECTION: Duration = Duration::from_secs(300);

/// At most one "events dropped" warning per this long.
const DROP_WARNING_EVERY: Duration = Duration::from_secs(10);

/// Advisory lock key held while migrating, so nodes starting together migrate one at a time.
const SCHEMA_LOCK: i64 = 0x5350_4543_5445_5231;

/// The schema, one step per version: `MIGRATIONS[n]` takes a database from version `n` to
/// `n + 1`. Steps are only ever appended.
///
/// Events are kept as JSON in `bytea` rather than `jsonb`: bytes come back exactly as written,
/// and `jsonb` refuses a NUL character, which a response body may hold. The other columns are
/// copies for filtering and retention.
const MIGRATIONS: &[&str] = &["
    CREATE TABLE specter_events (
        node text NOT NULL,
        id bigint NOT NULL,
        time_ms bigint NOT NULL,
        outcome text NOT NULL,
        route text NOT NULL,
        method text NOT NULL,
        target text NOT NULL,
        event bytea NOT NULL,
        PRIMARY KEY (node, id)
    );
    CREATE INDEX specter_events_by_route ON specter_events (node, route, id);
    CREATE INDEX specter_events_by_time ON specter_events (time_ms);
    CREATE TABLE specter_profiles (
        node text PRIMARY KEY,
        snapshot bytea NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE specter_nodes (
        node text PRIMARY KEY,
        next_id bigint NOT NULL
    );
"];

/// `$1` node, then one array per column, so a batch of any size is one statement. A batch
/// retried after a lost acknowledgement rewrites the same rows instead of failing.
const INSERT_EVENTS: &str = "
    INSERT INTO specter_events (node, id, time_ms, outcome, route, method, target, event)
    SELECT $1::text, * FROM UNNEST(
        $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bytea[]
    )
    ON CONFLICT (node, id) DO UPDATE SET
        time_ms = EXCLUDED.time_ms, outcome = EXCLUDED.outcome, route = EXCLUDED.route,
        method = EXCLUDED.method, target = EXCLUDED.target, event = EXCLUDED.event";

const SAVE_NEXT_ID: &str = "
    INSERT INTO specter_nodes (node, next_id) VALUES ($1, $2)
    ON CONFLICT (node) DO UPDATE
    SET next_id = GREATEST(specter_nodes.next_id, EXCLUDED.next_id)";

const SAVE_PROFILE: &str = "
    INSERT INTO specter_profiles (node, snapshot, updated_at) VALUES ($1, $2, now())
    ON CONFLICT (node) DO UPDATE SET snapshot = EXCLUDED.snapshot, updated_at = now()";

/// `$2` is `max_events - 1`: the subquery finds the oldest event to keep.
const EVICT_BEYOND_COUNT: &str = "
    DELETE FROM specter_events
    WHERE node = $1 AND id < (
        SELECT id FROM specter_events WHERE node = $1 ORDER BY id DESC OFFSET $2 LIMIT 1
    )";

const EVICT_OLDER_THAN: &str = "DELETE FROM specter_events WHERE node = $1 AND time_ms < $2";

/// The saved counter, but never below the newest kept event, so ids cannot repeat.
const READ_NEXT_ID: &str = "
    SELECT GREATEST(
        COALESCE((SELECT next_id FROM specter_nodes WHERE node = $1), 1),
        COALESCE((SELECT max(id) + 1 FROM specter_events WHERE node = $1), 1)
    )";

/// What [`PostgresStore::open`] needs.
#[derive(Clone)]
pub struct Settings {
    /// A libpq-style connection string or `postgresql://` URL.
    pub dsn: String,
    /// The node whose events this store reads and writes.
    pub node: String,
    pub max_events: u64,
    pub max_age: Option<Duration>,
    /// Events held in memory while PostgreSQL cannot be reached; beyond it new events are
    /// dropped.
    pub max_buffered: usize,
}

/// A store in a PostgreSQL database, for one node.
pub struct PostgresStore {
    shared: Arc<Shared>,
    pool: Pool,
    /// The runtime the store was opened in, which runs the writer and every read.
    handle: Handle,
}

/// What the store and its writer task share.
struct Shared {
    node: String,
    /// [`Store::describe`].
    name: String,
    max_events: u64,
    max_age: Option<Duration>,
    max_buffered: usize,
    queue: Mutex<Queue>,
    /// Wakes the writer when a commit arrives or the store closes.
    work: Notify,
    /// Cuts the writer's backoff short: a flush wants the write attempted now.
    hurry: Notify,
    /// The number of commits written (or given up), for [`Store::flush`].
    written: watch::Sender<u64>,
    condition: Mutex<Condition>,
}

/// Commits waiting for the writer.
struct Queue {
    rows: VecDeque<Row>,
    /// The latest snapshot, not yet written; older ones are superseded.
    profile: Option<Vec<u8>>,
    /// Rows the writer has taken and not yet written; they count against the buffer bound.
    in_flight: usize,
    /// Commits accepted since the store opened.
    accepted: u64,
    /// The highest event id committed, written or not.
    highest_id: Option<u64>,
    /// The store was dropped: the writer stops once the queue is empty.
    closed: bool,
}

/// What [`Store::health`] reports, besides the buffer.
struct Condition {
    connected: bool,
    dropped: u64,
    last_error: Option<String>,
    last_drop_warning: Option<Instant>,
}

/// One event, encoded for the insert.
struct Row {
    id: i64,
    time_ms: i64,
    outcome: &'static str,
    route: String,
    method: String,
    target: String,
    json: Vec<u8>,
}

/// What the writer takes from the queue for one transaction.
struct Batch {
    rows: Vec<Row>,
    profile: Option<Vec<u8>>,
    /// Set when the batch empties the queue: once written, every commit up to this one is.
    completes: Option<u64>,
}

/// A read or a write gave no answer in time.
#[derive(Debug, Error)]
#[error("PostgreSQL gave no answer within {0:?}")]
struct TimedOut(Duration);

/// Why a write did not happen.
enum Failure {
    /// The server could not be reached, or refused for a reason that passes: retry.
    Transient(String),
    /// The server refused the batch itself: retrying cannot help.
    Permanent(String),
}

/// Parses `store.postgres_dsn`, refusing what the connection cannot do.
pub fn parse_dsn(dsn: &str) -> Result<tokio_postgres::Config, StoreError> {
    let config: tokio_postgres::Config = dsn.parse().map_err(|source| StoreError::PostgresDsn {
        dsn: redact_dsn(dsn),
        source,
    })?;
    if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err(StoreError::PostgresTls {
            dsn: redact_dsn(dsn),
        });
    }
    Ok(config)
}

impl PostgresStore {
    /// Connects, brings the schema to the current version and starts the writer.
    ///
    /// Fails when PostgreSQL cannot be reached: the next event id and the saved profile live
    /// there, and starting without them would reuse ids. Once open, outages are ridden out by
    /// buffering.
    pub fn open(settings: Settings) -> Result<Self, StoreError> {
        let dsn = redact_dsn(&settings.dsn);
        let name = format!("postgres at {dsn} (node {})", settings.node);

        let mut pg_config = parse_dsn(&settings.dsn)?;
        if pg_config.get_connect_timeout().is_none() {
            pg_config.connect_timeout(CONNECT_TIMEOUT);
        }
        if pg_config.get_application_name().is_none() {
            pg_config.application_name("specter");
        }
        let handle = Handle::try_current().map_err(|_| StoreError::NoRuntime {
            store: name.clone(),
        })?;

        // Limitation: connections are plain TCP; a DSN with sslmode=require fails to connect.
        let manager = Manager::from_config(
            pg_config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(QUERY_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|error| StoreError::PostgresConnect {
                dsn: dsn.clone(),
                source: Box::new(error),
            })?;

        // Bounded, so a server that accepts connections but never answers cannot hang startup.
        let migrated = wait(
            &handle,
            tokio::time::timeout(QUERY_TIMEOUT, migrate(&pool, &dsn)),
        );
        let version = migrated.map_err(|_| StoreError::PostgresConnect {
            dsn: dsn.clone(),
            source: boxed(TimedOut(QUERY_TIMEOUT)),
        })??;
        debug!(store = %name, version, "Schema is current");

        let shared = Arc::new(Shared {
            node: settings.node,
            name,
            max_events: settings.max_events,
            max_age: settings.max_age,
            max_buffered: settings.max_buffered,
            queue: Mutex::new(Queue {
                rows: VecDeque::new(),
                profile: None,
                in_flight: 0,
                accepted: 0,
                highest_id: None,
                closed: false,
            }),
            work: Notify::new(),
            hurry: Notify::new(),
            written: watch::Sender::new(0),
            condition: Mutex::new(Condition {
                connected: true,
                dropped: 0,
                last_error: None,
                last_drop_warning: None,
            }),
        });
        handle.spawn(run_writer(shared.clone(), pool.clone()));

        Ok(Self {
            shared,
            pool,
            handle,
        })
    }

    /// Runs `work` with a pooled connection on the store's runtime and waits for it.
    fn read<T, F>(
        &self,
        action: &'static str,
        work: impl FnOnce(Object) -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let pool = self.pool.clone();
        let outcome = wait(&self.handle, async move {
            let client = pool.get().await.map_err(boxed)?;
            match tokio::time::timeout(QUERY_TIMEOUT, work(client)).await {
                Ok(result) => result.map_err(boxed),
                Err(_) => Err(boxed(TimedOut(QUERY_TIMEOUT))),
            }
        });
        outcome.map_err(|source| StoreError::Postgres {
            store: self.describe(),
            action,
            source,
        })
    }

    /// Events from a query whose rows are (id, event JSON), skipping undecodable ones.
    fn events_from(&self, rows: &[tokio_postgres::Row]) -> Vec<Event> {
        rows.iter()
            .filter_map(|row| decode(&self.shared.name, row.get(0), row.get(1)))
            .collect()
    }

    fn select_recent(
        &self,
        node: Option<&str>,
        limit: usize,
        route: Option<&str>,
        divergent_only: bool,
    ) -> Result<Vec<Event>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }

        let node = node.map(str::to_owned);
        let route = route.map(text_column);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.read("read recent events", |client| async move {
            let mut sql = String::from("SELECT id, event FROM specter_events WHERE true");
            let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
            if let Some(node) = &node {
                params.push(node);
                sql.push_str(&format!(" AND node = ${}", params.len()));
            }
            if let Some(route) = &route {
                params.push(route);
                sql.push_str(&format!(" AND route = ${}", params.len()));
            }
            if divergent_only {
                sql.push_str(" AND outcome <> 'matched'");
            }
            sql.push_str(if node.is_some() {
                " ORDER BY id DESC"
            } else {
                " ORDER BY time_ms DESC, node, id DESC"
            });
            params.push(&limit);
            sql.push_str(&format!(" LIMIT ${}", params.len()));

            let statement = client.prepare_cached(&sql).await?;
            client.query(&statement, &params).await
        })?;
        Ok(self.events_from(&rows))
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // The writer finishes what is queued, then stops; while PostgreSQL stays unreachable
        // it keeps retrying until the runtime shuts down.
        self.shared.queue().closed = true;
        self.shared.work.notify_one();
    }
}

impl Store for PostgresStore {
    fn commit(&self, events: &[Event], profile: &[u8]) -> Result<(), StoreError> {
        // Encode first, so a bad event queues nothing.
        let rows = events
            .iter()
            .map(|event| Row::encode(event).map_err(|source| self.encode_error(event.id, source)))
            .collect::<Result<Vec<_>, _>>()?;

        let dropped = {
            let mut queue = self.shared.queue();
            let room = self
                .shared
                .max_buffered
                .saturating_sub(queue.rows.len() + queue.in_flight);
            let dropped = rows.len().saturating_sub(room);
            queue.rows.extend(rows.into_iter().take(room));
            queue.profile = Some(profile.to_vec());
            queue.accepted += 1;
            // Dropped ids count too: the caller has used them.
            if let Some(newest) = events.iter().map(|event| event.id).max() {
                queue.highest_id = queue.highest_id.max(Some(newest));
            }
            dropped
        };
        if dropped > 0 {
            self.shared.count_dropped(dropped, "the buffer is full");
        }

        self.shared.work.notify_one();
        Ok(())
    }

    fn recent(
        &self,
        limit: usize,
        route: Option<&str>,
        divergent_only: bool,
    ) -> Result<Vec<Event>, StoreError> {
        self.select_recent(Some(&self.shared.node), limit, route, divergent_only)
    }

    fn recent_all_nodes(
        &self,
        limit: usize,
        route: Option<&str>,
        divergent_only: bool,
    ) -> Result<Vec<Event>, StoreError> {
        self.select_recent(None, limit, route, divergent_only)
    }

    fn get(&self, id: u64) -> Result<Option<Event>, StoreError> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(None);
        };
        let node = self.shared.node.clone();
        let rows = self.read("read an event", |client| async move {
            let statement = client
                .prepare_cached("SELECT id, event FROM specter_events WHERE node = $1 AND id = $2")
                .await?;
            client.query(&statement, &[&node, &id]).await
        })?;
        Ok(self.events_from(&rows).pop())
    }

    fn load_profile(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let node = self.shared.node.clone();
        let row = self.read("read the profile snapshot", |client| async move {
            let statement = client
                .prepare_cached("SELECT snapshot FROM specter_profiles WHERE node = $1")
                .await?;
            client.query_opt(&statement, &[&node]).await
        })?;
        Ok(row.map(|row| row.get(0)))
    }

    fn next_id(&self) -> Result<u64, StoreError> {
        let node = self.shared.node.clone();
        let saved: i64 = self.read("read the next event id", |client| async move {
            let statement = client.prepare_cached(READ_NEXT_ID).await?;
            Ok(client.query_one(&statement, &[&node]).await?.get(0))
        })?;

        // Events still buffered have ids too.
        let saved = u64::try_from(saved).unwrap_or(1);
        let queued = self.shared.queue().highest_id.map_or(1, |id| id + 1);
        Ok(saved.max(queued))
    }

    fn len(&self) -> Result<u64, StoreError> {
        let node = self.shared.node.clone();
        let count: i64 = self.read("count events", |client| async move {
            let statement = client
                .prepare_cached("SELECT count(*) FROM specter_events WHERE node = $1")
                .await?;
            Ok(client.query_one(&statement, &[&node]).await?.get(0))
        })?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    fn describe(&self) -> String {
        self.shared.name.clone()
    }

    fn flush(&self, timeout: Duration) -> Result<(), StoreError> {
        let target = self.shared.queue().accepted;
        self.shared.work.notify_one();
        self.shared.hurry.notify_one();

        let mut written = self.shared.written.subscribe();
        let caught_up = wait(&self.handle, async move {
            let reached = written.wait_for(|written| *written >= target);
            matches!(tokio::time::timeout(timeout, reached).await, Ok(Ok(_)))
        });
        if !caught_up {
            let health = self.health();
            return Err(StoreError::NotFlushed {
                store: self.describe(),
                buffered: health.buffered,
                waited: timeout,
                last_error: health.last_error,
            });
        }

        let shared = self.shared.clone();
        self.read("apply retention", |client| async move {
            apply_retention(&client, &shared).await
        })
    }

    fn health(&self) -> StoreHealth {
        let buffered = {
            let queue = self.shared.queue();
            queue.rows.len() + queue.in_flight
        };
        let condition = self.shared.condition();
        StoreHealth {
            connected: condition.connected,
            buffered: buffered as u64,
            dropped: condition.dropped,
            last_error: condition.last_error.clone(),
        }
    }
}

impl PostgresStore {
    fn encode_error(&self, id: u64, source: serde_json::Error) -> StoreError {
        StoreError::Encode {
            store: self.describe(),
            id,
            source,
        }
    }
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn condition(&self) -> MutexGuard<'_, Condition> {
        self.condition
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes the next batch: the oldest queued rows, and the profile when they empty the queue
    /// (so the snapshot written never counts events that are not yet written with it).
    fn take_batch(&self) -> Option<Batch> {
        let mut queue = self.queue();
        if queue.rows.is_empty() && queue.profile.is_none() {
            return None;
        }

        let taken = queue.rows.len().min(WRITE_BATCH);
        let rows: Vec<Row> = queue.rows.drain(..taken).collect();
        queue.in_flight = rows.len();
        let empties = queue.rows.is_empty();
        Some(Batch {
            rows,
            profile: if empties { queue.profile.take() } else { None },
            completes: empties.then_some(queue.accepted),
        })
    }

    /// The batch is written, or given up: its rows no longer count as buffered.
    fn finish(&self, batch: &Batch) {
        self.queue().in_flight = 0;
        if let Some(completes) = batch.completes {
            self.written
                .send_modify(|written| *written = (*written).max(completes));
        }
    }

    fn count_dropped(&self, events: usize, why: &str) {
        let mut condition = self.condition();
        condition.dropped += events as u64;

        // One line per burst, not one per commit.
        let due = condition
            .last_drop_warning
            .is_none_or(|at| at.elapsed() >= DROP_WARNING_EVERY);
        if due {
            condition.last_drop_warning = Some(Instant::now());
            let dropped_total = condition.dropped;
            drop(condition);
            warn!(
                store = %self.name,
                events,
                dropped_total,
                why,
                "Store events dropped"
            );
        }
    }

    fn reached(&self) {
        let mut condition = self.condition();
        if !condition.connected {
            condition.connected = true;
            drop(condition);
            info!(store = %self.name, "PostgreSQL reachable again; writing buffered events");
        }
    }

    fn unreachable(&self, error: String) {
        let mut condition = self.condition();
        let was_connected = condition.connected;
        condition.connected = false;
        condition.last_error = Some(error.clone());
        drop(condition);
        if was_connected {
            warn!(
                store = %self.name,
                %error,
                "PostgreSQL unreachable; buffering events and retrying"
            );
        }
    }

    fn closed(&self) -> bool {
        self.queue().closed
    }

    /// True when no commit is waiting for the writer.
    fn queue_is_empty(&self) -> bool {
        let queue = self.queue();
        queue.rows.is_empty() && queue.profile.is_none()
    }
}

impl Row {
    fn encode(event: &Event) -> Result<Self, serde_json::Error> {
        // Ids count events from 1 and times are Unix milliseconds: neither reaches 2^63.
        Ok(Self {
            id: i64::try_from(event.id).unwrap_or(i64::MAX),
            time_ms: i64::try_from(event.time_ms).unwrap_or(i64::MAX),
            outcome: outcome_name(event.outcome),
            route: text_column(&event.route),
            method: text_column(&event.method),
            target: text_column(&event.target),
            json: serde_json::to_vec(event)?,
        })
    }
}

/// The outcome as the `outcome` column holds it: its JSON name.
fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Matched => "matched",
        Outcome::Diverged => "diverged",
        Outcome::ShadowError => "shadow_error",
    }
}

/// PostgreSQL text cannot hold NUL; the event JSON keeps the exact value, the column a
/// stand-in (and a route filter is mapped the same way, so it still matches).
fn text_column(value: &str) -> String {
    value.replace('\0', "\u{fffd}")
}

/// One row's event; one that cannot be decoded is skipped rather than failing the whole read.
fn decode(store: &str, id: i64, json: &[u8]) -> Option<Event> {
    match serde_json::from_slice(json) {
        Ok(event) => Some(event),
        Err(error) => {
            warn!(%store, id, %error, "Skipping an event that cannot be decoded");
            None
        }
    }
}

fn boxed(
    error: impl std::error::Error + Send + Sync + 'static,
) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(error)
}

/// Waits for `work` on `handle`'s runtime from a thread that may block.
///
/// `block_in_place` lets a worker of a multi-threaded runtime (the startup code in `main`)
/// wait too; elsewhere it just runs the closure.
///
/// Limitation: it panics on a current-thread runtime's own thread, so the postgres store
/// cannot be used from `#[tokio::test]` code directly; tests call it from plain threads.
fn wait<F: Future>(handle: &Handle, work: F) -> F::Output {
    tokio::task::block_in_place(|| handle.block_on(work))
}

/// Creates the tables or brings them to the current version; returns that version.
async fn migrate(pool: &Pool, dsn: &str) -> Result<usize, StoreError> {
    let connect_error = |source| StoreError::PostgresConnect {
        dsn: dsn.to_owned(),
        source,
    };
    let mut client = pool
        .get()
        .await
        .map_err(|error| connect_error(boxed(error)))?;
    let known = MIGRATIONS.len();
    let failed = |version| {
        move |source| StoreError::PostgresMigrate {
            dsn: dsn.to_owned(),
            version,
            source,
        }
    };

    let txn = client.transaction().await.map_err(failed(known))?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await
        .map_err(failed(known))?;
    // The server's notice that the table exists already would be logged on every start.
    txn.batch_execute(
        "SET LOCAL client_min_messages = warning; \
         CREATE TABLE IF NOT EXISTS specter_schema (version integer NOT NULL)",
    )
    .await
    .map_err(failed(known))?;
    let found: i32 = txn
        .query_opt("SELECT max(version) FROM specter_schema", &[])
        .await
        .map_err(failed(known))?
        .and_then(|row| row.get::<_, Option<i32>>(0))
        .unwrap_or(0);
    let found = usize::try_from(found).unwrap_or(0);

    if found > known {
        return Err(StoreError::PostgresSchemaTooNew {
            dsn: dsn.to_owned(),
            found,
            known,
        });
    }
    if found == known {
        return Ok(known);
    }

    for (step, sql) in MIGRATIONS.iter().enumerate().skip(found) {
        txn.batch_execute(sql).await.map_err(failed(step + 1))?;
    }
    let version = i32::try_from(known).unwrap_or(i32::MAX);
    txn.execute("DELETE FROM specter_schema", &[])
        .await
        .map_err(failed(known))?;
    txn.execute(
        "INSERT INTO specter_schema (version) VALUES ($1)",
        &[&version],
    )
    .await
    .map_err(failed(known))?;
    txn.commit().await.map_err(failed(known))?;

    info!(%dsn, from = found, to = known, "Migrated the postgres store schema");
    Ok(known)
}

/// The writer task: takes batches from the queue and writes them, retrying with backoff while
/// PostgreSQL is unreachable; applies retention every [`UPKEEP_EVERY`].
async fn run_writer(shared: Arc<Shared>, pool: Pool) {
    let mut backoff = MIN_BACKOFF;
    let mut pending: Option<Batch> = None;
    let mut next_upkeep = Instant::now();

    loop {
        if pending.is_none() {
            pending = shared.take_batch();
        }

        let Some(batch) = &pending else {
            if shared.closed() {
                break;
            }

            // Idle. While PostgreSQL is unreachable, probe it on the backoff schedule, so
            // health shows it back even when nothing is committed.
            let connected = shared.condition().connected;
            let wake_at = if connected {
                next_upkeep
            } else {
                Instant::now() + backoff
            };
            let _ = tokio::time::timeout_at(wake_at.into(), shared.work.notified()).await;

            if !connected && shared.queue_is_empty() {
                match probe(&pool).await {
                    Ok(()) => {
                        shared.reached();
                        backoff = MIN_BACKOFF;
                    }
                    Err(error) => {
                        shared.unreachable(error);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            if Instant::now() >= next_upkeep {
                upkeep(&shared, &pool).await;
                next_upkeep = Instant::now() + UPKEEP_EVERY;
            }
            continue;
        };

        match write(&shared, &pool, batch).await {
            Ok(()) => {
                shared.reached();
                shared.finish(batch);
                pending = None;
                backoff = MIN_BACKOFF;
                if Instant::now() >= next_upkeep {
                    upkeep(&shared, &pool).await;
                    next_upkeep = Instant::now() + UPKEEP_EVERY;
                }
            }
            Err(Failure::Permanent(error)) => {
                warn!(
                    store = %shared.name,
                    %error,
                    events = batch.rows.len(),
                    "PostgreSQL refused a batch of events; dropping it"
                );
                shared.condition().last_error = Some(error);
                shared.count_dropped(batch.rows.len(), "PostgreSQL refused them");
                shared.finish(batch);
                pending = None;
            }
            Err(Failure::Transient(error)) => {
                shared.unreachable(error);
                let _ = tokio::time::timeout(backoff, shared.hurry.notified()).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    debug!(store = %shared.name, "Writer stopped");
}

/// Writes one batch in one transaction.
async fn write(shared: &Shared, pool: &Pool, batch: &Batch) -> Result<(), Failure> {
    let mut client = pool
        .get()
        .await
        .map_err(|error| Failure::Transient(pool_error(&error)))?;

    match tokio::time::timeout(QUERY_TIMEOUT, write_with(&mut client, shared, batch)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(classify(&error)),
        Err(_) => {
            // The connection may be stuck mid-transaction: close it rather than reuse it.
            drop(Object::take(client));
            Err(Failure::Transient(TimedOut(QUERY_TIMEOUT).to_string()))
        }
    }
}

async fn write_with(
    client: &mut Object,
    shared: &Shared,
    batch: &Batch,
) -> Result<(), tokio_postgres::Error> {
    let txn = client.transaction().await?;

    if let Some(newest) = batch.rows.iter().map(|row| row.id).max() {
        let ids: Vec<i64> = batch.rows.iter().map(|row| row.id).collect();
        let times: Vec<i64> = batch.rows.iter().map(|row| row.time_ms).collect();
        let outcomes: Vec<&str> = batch.rows.iter().map(|row| row.outcome).collect();
        let routes: Vec<&str> = batch.rows.iter().map(|row| row.route.as_str()).collect();
        let methods: Vec<&str> = batch.rows.iter().map(|row| row.method.as_str()).collect();
        let targets: Vec<&str> = batch.rows.iter().map(|row| row.target.as_str()).collect();
        let events: Vec<&[u8]> = batch.rows.iter().map(|row| row.json.as_slice()).collect();
        let insert = txn.prepare_cached(INSERT_EVENTS).await?;
        txn.execute(
            &insert,
            &[
                &shared.node,
                &ids,
                &times,
                &outcomes,
                &routes,
                &methods,
                &targets,
                &events,
            ],
        )
        .await?;

        let save_next_id = txn.prepare_cached(SAVE_NEXT_ID).await?;
        txn.execute(&save_next_id, &[&shared.node, &newest.saturating_add(1)])
            .await?;
    }

    if let Some(profile) = &batch.profile {
        let save_profile = txn.prepare_cached(SAVE_PROFILE).await?;
        txn.execute(&save_profile, &[&shared.node, profile]).await?;
    }

    txn.commit().await
}

/// Deletes this node's events beyond `max_events` and older than `max_age`.
async fn apply_retention(client: &Object, shared: &Shared) -> Result<(), tokio_postgres::Error> {
    let keep_offset = i64::try_from(shared.max_events.saturating_sub(1)).unwrap_or(i64::MAX);
    let evict = client.prepare_cached(EVICT_BEYOND_COUNT).await?;
    let mut evicted = client
        .execute(&evict, &[&shared.node, &keep_offset])
        .await?;

    if let Some(max_age) = shared.max_age {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let cutoff_ms = i64::try_from(now_ms.saturating_sub(max_age.as_millis())).unwrap_or(0);
        let evict = client.prepare_cached(EVICT_OLDER_THAN).await?;
        evicted += client.execute(&evict, &[&shared.node, &cutoff_ms]).await?;
    }

    if evicted > 0 {
        debug!(store = %shared.name, evicted, "Retention evicted events");
    }
    Ok(())
}

/// Periodic care: retention, and closing connections that are dead or long unused.
async fn upkeep(shared: &Shared, pool: &Pool) {
    pool.retain(|client, metrics| !client.is_closed() && metrics.last_used() < IDLE_CONNECTION);

    let retention = async {
        let client = pool.get().await.map_err(|error| pool_error(&error))?;
        match tokio::time::timeout(QUERY_TIMEOUT, apply_retention(&client, shared)).await {
            Ok(result) => result.map_err(|error| error.to_string()),
            Err(_) => Err(TimedOut(QUERY_TIMEOUT).to_string()),
        }
    };
    // A failure here is retried at the next upkeep; writes report reachability.
    if let Err(error) = retention.await {
        debug!(store = %shared.name, %error, "Retention failed; retrying at the next upkeep");
    }
}

/// Checks that a connection can be had and answers.
async fn probe(pool: &Pool) -> Result<(), String> {
    let client = pool.get().await.map_err(|error| pool_error(&error))?;
    match tokio::time::timeout(QUERY_TIMEOUT, client.simple_query("SELECT 1")).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => {
            drop(Object::take(client));
            Err(TimedOut(QUERY_TIMEOUT).to_string())
        }
    }
}

/// A pool error as its cause says it: deadpool's wording around it adds nothing.
fn pool_error(error: &PoolError) -> String {
    match error {
        PoolError::Backend(error) => crate::error_chain(error),
        other => other.to_string(),
    }
}

/// Whether retrying a failed write can help. Errors without a SQLSTATE are from the
/// connection; of the rest, connection, resource, operator and transaction-conflict classes
/// pass, and everything else is about the batch itself.
fn classify(error: &tokio_postgres::Error) -> Failure {
    let message = crate::error_chain(error);
    match error
        .code()
        .map(|code| code.code().get(..2).unwrap_or_default())
    {
        None | Some("08" | "40" | "53" | "57" | "58") => Failure::Transient(message),
        Some(_) => Failure::Permanent(message),
    }
}

/// The DSN as it can be shown: the password replaced by `***`, in both the key=value form and
/// the URL form. A key=value string that cannot be read to its end is cut where reading
/// stopped, so a password after a typo is not shown either.
pub(super) fn redact_dsn(dsn: &str) -> String {
    let dsn = dsn.trim();
    for scheme in ["postgresql://", "postgres://"] {
        if let Some(rest) = dsn.strip_prefix(scheme) {
            return format!("{scheme}{}", redact_url_rest(rest));
        }
    }
    redact_key_values(dsn)
}

/// `user:password@host/db?password=...` after the scheme.
fn redact_url_rest(rest: &str) -> String {
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(at) => before_query.split_at(at),
        None => (before_query, ""),
    };

    let authority = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{hosts}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let mut shown = format!("{authority}{path}");
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some(("password", _)) => "password=***".to_owned(),
                _ => param.to_owned(),
            })
            .collect();
        shown.push('?');
        shown.push_str(&params.join("&"));
    }
    shown
}

/// `key=value key='quoted value'` pairs, re-joined with single spaces.
fn redact_key_values(dsn: &str) -> String {
    let mut shown = Vec::new();
    let mut rest = dsn.trim_start();
    while !rest.is_empty() {
        let Some((key, after_key)) = rest.split_once('=') else {
            shown.push("(rest not shown)".to_owned());
            break;
        };
        let key = key.trim();
        if key.is_empty() || key.contains(char::is_whitespace) {
            shown.push("(rest not shown)".to_owned());
            break;
        }

        let after_key = after_key.trim_start();
        let (value, after_value) = match after_key.strip_prefix('\'') {
            Some(quoted) => match quoted_end(quoted) {
                Some(end) => (&after_key[..end + 2], &quoted[end + 1..]),
                None => {
                    shown.push("(rest not shown)".to_owned());
                    break;
                }
            },
            None => {
                let end = after_key
                    .find(char::is_whitespace)
                    .unwrap_or(after_key.len());
                after_key.split_at(end)
            }
        };
        let value = if key == "password" { "***" } else { value };
        shown.push(format!("{key}={value}"));
        rest = after_value.trim_start();
    }
    shown.join(" ")
}

/// The index of the closing quote in a single-quoted value (after its opening quote), where
/// a backslash escapes the next character.
fn quoted_end(quoted: &str) -> Option<usize> {
    let mut escaped = false;
    for (at, char) in quoted.char_indices() {
        match char {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '\'' => return Some(at),
            _ => {}
        }
    }
    None
}
