//! The YAML configuration: its sections, defaults and validation.
//!
//! A config is read whole and checked whole before anything starts, so Specter never runs with
//! half of a config applied. Every error names the key, the value and what was expected.
//! `docs/configuration.md` documents every key and default.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;
use thiserror::Error;

/// Everything that can go wrong reading a config.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {origin}: key `{key}`: {message}")]
    Parse {
        origin: String,
        key: String,
        message: String,
    },
    #[error("config {origin}: key `{key}` has value {value:?}, expected {expected}")]
    Invalid {
        origin: String,
        key: String,
        value: String,
        expected: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub specter: SpecterSection,
    pub sampling: SamplingSection,
    pub replay: ReplaySection,
    pub capture: CaptureSection,
    pub store: StoreSection,
    pub api: ApiSection,
    pub cluster: Option<ClusterSection>,
    pub compare: CompareSection,
    pub routes: RoutesSection,
}

/// Where traffic comes from and goes to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpecterSection {
    /// Proxy mode listens here (and attach mode falls back to it).
    pub listen: Option<SocketAddr>,
    /// The live service.
    pub live_target: Option<String>,
    /// The candidate service requests are replayed to.
    pub shadow_target: Option<String>,
    /// A second copy of the live version. When set, every mirrored request is replayed to it
    /// too, and what differs between live and secondary is learned as noise.
    pub secondary_target: Option<String>,
    /// Header whose value identifies a user; drives sampling and ownership.
    pub routing_key: Option<String>,
    /// How long the proxy waits for the live service to start answering.
    #[serde(with = "humantime_serde")]
    pub live_timeout: Duration,
    /// How long the proxy waits to connect to the live service.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// On shutdown, how long in-flight replays may take to finish.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for SpecterSection {
    fn default() -> Self {
        Self {
            listen: None,
            live_target: None,
            shadow_target: None,
            secondary_target: None,
            routing_key: None,
            live_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Which exchanges are mirrored and which are stored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingSection {
    /// Share of exchanges mirrored, 0.0 to 1.0.
    pub rate: f64,
    /// Store only divergent exchanges (counters still count everything).
    pub divergence_only: bool,
}

impl Default for SamplingSection {
    fn default() -> Self {
        Self {
            rate: 1.0,
            divergence_only: false,
        }
    }
}

/// How requests are replayed to the shadow.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplaySection {
    /// Methods that are replayed; others are counted as `skipped_unsafe`.
    pub methods: Vec<String>,
    /// Send the live Host header to the shadow instead of the shadow's own.
    pub preserve_host: bool,
    /// How long a replay may take, headers and body.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Replays in flight at once.
    pub concurrency: usize,
    /// Exchanges waiting for a replay slot; beyond it they are dropped and counted.
    pub queue_size: usize,
}

impl Default for ReplaySection {
    fn default() -> Self {
        Self {
            methods: vec!["GET".into(), "HEAD".into(), "OPTIONS".into()],
            preserve_host: false,
            timeout: Duration::from_secs(10),
            concurrency: 32,
            queue_size: 4096,
        }
    }
}

/// What is captured, and the limits on it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureSection {
    /// Bodies longer than this are passed through but not compared.
    pub max_body_bytes: usize,
    /// Attach mode: the live service's ports (`--port` adds to them).
    pub ports: Vec<u16>,
    /// Attach mode: size of the BPF ring buffer, a power of two.
    pub ring_bytes: u32,
    /// Attach mode: a connection silent this long is forgotten.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Attach mode: out-of-order bytes held per connection direction before declaring a gap.
    pub max_out_of_order_bytes: usize,
    /// When set, one JSON line per captured exchange is written here (see docs/operations.md).
    pub exchange_log: Option<PathBuf>,
}

impl Default for CaptureSection {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            ports: Vec::new(),
            ring_bytes: 64 * 1024 * 1024,
            idle_timeout: Duration::from_secs(120),
            max_out_of_order_bytes: 1024 * 1024,
            exchange_log: None,
        }
    }
}

/// Which store backend is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// One embedded file at `store.path`.
    Redb,
    /// A PostgreSQL database at `store.postgres_dsn`, which several nodes may share.
    Postgres,
}

