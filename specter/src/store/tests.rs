//! The store suite, written against `&dyn Store` so every backend runs the same checks, the
//! redb-specific tests (files, locks, damaged rows) and the postgres-specific ones (nodes
//! sharing a database, outages, schema versions).
//!
//! The postgres tests need a real PostgreSQL: `SPECTER_TEST_POSTGRES_DSN`, or the default
//! [`DEFAULT_POSTGRES_DSN`], which `.ci/run` sets up. They fail, rather than skip, when it
//! cannot be reached. Each test works on node names (or a schema) of its own and removes them
//! at the end, so tests run in parallel and again without interfering.

use std::{
    cell::{Cell, RefCell},
    net::{SocketAddr, TcpListener as StdTcpListener, ToSocketAddrs as _},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, ensure};
use serde_json::json;
use tokio::{
    net::{TcpListener, TcpStream},
    runtime::{Handle, Runtime},
    sync::oneshot,
    task::{JoinHandle, JoinSet},
};
use tokio_postgres::{NoTls, config::Host};

use super::{
    Store, StoreError, open,
    postgres::{PostgresStore, Settings, redact_dsn},
    redb::EVENTS,
};
use crate::{
    config::{Config, StoreBackend, StoreSection},
    event::{DiffKind, DiffOp, Difference, Event, Outcome, StoredBody, StoredResponse},
};

/// The node name for stores no other test shares.
const NODE: &str = "test-node";

/// How long the suite waits for a commit to be written.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(20);

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
        commit(store.as_ref(), &events[..2], b"first").unwrap();
        commit(store.as_ref(), &events[2..], b"second").unwrap();
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

/// Commits and waits until the commit is written, as the suite expects to read it back at once.
fn commit(store: &dyn Store, events: &[Event], profile: &[u8]) -> Result<(), StoreError> {
    store.commit(events, profile)?;
    store.flush(FLUSH_TIMEOUT)
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
                severity: crate::event::Severity::Status,
                noise: false,
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
    commit(store, &[diverged.clone(), failed.clone()], b"profile")?;

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
    commit(store, &events[..3], b"")?;
    commit(store, &events[3..], b"")?;

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
    commit(store, &events, b"")?;

    assert_eq!(ids(&store.recent(10, Some("/users"), false)?), [5, 3, 1]);
    assert_eq!(ids(&store.recent(2, Some("/orders"), false)?), [6, 4]);
    assert_eq!(
        ids(&store.recent(10, Some("/nowhere"), false)?),
        Vec::<u64>::new()
    );
    Ok(())
}

fn recent_divergent_only_skips_matched(store: &dyn Store) -> anyhow::Result<()> {
    commit(
        store,
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

    commit(store, &events[..2], b"")?;
    commit(store, &events[2..5], b"")?;
    commit(store, &events[5..6], b"")?;
    assert_eq!(store.len()?, 3);
    assert_eq!(ids(&store.recent(10, None, false)?), [6, 5, 4]);
    assert_eq!(store.get(1)?, None);
    assert_eq!(store.get(3)?, None);
    assert_eq!(store.next_id()?, 7);

    // One batch larger than the cap keeps only its own newest events.
    commit(store, &events[6..], b"")?;
    assert_eq!(store.len()?, 3);
    assert_eq!(ids(&store.recent(10, None, false)?), [12, 11, 10]);
    assert_eq!(store.next_id()?, 13);

    // A commit with only a profile snapshot neither evicts nor moves the ids.
    commit(store, &[], b"snapshot")?;
    assert_eq!(store.len()?, 3);
    assert_eq!(store.next_id()?, 13);
    Ok(())
}

fn latest_profile_snapshot_wins(store: &dyn Store) -> anyhow::Result<()> {
    commit(store, &[], b"first")?;
    assert_eq!(store.load_profile()?.as_deref(), Some(&b"first"[..]));
    assert_eq!(store.next_id()?, 1, "a profile-only commit assigns no id");

    let binary = [0_u8, 159, 146, 150, 255];
    commit(store, &[event(1, "/a", Outcome::Matched)], &binary)?;
    assert_eq!(store.load_profile()?.as_deref(), Some(&binary[..]));

    commit(store, &[], b"")?;
    assert_eq!(store.load_profile()?.as_deref(), Some(&b""[..]));
    Ok(())
}

fn redb_section(path: &Path, max_events: u64) -> StoreSection {
    StoreSection {
        backend: StoreBackend::Redb,
        path: path.to_owned(),
        max_events,
        ..StoreSection::default()
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
        open(&redb_section(&path, max_events), NODE).unwrap()
    });
}