/// Where divergence events and counters are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    pub backend: StoreBackend,
    /// The redb file.
    pub path: PathBuf,
    /// The PostgreSQL connection string, e.g. "host=127.0.0.1 user=specter dbname=specter";
    /// required when `backend` is `postgres`.
    pub postgres_dsn: Option<String>,
    /// Events kept per node; the oldest are evicted beyond it.
    pub max_events: u64,
    /// When set, events older than this (by request time) are evicted too.
    #[serde(with = "humantime_serde")]
    pub max_age: Option<Duration>,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Redb,
            path: PathBuf::from("./data/specter.redb"),
            postgres_dsn: None,
            max_events: 100_000,
            max_age: None,
        }
    }
}

/// The admin HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    pub listen: SocketAddr,
}

impl Default for ApiSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

/// How responses are compared, how noise is learned, and how the verdict is reached. See
/// `docs/analysis.md` for what each key does to the figures.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompareSection {
    /// Header names never compared because they differ between any two responses. Replaces
    /// the default list (`compare::DEFAULT_VOLATILE_HEADERS`) when given.
    pub volatile_headers: Vec<String>,
    /// Headers whose comma-separated values are compared as a set, ignoring order.
    pub set_headers: Vec<String>,
    /// Differences never reported: a header name or a JSON path pattern, optionally only on
    /// routes matching a pattern.
    pub ignore: Vec<IgnoreRuleConfig>,
    /// JSON arrays compared as multisets (order ignored), by path pattern.
    pub unordered: Vec<UnorderedRuleConfig>,
    /// Differences kept per exchange; the total found is kept too.
    pub max_differences: usize,
    /// Share of mirrored safe requests replayed to the shadow a second time to learn the
    /// shadow's own noise (without a secondary target).
    pub noise_sample_rate: f64,
    /// Comparisons a route needs before its fields are classified and its verdict given.
    pub min_samples: u64,
    /// Noise comparisons a route needs (from one source) before its fields are classified.
    pub min_noise_samples: u64,
    /// How many standard errors a field's difference rate must stand above its noise rate to
    /// be a divergence (one-sided two-proportion z-test).
    pub noise_z: f64,
    /// How far, at least, a field's difference rate must stand above its noise rate to be a
    /// divergence, as a fraction.
    pub noise_margin: f64,
    /// The shadow is flagged slower on a route when its p90 latency exceeds the live p90 by
    /// this factor.
    pub latency_ratio: f64,
    /// Fields tracked per route; differences on further fields are counted, never hidden.
    pub max_fields_per_route: usize,
    /// Memory for the last live response of each distinct safe request, used to learn live
    /// noise from repeated requests.
    pub live_noise_cache_bytes: usize,
}

impl Default for CompareSection {
    fn default() -> Self {
        Self {
            volatile_headers: crate::compare::DEFAULT_VOLATILE_HEADERS
                .iter()
                .map(|h| (*h).to_owned())
                .collect(),
            set_headers: crate::compare::DEFAULT_SET_HEADERS
                .iter()
                .map(|h| (*h).to_owned())
                .collect(),
            ignore: Vec::new(),
            unordered: Vec::new(),
            max_differences: 100,
            noise_sample_rate: 0.05,
            min_samples: 100,
            min_noise_samples: 20,
            noise_z: 3.0,
            noise_margin: 0.05,
            latency_ratio: 1.2,
            max_fields_per_route: 200,
            live_noise_cache_bytes: 8 * 1024 * 1024,
        }
    }
}

/// One `compare.ignore` entry: exactly one of `header` and `path`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IgnoreRuleConfig {
    /// A route pattern (`GET /users/*`); every route when absent.
    pub route: Option<String>,
    /// A header name, any case.
    pub header: Option<String>,
    /// A JSON Pointer pattern: `*` matches one token, `**` any number (`/items/*/updated_at`).
    pub path: Option<String>,
}

/// One `compare.unordered` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnorderedRuleConfig {
    /// A route pattern; every route when absent.
    pub route: Option<String>,
    /// A JSON Pointer pattern naming arrays.
    pub path: String,
}

/// How exchanges are grouped into routes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutesSection {
    /// Route patterns tried before the automatic templates, first match wins:
    /// `GET /users/{id}/avatar`, `* /static/**`.
    pub patterns: Vec<String>,
    /// Distinct literal values one path segment position may show before it is treated as a
    /// variable (`{id}`).
    pub max_segment_values: usize,
}

impl Default for RoutesSection {
    fn default() -> Self {
        Self {
            patterns: Vec::new(),
            max_segment_values: 100,
        }
    }
}