#[test]
fn redb_keeps_everything_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("specter.redb");
    run_reopen_check(|| open(&redb_section(&path, 100), NODE).unwrap());
}

#[test]
fn redb_describes_itself_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("specter.redb");
    let store = open(&redb_section(&path, 100), NODE).unwrap();
    assert_eq!(store.describe(), format!("redb at {}", path.display()));
}

#[test]
fn redb_open_names_the_path_when_its_directory_cannot_be_created() {
    let dir = tempfile::tempdir().unwrap();

    // A regular file where a directory should be: create_dir_all fails even for root.
    let blocker = dir.path().join("not-a-directory");
    std::fs::write(&blocker, b"").unwrap();
    let path = blocker.join("data/specter.redb");

    let error = open(&redb_section(&path, 100), NODE)
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
    let _first = open(&redb_section(&path, 100), NODE).unwrap();

    let error = open(&redb_section(&path, 100), NODE)
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
    open(&redb_section(&path, 100), NODE)?.commit(&events, b"")?;

    // Damage row 2 behind the store's back.
    {
        let db = ::redb::Database::create(&path).context("raw open")?;
        let txn = db.begin_write()?;
        txn.open_table(EVENTS)?.insert(2, &b"{not json"[..])?;
        txn.commit()?;
    }

    let store = open(&redb_section(&path, 100), NODE)?;
    assert_eq!(ids(&store.recent(10, None, false)?), [3, 1]);
    assert_eq!(store.get(2)?, None);
    assert_eq!(store.get(3)?, Some(events[2].clone()));
    assert_eq!(store.next_id()?, 4);
    Ok(())
}

#[test]
fn redb_evicts_events_older_than_max_age() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let section = StoreSection {
        max_age: Some(Duration::from_secs(3600)),
        ..redb_section(&dir.path().join("specter.redb"), 100)
    };
    let store = open(&section, NODE)?;

    store.commit(&aged_events(NODE), b"")?;
    assert_eq!(ids(&store.recent(10, None, false)?), [3]);
    assert_eq!(store.next_id()?, 4);
    Ok(())
}

#[test]
fn config_requires_a_dsn_for_the_postgres_backend() {
    let text = "specter:\n  shadow_target: http://127.0.0.1:1\nstore:\n  backend: postgres\n";
    let error = Config::parse(text, "t")
        .unwrap()
        .validate("t")
        .expect_err("validation must fail");
    let message = error.to_string();
    assert!(message.contains("store.postgres_dsn"), "{message}");
    assert!(message.contains("store.backend is postgres"), "{message}");

    let empty = format!("{text}  postgres_dsn: \"  \"\n");
    let error = Config::parse(&empty, "t")
        .unwrap()
        .validate("t")
        .expect_err("an empty DSN must fail");
    assert!(error.to_string().contains("(empty)"), "{error}");
}

#[test]
fn config_reads_the_postgres_dsn_and_max_age() {
    let text = "specter:\n  shadow_target: http://127.0.0.1:1\nstore:\n  backend: postgres\n  \
                postgres_dsn: host=db user=specter\n  max_age: 7d\n";
    let validated = Config::parse(text, "t").unwrap().validate("t").unwrap();
    let store = validated.config.store;
    assert_eq!(store.backend, StoreBackend::Postgres);
    assert_eq!(store.postgres_dsn.as_deref(), Some("host=db user=specter"));
    assert_eq!(store.max_age, Some(Duration::from_secs(7 * 24 * 3600)));

    let zero = "specter:\n  shadow_target: http://127.0.0.1:1\nstore:\n  max_age: 0s\n";
    let error = Config::parse(zero, "t").unwrap().validate("t").err();
    assert!(
        error.is_some_and(|error| error.to_string().contains("store.max_age")),
        "a zero max_age must be refused"
    );
}

#[test]
fn dsn_is_shown_without_its_password() {
    let cases = [
        (
            "host=db user=specter password=hunter2 dbname=specter",
            "host=db user=specter password=*** dbname=specter",
        ),
        (
            "host=db  password = 'hunter 2\\' x'   dbname=specter",
            "host=db password=*** dbname=specter",
        ),
        (
            "postgresql://specter:hunter2@db:5432/specter?sslmode=disable",
            "postgresql://specter:***@db:5432/specter?sslmode=disable",
        ),
        (
            "postgres://specter@db/specter?password=hunter2&application_name=x",
            "postgres://specter@db/specter?password=***&application_name=x",
        ),
        ("host=db oops password=hunter2", "host=db (rest not shown)"),
        ("host=db password='hunter2", "host=db (rest not shown)"),
    ];
    for (dsn, shown) in cases {
        assert_eq!(redact_dsn(dsn), shown, "{dsn}");
    }
}

/// Three events for `node`: two from two hours ago, one from now.
fn aged_events(node: &str) -> Vec<Event> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    (1..=3)
        .map(|id| Event {
            time_ms: if id < 3 {
                now_ms - 2 * 3600 * 1000
            } else {
                now_ms
            },
            node: node.to_owned(),
            ..event(id, "/a", Outcome::Diverged)
        })
        .collect()
}

/// The server the postgres tests use when `SPECTER_TEST_POSTGRES_DSN` is not set.
const DEFAULT_POSTGRES_DSN: &str =
    "host=127.0.0.1 user=postgres password=postgres dbname=specter_test";

/// The test server, its runtime, and the nodes and schemas a test made there, which are
/// removed when it ends.
struct Postgres {
    runtime: Runtime,
    dsn: String,
    config: tokio_postgres::Config,
    nodes: RefCell<Vec<String>>,
    schemas: RefCell<Vec<String>>,
}