/// The cluster this node belongs to (see `cluster`); with no section Specter is a single node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// This node's name in the cluster, unique among its members; defaults to the host name.
    pub node_name: Option<String>,
    /// Gossip (membership) listens here, on TCP and UDP.
    pub bind_addr: SocketAddr,
    /// The gossip address the other members use; required when `bind_addr` is a wildcard. Its
    /// IP is also advertised for the admin API and the forward channel when those listen on a
    /// wildcard.
    pub advertise_addr: Option<SocketAddr>,
    /// `host:port` gossip addresses of nodes to join through (seeds); one is enough.
    pub peers: Vec<String>,
    /// A file whose contents are the cluster secret (`SPECTER_CLUSTER_SECRET` may hold it
    /// instead). It keys gossip encryption and the forward channel's authentication.
    pub secret_file: Option<PathBuf>,
    /// Points each member takes on the consistent-hash ring.
    pub vnodes: usize,
    /// The node-to-node forward channel listens here; defaults to `bind_addr` with the next
    /// port.
    pub forward_addr: Option<SocketAddr>,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            node_name: None,
            bind_addr: SocketAddr::from(([0, 0, 0, 0], 7946)),
            advertise_addr: None,
            peers: Vec::new(),
            secret_file: None,
            vnodes: 128,
            forward_addr: None,
        }
    }
}

/// The environment variable that may hold the cluster secret instead of `cluster.secret_file`.
pub const CLUSTER_SECRET_ENV: &str = "SPECTER_CLUSTER_SECRET";

impl ClusterSection {
    /// The address the forward channel listens on.
    pub fn forward_listen(&self) -> SocketAddr {
        self.forward_addr.unwrap_or_else(|| {
            SocketAddr::new(self.bind_addr.ip(), self.bind_addr.port().wrapping_add(1))
        })
    }

    /// Checks the cluster keys; `invalid` builds the error for a key.
    fn validate(
        &self,
        invalid: impl Fn(&str, String, &str) -> ConfigError,
    ) -> Result<(), ConfigError> {
        if let Some(name) = self.node_name.as_ref().filter(|n| !valid_node_name(n)) {
            return Err(invalid(
                "cluster.node_name",
                name.clone(),
                "1 to 128 letters, digits, '-', '_' or '.'",
            ));
        }
        if self.bind_addr.port() == 0 {
            return Err(invalid(
                "cluster.bind_addr",
                self.bind_addr.to_string(),
                "an address with a fixed port, like 0.0.0.0:7946",
            ));
        }
        match self.advertise_addr {
            Some(addr) if addr.ip().is_unspecified() || addr.port() == 0 => {
                return Err(invalid(
                    "cluster.advertise_addr",
                    addr.to_string(),
                    "an address other nodes can reach, with its port",
                ));
            }
            None if self.bind_addr.ip().is_unspecified() => {
                return Err(invalid(
                    "cluster.advertise_addr",
                    "(missing)".into(),
                    "the address other nodes reach this one at, since cluster.bind_addr is a \
                     wildcard",
                ));
            }
            _ => {}
        }
        for peer in &self.peers {
            let valid = peer
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(invalid(
                    "cluster.peers",
                    peer.clone(),
                    "host:port gossip addresses, like 10.0.0.1:7946",
                ));
            }
        }
        if !(1..=4096).contains(&self.vnodes) {
            return Err(invalid(
                "cluster.vnodes",
                self.vnodes.to_string(),
                "a number of ring points per member from 1 to 4096 (128 by default)",
            ));
        }
        if self.forward_addr.is_none() && self.bind_addr.port() == u16::MAX {
            return Err(invalid(
                "cluster.forward_addr",
                "(missing)".into(),
                "an address, since cluster.bind_addr's port has no next port",
            ));
        }
        if let Some(addr) = self.forward_addr
            && addr.port() == 0
        {
            return Err(invalid(
                "cluster.forward_addr",
                addr.to_string(),
                "an address with a fixed port",
            ));
        }
        if self.forward_listen() == self.bind_addr {
            return Err(invalid(
                "cluster.forward_addr",
                self.forward_listen().to_string(),
                "an address other than cluster.bind_addr",
            ));
        }
        if self.secret_file.is_none() && std::env::var_os(CLUSTER_SECRET_ENV).is_none() {
            return Err(invalid(
                "cluster.secret_file",
                "(missing)".into(),
                "a file holding the cluster secret (or the secret in SPECTER_CLUSTER_SECRET): \
                 without it anyone who reaches the gossip port could join",
            ));
        }
        Ok(())
    }
}