impl Postgres {
    /// Fails the test, saying what to do, when the server cannot be reached.
    fn new() -> Self {
        let dsn = std::env::var("SPECTER_TEST_POSTGRES_DSN")
            .unwrap_or_else(|_| DEFAULT_POSTGRES_DSN.to_owned());
        let config: tokio_postgres::Config = dsn
            .parse()
            .unwrap_or_else(|error| panic!("SPECTER_TEST_POSTGRES_DSN is not a DSN: {error}"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let postgres = Self {
            runtime,
            dsn,
            config,
            nodes: RefCell::default(),
            schemas: RefCell::default(),
        };
        if let Err(error) = postgres.execute("SELECT 1") {
            panic!(
                "the postgres store tests need PostgreSQL at {}: {error:#}; start it and create \
                 the database as .ci/run does, or point SPECTER_TEST_POSTGRES_DSN at one",
                redact_dsn(&postgres.dsn)
            );
        }
        postgres
    }

    /// A node name no other test, and no earlier run, uses.
    fn node(&self, label: &str) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let node = format!(
            "test-{label}-{}-{nanos}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.nodes.borrow_mut().push(node.clone());
        node
    }

    /// A schema of the test's own, and a DSN whose tables live there.
    fn schema(&self, label: &str) -> (String, String) {
        let schema = self.node(label).replace('-', "_");
        self.execute(&format!("CREATE SCHEMA {schema}")).unwrap();
        self.schemas.borrow_mut().push(schema.clone());
        let dsn = self.dsn_to(
            None,
            &[("options", format!("-c search_path={schema}").as_str())],
        );
        (schema, dsn)
    }

    fn settings(&self, node: &str, max_events: u64) -> Settings {
        Settings {
            dsn: self.dsn.clone(),
            node: node.to_owned(),
            max_events,
            max_age: None,
            max_buffered: super::postgres::DEFAULT_MAX_BUFFERED,
        }
    }

    fn open(&self, settings: Settings) -> Result<Arc<dyn Store>, StoreError> {
        let _runtime = self.runtime.enter();
        Ok(Arc::new(PostgresStore::open(settings)?))
    }

    /// Through the config, as the daemon opens it.
    fn open_section(&self, node: &str, max_events: u64) -> Arc<dyn Store> {
        let section = StoreSection {
            backend: StoreBackend::Postgres,
            postgres_dsn: Some(self.dsn.clone()),
            max_events,
            ..StoreSection::default()
        };
        let _runtime = self.runtime.enter();
        open(&section, node).unwrap()
    }

    /// The test DSN's user, password and database, at another address and with more keys.
    fn dsn_to(&self, address: Option<SocketAddr>, extra: &[(&str, &str)]) -> String {
        let (host, port) = match address {
            Some(address) => (address.ip().to_string(), address.port()),
            None => {
                let address = self.address();
                (address.ip().to_string(), address.port())
            }
        };
        let password = self
            .config
            .get_password()
            .map(|password| String::from_utf8_lossy(password).into_owned());
        let mut pairs = vec![("host", host), ("port", port.to_string())];
        if let Some(user) = self.config.get_user() {
            pairs.push(("user", user.to_owned()));
        }
        if let Some(password) = password {
            pairs.push(("password", password));
        }
        if let Some(dbname) = self.config.get_dbname() {
            pairs.push(("dbname", dbname.to_owned()));
        }
        pairs.extend(extra.iter().map(|(key, value)| (*key, (*value).to_owned())));
        pairs
            .iter()
            .map(|(key, value)| {
                let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
                format!("{key}='{quoted}'")
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The test server's TCP address.
    fn address(&self) -> SocketAddr {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            Some(Host::Unix(path)) => panic!(
                "the postgres tests need a TCP host in SPECTER_TEST_POSTGRES_DSN, not {}",
                path.display()
            ),
            None => "localhost".to_owned(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        (host.as_str(), port)
            .to_socket_addrs()
            .unwrap()
            .next()
            .unwrap()
    }

    /// Runs SQL on a connection of its own, outside any store.
    fn execute(&self, sql: &str) -> anyhow::Result<()> {
        self.runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&self.dsn, NoTls).await?;
            let connection = tokio::spawn(connection);
            client.batch_execute(sql).await?;
            drop(client);
            let _ = connection.await;
            Ok(())
        })
    }

    /// Runs a query with one integer answer on a connection of its own.
    fn query_i64(&self, sql: &str) -> anyhow::Result<i64> {
        self.runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&self.dsn, NoTls).await?;
            let connection = tokio::spawn(connection);
            let value = client.query_one(sql, &[]).await?.get(0);
            drop(client);
            let _ = connection.await;
            Ok(value)
        })
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // One statement at a time: where no store migrated there are no tables, and that
        // must not keep the rest from running.
        for schema in self.schemas.borrow().iter() {
            let _ = self.execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
        }
        for node in self.nodes.borrow().iter() {
            for table in ["specter_events", "specter_profiles", "specter_nodes"] {
                let _ = self.execute(&format!("DELETE FROM {table} WHERE node = '{node}'"));
            }
        }
    }
}

/// A TCP relay in front of the test server that can be cut and restored, to play an outage.
struct Relay {
    handle: Handle,
    port: u16,
    upstream: SocketAddr,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Relay {
    fn start(handle: &Handle, upstream: SocketAddr) -> Self {
        let listener = handle.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let mut relay = Self {
            handle: handle.clone(),
            port: listener.local_addr().unwrap().port(),
            upstream,
            running: None,
        };
        relay.serve(listener);
        relay
    }

    fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn serve(&mut self, listener: TcpListener) {
        let upstream = self.upstream;
        let (stop, mut stopped) = oneshot::channel();
        let task = self.handle.spawn(async move {
            let mut links = JoinSet::new();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { continue };
                        links.spawn(async move {
                            if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
                                    .await;
                            }
                        });
                    }
                }
            }
            // Every relayed connection closes with the listener, as when the server goes away.
            links.shutdown().await;
        });
        self.running = Some((stop, task));
    }

    /// Closes the port and every connection through it; returns once they are closed.
    fn cut(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(());
            let _ = self.handle.block_on(task);
        }
    }

    /// Listens on the same port again.
    fn restore(&mut self) {
        let listener = self
            .handle
            .block_on(TcpListener::bind(self.address()))
            .unwrap();
        self.serve(listener);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}

#[test]
fn postgres_passes_the_store_suite() {
    let postgres = Postgres::new();
    run_suite(|max_events| {
        let node = postgres.node("suite");
        postgres.open_section(&node, max_events)
    });
}

#[test]
fn postgres_keeps_everything_across_reopen() {
    let postgres = Postgres::new();
    let node = postgres.node("reopen");
    run_reopen_check(|| postgres.open(postgres.settings(&node, 100)).unwrap());
}