/// A parsed `http://host:port/prefix` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port` as written, used for the Host header.
    pub authority: String,
    /// The path prefix requests are placed under, without a trailing slash ("" for none).
    pub path_prefix: String,
}

impl Target {
    /// Parses a target URL; `key` names it in errors.
    pub fn parse(key: &str, value: &str, origin: &str) -> Result<Self, ConfigError> {
        let invalid = |expected: &str| ConfigError::Invalid {
            origin: origin.to_owned(),
            key: key.to_owned(),
            value: value.to_owned(),
            expected: expected.to_owned(),
        };
        let uri: http::Uri = value
            .parse()
            .map_err(|_| invalid("a URL like http://host:port"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(_) => return Err(invalid("an http:// URL (TLS targets are not supported)")),
            None => return Err(invalid("a URL with a scheme, like http://host:port")),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| invalid("a URL with a host"))?;
        if uri.query().is_some() {
            return Err(invalid("a URL without a query string"));
        }
        let authority = if authority.port().is_some() {
            authority.to_string()
        } else {
            format!("{}:80", authority.host())
        };
        Ok(Self {
            authority,
            path_prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The request target to send: the prefix, then the original path and query.
    pub fn place(&self, path_and_query: &str) -> String {
        format!("{}{}", self.path_prefix, path_and_query)
    }
}

/// A config that passed validation, with its targets parsed.
#[derive(Debug, Clone)]
pub struct Validated {
    pub config: Config,
    pub live: Option<Target>,
    pub shadow: Target,
    /// `specter.secondary_target`, parsed.
    pub secondary: Option<Target>,
    /// Upper-cased methods that are replayed.
    pub replay_methods: Vec<String>,
    /// The routing-key header, lower-cased.
    pub routing_key: Option<String>,
    pub node_name: String,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &std::path::Path) -> Result<Validated, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())?.validate(&path.display().to_string())
    }

    /// Parses YAML text; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(deserializer).map_err(|err| {
            let key = err.path().to_string();
            ConfigError::Parse {
                origin: origin.to_owned(),
                key: if key == "." {
                    "(top level)".to_owned()
                } else {
                    key
                },
                message: err.into_inner().to_string(),
            }
        })
    }

    /// Checks every value and resolves the targets.
    pub fn validate(self, origin: &str) -> Result<Validated, ConfigError> {
        let invalid = |key: &str, value: String, expected: &str| ConfigError::Invalid {
            origin: origin.to_owned(),
            key: key.to_owned(),
            value,
            expected: expected.to_owned(),
        };

        let rate = self.sampling.rate;
        if !(0.0..=1.0).contains(&rate) {
            return Err(invalid(
                "sampling.rate",
                rate.to_string(),
                "a number from 0.0 to 1.0",
            ));
        }

        let shadow = match &self.specter.shadow_target {
            Some(url) => Target::parse("specter.shadow_target", url, origin)?,
            None => {
                return Err(invalid(
                    "specter.shadow_target",
                    "(missing)".into(),
                    "a URL",
                ));
            }
        };
        let live = match &self.specter.live_target {
            Some(url) => Some(Target::parse("specter.live_target", url, origin)?),
            None => None,
        };
        let secondary = match &self.specter.secondary_target {
            Some(url) => Some(Target::parse("specter.secondary_target", url, origin)?),
            None => None,
        };
        self.validate_analysis(origin)?;

        let mut replay_methods = Vec::new();
        for method in &self.replay.methods {
            let valid = !method.is_empty() && method.bytes().all(|b| b.is_ascii_alphabetic());
            if !valid {
                return Err(invalid(
                    "replay.methods",
                    method.clone(),
                    "HTTP method names",
                ));
            }
            replay_methods.push(method.to_ascii_uppercase());
        }
        if self.replay.concurrency == 0 {
            return Err(invalid("replay.concurrency", "0".into(), "at least 1"));
        }
        if self.replay.queue_size == 0 {
            return Err(invalid("replay.queue_size", "0".into(), "at least 1"));
        }
        if self.replay.timeout.is_zero() {
            return Err(invalid(
                "replay.timeout",
                "0s".into(),
                "a duration above zero",
            ));
        }
        if self.capture.max_body_bytes == 0 {
            return Err(invalid("capture.max_body_bytes", "0".into(), "at least 1"));
        }
        let ring = self.capture.ring_bytes;
        if ring < 4096 || !ring.is_power_of_two() {
            return Err(invalid(
                "capture.ring_bytes",
                ring.to_string(),
                "a power of two of at least 4096 (e.g. 67108864 for 64 MiB)",
            ));
        }
        if self.capture.ports.len() > specter_common::MAX_PORTS as usize {
            return Err(invalid(
                "capture.ports",
                format!("{} ports", self.capture.ports.len()),
                &format!("at most {} ports", specter_common::MAX_PORTS),
            ));
        }
        for (key, value) in [
            ("capture.idle_timeout", self.capture.idle_timeout),
            ("specter.live_timeout", self.specter.live_timeout),
            ("specter.connect_timeout", self.specter.connect_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "0s".into(), "a duration above zero"));
            }
        }
        if self.capture.max_out_of_order_bytes == 0 {
            return Err(invalid(
                "capture.max_out_of_order_bytes",
                "0".into(),
                "at least 1",
            ));
        }
        if self.capture.ports.contains(&0) {
            return Err(invalid(
                "capture.ports",
                "0".into(),
                "TCP ports from 1 to 65535",
            ));
        }
        if self.store.max_events == 0 {
            return Err(invalid("store.max_events", "0".into(), "at least 1"));
        }
        if self.store.max_age.is_some_and(|age| age.is_zero()) {
            return Err(invalid(
                "store.max_age",
                "0s".into(),
                "a duration above zero, or no key to keep events of any age",
            ));
        }
        let dsn_given = self
            .store
            .postgres_dsn
            .as_deref()
            .is_some_and(|dsn| !dsn.trim().is_empty());
        if self.store.backend == StoreBackend::Postgres && !dsn_given {
            let value = match &self.store.postgres_dsn {
                Some(_) => "(empty)",
                None => "(missing)",
            };
            return Err(invalid(
                "store.postgres_dsn",
                value.into(),
                "a PostgreSQL connection string like \"host=127.0.0.1 user=specter \
                 dbname=specter\" when store.backend is postgres",
            ));
        }

        let routing_key = match &self.specter.routing_key {
            Some(name) if http::HeaderName::from_bytes(name.as_bytes()).is_err() => {
                return Err(invalid(
                    "specter.routing_key",
                    name.clone(),
                    "a header name",
                ));
            }
            Some(name) => Some(name.to_ascii_lowercase()),
            None => None,
        };

        if let Some(cluster) = &self.cluster {
            cluster.validate(invalid)?;
            // The other members read this node's figures from its admin API; on loopback they
            // would each reach their own.
            let advertised = cluster.advertise_addr.unwrap_or(cluster.bind_addr).ip();
            if self.api.listen.ip().is_loopback() && !advertised.is_loopback() {
                return Err(invalid(
                    "api.listen",
                    self.api.listen.to_string(),
                    &format!(
                        "an address the other cluster members reach (this node's cluster \
                         address is {advertised}), since they read its figures there"
                    ),
                ));
            }
        }

        let node_name = self
            .cluster
            .as_ref()
            .and_then(|c| c.node_name.clone())
            .unwrap_or_else(default_node_name);

        Ok(Validated {
            config: self,
            live,
            shadow,
            secondary,
            replay_methods,
            routing_key,
            node_name,
        })
    }
}