#[test]
fn postgres_nodes_sharing_a_database_see_only_their_own_rows() -> anyhow::Result<()> {
    let postgres = Postgres::new();
    let (a, b) = (postgres.node("shared-a"), postgres.node("shared-b"));
    let store_a = postgres.open(postgres.settings(&a, 100))?;
    let store_b = postgres.open(postgres.settings(&b, 100))?;

    // Far-future times sort these first among every node's events, whatever else the
    // database holds.
    let events_for = |node: &str, count: u64| -> Vec<Event> {
        (1..=count)
            .map(|id| Event {
                time_ms: 4_000_000_000_000 + id,
                node: node.to_owned(),
                ..event(id, &format!("/{node}"), Outcome::Diverged)
            })
            .collect()
    };
    commit(store_a.as_ref(), &events_for(&a, 3), b"profile a")?;
    commit(store_b.as_ref(), &events_for(&b, 2), b"profile b")?;

    assert_eq!(ids(&store_a.recent(10, None, false)?), [3, 2, 1]);
    assert_eq!(ids(&store_b.recent(10, None, false)?), [2, 1]);
    assert_eq!(store_a.len()?, 3);
    assert_eq!(store_b.len()?, 2);
    assert_eq!(store_a.next_id()?, 4);
    assert_eq!(store_b.next_id()?, 3);
    assert_eq!(store_a.get(3)?.map(|event| event.node), Some(a.clone()));
    assert_eq!(store_b.get(3)?, None);
    assert_eq!(store_a.load_profile()?.as_deref(), Some(&b"profile a"[..]));
    assert_eq!(store_b.load_profile()?.as_deref(), Some(&b"profile b"[..]));

    // Only the cluster view crosses nodes.
    let all: Vec<(String, u64)> = store_b
        .recent_all_nodes(5, None, false)?
        .into_iter()
        .map(|event| (event.node, event.id))
        .collect();
    let mut expected = vec![(a.clone(), 3), (a.clone(), 2), (b.clone(), 2)];
    expected.extend([(a.clone(), 1), (b.clone(), 1)]);
    assert_eq!(all, expected);
    Ok(())
}

#[test]
fn postgres_evicts_events_older_than_max_age() -> anyhow::Result<()> {
    let postgres = Postgres::new();
    let node = postgres.node("age");
    let store = postgres.open(Settings {
        max_age: Some(Duration::from_secs(3600)),
        ..postgres.settings(&node, 100)
    })?;

    commit(store.as_ref(), &aged_events(&node), b"")?;
    assert_eq!(ids(&store.recent(10, None, false)?), [3]);
    assert_eq!(store.next_id()?, 4);
    Ok(())
}

#[test]
fn postgres_buffers_while_unreachable_and_writes_when_back() -> anyhow::Result<()> {
    let postgres = Postgres::new();
    let mut relay = Relay::start(postgres.runtime.handle(), postgres.address());
    let node = postgres.node("outage");
    let store = postgres.open(Settings {
        dsn: postgres.dsn_to(Some(relay.address()), &[]),
        max_buffered: 100,
        ..postgres.settings(&node, 1000)
    })?;
    let events: Vec<Event> = (1..=130)
        .map(|id| event(id, "/a", Outcome::Diverged))
        .collect();
    commit(store.as_ref(), &events[..5], b"before")?;
    assert!(store.health().connected);

    // Commits while the server is gone return at once; the buffer takes 100 events and the
    // rest are counted as dropped.
    relay.cut();
    let started = Instant::now();
    for chunk in events[5..].chunks(25) {
        store.commit(chunk, b"during")?;
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "commits took {:?}",
        started.elapsed()
    );
    let health = store.health();
    assert_eq!((health.buffered, health.dropped), (100, 25), "{health:?}");

    let deadline = Instant::now() + Duration::from_secs(10);
    while store.health().connected {
        ensure!(Instant::now() < deadline, "health still says connected");
        std::thread::sleep(Duration::from_millis(20));
    }
    let health = store.health();
    assert!(health.last_error.is_some(), "{health:?}");
    let error = store
        .flush(Duration::from_millis(200))
        .err()
        .context("flush must time out while the server is gone")?;
    assert!(
        matches!(error, StoreError::NotFlushed { buffered: 100, .. }),
        "{error}"
    );

    // Back: the buffered events are written, the dropped ones are not.
    relay.restore();
    store.flush(Duration::from_secs(30))?;
    let health = store.health();
    assert!(health.connected, "{health:?}");
    assert_eq!((health.buffered, health.dropped), (0, 25), "{health:?}");
    assert_eq!(store.len()?, 105);
    assert_eq!(
        ids(&store.recent(200, None, false)?),
        (1..=105).rev().collect::<Vec<_>>()
    );
    assert_eq!(store.get(106)?, None);
    assert_eq!(
        store.next_id()?,
        131,
        "dropped ids are not handed out again"
    );
    assert_eq!(store.load_profile()?.as_deref(), Some(&b"during"[..]));
    Ok(())
}