/// A node name: 1 to 128 letters, digits, `-`, `_` or `.`.
fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The node name when `cluster.node_name` is not set: the machine's host name (from the
/// kernel, since shells and service managers often do not export `$HOSTNAME`), else
/// `$HOSTNAME`, else `specter`.
fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .into_iter()
        .chain(std::env::var("HOSTNAME").ok())
        .find(|name| valid_node_name(name))
        .unwrap_or_else(|| "specter".to_owned())
}

impl Config {
    /// Checks the `compare` and `routes` sections.
    fn validate_analysis(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, value: String, expected: &str| ConfigError::Invalid {
            origin: origin.to_owned(),
            key: key.to_owned(),
            value,
            expected: expected.to_owned(),
        };
        let compare = &self.compare;

        let fraction = |key: &str, value: f64| {
            if (0.0..=1.0).contains(&value) {
                Ok(())
            } else {
                Err(invalid(key, value.to_string(), "a number from 0.0 to 1.0"))
            }
        };
        fraction("compare.noise_sample_rate", compare.noise_sample_rate)?;
        if !(0.0..1.0).contains(&compare.noise_margin) {
            return Err(invalid(
                "compare.noise_margin",
                compare.noise_margin.to_string(),
                "a number from 0.0 up to (not including) 1.0",
            ));
        }
        let positive = [
            ("compare.max_differences", compare.max_differences as u64),
            ("compare.min_samples", compare.min_samples),
            ("compare.min_noise_samples", compare.min_noise_samples),
            (
                "compare.max_fields_per_route",
                compare.max_fields_per_route as u64,
            ),
            (
                "routes.max_segment_values",
                self.routes.max_segment_values as u64,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "0".into(), "at least 1"));
            }
        }
        if !(compare.noise_z.is_finite() && compare.noise_z > 0.0) {
            return Err(invalid(
                "compare.noise_z",
                compare.noise_z.to_string(),
                "a number above 0 (3.0 is about one false divergence in 700 per field)",
            ));
        }
        if !(compare.latency_ratio.is_finite() && compare.latency_ratio >= 1.0) {
            return Err(invalid(
                "compare.latency_ratio",
                compare.latency_ratio.to_string(),
                "a number of at least 1.0 (1.2 flags a shadow 20% slower)",
            ));
        }

        for (key, names) in [
            ("compare.volatile_headers", &compare.volatile_headers),
            ("compare.set_headers", &compare.set_headers),
        ] {
            if let Some(name) = names
                .iter()
                .find(|n| http::HeaderName::from_bytes(n.as_bytes()).is_err())
            {
                return Err(invalid(key, name.clone(), "header names"));
            }
        }

        let route_pattern = |key: &str, text: &str| {
            crate::profile::RoutePattern::parse(text).map_err(|reason| {
                invalid(
                    key,
                    text.to_owned(),
                    &format!("a route pattern like \"GET /users/{{id}}\" ({reason})"),
                )
            })
        };
        let path_pattern = |key: &str, text: &str| {
            crate::compare::PathPattern::parse(text).map_err(|reason| {
                invalid(
                    key,
                    text.to_owned(),
                    &format!("a JSON Pointer pattern like \"/items/*/id\" ({reason})"),
                )
            })
        };
        for (i, rule) in compare.ignore.iter().enumerate() {
            if let Some(route) = &rule.route {
                route_pattern(&format!("compare.ignore[{i}].route"), route)?;
            }
            match (&rule.header, &rule.path) {
                (Some(header), None) => {
                    if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                        return Err(invalid(
                            &format!("compare.ignore[{i}].header"),
                            header.clone(),
                            "a header name",
                        ));
                    }
                }
                (None, Some(path)) => {
                    path_pattern(&format!("compare.ignore[{i}].path"), path)?;
                }
                _ => {
                    return Err(invalid(
                        &format!("compare.ignore[{i}]"),
                        format!("header: {:?}, path: {:?}", rule.header, rule.path),
                        "exactly one of `header` and `path`",
                    ));
                }
            }
        }
        for (i, rule) in compare.unordered.iter().enumerate() {
            if let Some(route) = &rule.route {
                route_pattern(&format!("compare.unordered[{i}].route"), route)?;
            }
            path_pattern(&format!("compare.unordered[{i}].path"), &rule.path)?;
        }
        for (i, pattern) in self.routes.patterns.iter().enumerate() {
            route_pattern(&format!("routes.patterns[{i}]"), pattern)?;
        }
        Ok(())
    }
}

impl Validated {
    /// The proxy needs a listen address and a live target; says which key is missing.
    pub fn proxy_endpoints(&self) -> Result<(SocketAddr, Target), ConfigError> {
        let missing = |key: &str| ConfigError::Invalid {
            origin: "for proxy mode".to_owned(),
            key: key.to_owned(),
            value: "(missing)".to_owned(),
            expected: "a value".to_owned(),
        };
        let listen = self
            .config
            .specter
            .listen
            .ok_or_else(|| missing("specter.listen"))?;
        let live = self
            .live
            .clone()
            .ok_or_else(|| missing("specter.live_target"))?;
        Ok((listen, live))
    }
}

#[cfg(test)]
mod tests;