#[test]
fn events_the_backend_drops_count_as_store_drops_in_the_profile() -> anyhow::Result<()> {
    use crate::{
        pipeline::{Record, run_recorder},
        profile::Profile,
    };

    let postgres = Postgres::new();
    let mut relay = Relay::start(postgres.runtime.handle(), postgres.address());
    let node = postgres.node("recorder-outage");
    let store = postgres.open(Settings {
        dsn: postgres.dsn_to(Some(relay.address()), &[]),
        max_buffered: 100,
        ..postgres.settings(&node, 1000)
    })?;
    let profile = Arc::new(Profile::new());
    let (records, receiver) = std::sync::mpsc::channel();
    let recorder = {
        let (store, profile) = (store.clone(), profile.clone());
        std::thread::spawn(move || run_recorder(store, profile, receiver))
    };

    relay.cut();
    for id in 1..=130 {
        records.send(Record::Event(Box::new(event(id, "/a", Outcome::Diverged))))?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while profile.counters().store_dropped < 30 {
        ensure!(
            Instant::now() < deadline,
            "store_dropped is {}, the backend dropped {}",
            profile.counters().store_dropped,
            store.health().dropped
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(store.health().dropped, 30);

    relay.restore();
    records.send(Record::Stop)?;
    recorder.join().expect("recorder thread");
    assert_eq!(profile.counters().store_dropped, 30, "counted once");
    assert_eq!(store.len()?, 100);
    Ok(())
}

#[test]
fn postgres_open_fails_fast_and_clearly_when_the_server_is_unreachable() {
    let postgres = Postgres::new();
    let closed_port = {
        let listener = StdTcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let dsn = format!("host=127.0.0.1 port={closed_port} user=specter password=hunter2");

    let started = Instant::now();
    let error = postgres
        .open(Settings {
            dsn,
            ..postgres.settings("unreachable", 100)
        })
        .err()
        .expect("open must fail");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        matches!(error, StoreError::PostgresConnect { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&format!("port={closed_port}")),
        "{message}"
    );
    assert!(message.contains("store.postgres_dsn"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
}

#[test]
fn postgres_migrates_an_empty_schema_and_refuses_a_newer_one() -> anyhow::Result<()> {
    let postgres = Postgres::new();
    let (schema, dsn) = postgres.schema("schema");
    let node = postgres.node("schema");
    let settings = Settings {
        dsn,
        ..postgres.settings(&node, 100)
    };

    let store = postgres.open(settings.clone())?;
    commit(store.as_ref(), &[event(1, "/a", Outcome::Matched)], b"")?;
    drop(store);
    let version = postgres.query_i64(&format!(
        "SELECT version::bigint FROM {schema}.specter_schema"
    ))?;
    assert_eq!(version, 1);
    let rows = postgres.query_i64(&format!("SELECT count(*) FROM {schema}.specter_events"))?;
    assert_eq!(rows, 1);

    // Opening again leaves a current schema alone.
    assert_eq!(postgres.open(settings.clone())?.len()?, 1);

    postgres.execute(&format!("UPDATE {schema}.specter_schema SET version = 99"))?;
    let error = postgres
        .open(settings)
        .err()
        .context("a newer schema must be refused")?;
    assert!(
        matches!(
            error,
            StoreError::PostgresSchemaTooNew {
                found: 99,
                known: 1,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("upgrade specter"), "{error}");
    Ok(())
}
