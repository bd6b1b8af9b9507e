//! The cluster: several Specter nodes that share the work of one shadow deployment.
//!
//! It sits between sampling and replay in the pipeline. Each routing key (the
//! `specter.routing_key` header, or the client's IP when a request has none) has one owner
//! among the live members, picked by a consistent-hash [`Ring`]; the owner replays, compares and
//! records every exchange of that key, so one user's requests reach the shadow in order from
//! one place and their figures live on one node. A node that captures an exchange it does not
//! own ships the mirror job to the owner over the authenticated forward channel; that never
//! touches the live path, and when the owner cannot take the job it is handled locally.
//!
//! The parts, each behind a narrow interface:
//! - `membership`: gossip (the `memberlist` crate, seen nowhere else): who is alive, and the
//!   admin and forward addresses each member advertises;
//! - `ring`: the consistent-hash ring, rebuilt on every membership change;
//! - `forward` and `job`: the node-to-node channel and the mirror job it carries;
//! - cluster-wide figures, read from each live member's admin API and merged exactly.
//!
//! Where forwarded exchanges are counted: the capturing node counts `seen` and its checks
//! (sampled out, unsafe, ...) as always, then `forwarded` once the owner acknowledged the job;
//! the owner counts `forward_received` and everything that follows (mirrored, matched, route
//! figures, latencies). Summed over the cluster every exchange is seen once and mirrored once.
//!
//! Limitation: order is kept per entry node. Requests of one user that enter through two
//! different nodes within a forwarding hop of each other (well under a millisecond on a LAN)
//! may reach the owner in either order.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use thiserror::Error;
use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, info, warn};

use crate::{
    config::{CLUSTER_SECRET_ENV, ClusterSection, Validated},
    exchange::Exchange,
    pipeline::{Pipeline, Router},
    profile::{Profile, RouteTemplates, Tally},
};

mod forward;
mod job;
mod membership;
mod ring;

pub use forward::ForwardError;
pub use membership::{Member, MembershipError, NodeMeta};
pub use ring::{DEFAULT_VNODES, Ring};

/// The header every admin API answer names its node in. A member's figures are taken only
/// from an answer that names that member: with `api.listen` on loopback, every node advertises
/// the same address, and a node would read its own figures for every other member's.
pub const NODE_HEADER: &str = "x-specter-node";
/// How long reading one member's figures may take.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest answer read from a member's admin API.
const MAX_FETCH_BYTES: usize = 64 * 1024 * 1024;
/// Room in a forward frame for the request line, headers and the job's own fields, on top of
/// the two capped bodies.
const FRAME_OVERHEAD: usize = 1024 * 1024;

#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("cannot read the cluster secret from {path} (cluster.secret_file): {source}")]
    SecretFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the cluster secret in {origin} is empty; put a long random string there, the same on \
         every node"
    )]
    EmptySecret { origin: String },
    #[error(
        "no cluster secret: set cluster.secret_file or {CLUSTER_SECRET_ENV}, the same on every \
         node"
    )]
    NoSecret,
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
}

/// Reads the cluster secret as a node would on start, for `specter check-config`.
pub fn check_secret(section: &ClusterSection) -> Result<(), ClusterError> {
    Keys::load(section).map(|_| ())
}

/// The keys derived from the cluster secret, one per use.
struct Keys {
    gossip: [u8; 32],
    forward: [u8; 32],
}

impl Keys {
    /// Reads the secret from `cluster.secret_file`, else from the environment. Surrounding
    /// whitespace (a trailing newline) is not part of it.
    fn load(section: &ClusterSection) -> Result<Self, ClusterError> {
        let secret = match &section.secret_file {
            Some(path) => std::fs::read(path).map_err(|source| ClusterError::SecretFile {
                path: path.clone(),
                source,
            })?,
            None => std::env::var_os(CLUSTER_SECRET_ENV)
                .ok_or(ClusterError::NoSecret)?
                .into_encoded_bytes(),
        };
        let secret = secret.trim_ascii();
        if secret.is_empty() {
            let origin = match &section.secret_file {
                Some(path) => format!("{} (cluster.secret_file)", path.display()),
                None => CLUSTER_SECRET_ENV.to_owned(),
            };
            return Err(ClusterError::EmptySecret { origin });
        }
        Ok(Self::derive(secret))
    }

    /// Each use gets its own key, so a weakness in one protocol never exposes the other.
    fn derive(secret: &[u8]) -> Self {
        let derive = |purpose: &[u8]| -> [u8; 32] {
            let mut hash = Sha256::new();
            hash.update(purpose);
            hash.update([0]);
            hash.update(secret);
            hash.finalize().into()
        };
        Self {
            gossip: derive(b"specter cluster gossip"),
            forward: derive(b"specter cluster forward"),
        }
    }
}

/// The ring and where to ship each member's jobs, replaced whole on every membership change.
#[derive(Debug, Default)]
struct Placement {
    ring: Ring,
    forward: HashMap<String, SocketAddr>,
}

impl Placement {
    fn new(members: &[Member], vnodes: usize) -> Self {
        let usable: Vec<(&str, SocketAddr)> = members
            .iter()
            .filter_map(|m| m.meta.as_ref().map(|meta| (m.name.as_str(), meta.forward)))
            .collect();
        Self {
            ring: Ring::new(usable.iter().map(|(name, _)| *name), vnodes),
            forward: usable
                .into_iter()
                .map(|(name, addr)| (name.to_owned(), addr))
                .collect(),
        }
    }
}

/// One member's part in a cluster-wide answer.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub api: Option<SocketAddr>,
    /// False when its figures could not be read; they are then missing from the totals.
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A running cluster node.
pub struct Cluster {
    local: String,
    vnodes: usize,
    membership: membership::Membership,
    placement: Arc<RwLock<Arc<Placement>>>,
    forwarder: Arc<forward::Forwarder>,
    profile: Arc<Profile>,
    http: Client<HttpConnector, Empty<Bytes>>,
    stop_forward: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Cluster {
    /// Joins (or starts) the cluster the config describes. `pipeline` takes the jobs this node
    /// owns; `api` is where this node's admin API listens, advertised to the others.
    ///
    /// # Panics
    ///
    /// When the config has no `cluster` section.
    pub async fn start(
        config: &Validated,
        pipeline: Pipeline,
        api: SocketAddr,
    ) -> Result<Arc<Self>, ClusterError> {
        let section = config
            .config
            .cluster
            .as_ref()
            .expect("Cluster::start needs a cluster section");
        let keys = Keys::load(section)?;
        let advertise = section.advertise_addr.unwrap_or(section.bind_addr);
        let reachable = |addr: SocketAddr| {
            if addr.ip().is_unspecified() {
                SocketAddr::new(advertise.ip(), addr.port())
            } else {
                addr
            }
        };
        if api.ip().is_loopback() && !advertise.ip().is_loopback() {
            warn!(
                %api,
                "api.listen is a loopback address: other members cannot read this node's \
                 figures, so cluster-wide stats will miss them; listen on an address they reach"
            );
        }
        let profile = pipeline.profile().clone();
        let max_frame = 2 * config.config.capture.max_body_bytes + FRAME_OVERHEAD;

        // The owner side first, so a member is never advertised before it can take jobs.
        let listener = forward::bind(section.forward_listen()).await?;
        let forward_addr = reachable(listener.local_addr().unwrap_or(section.forward_listen()));
        let (stop_forward, stop_rx) = watch::channel(false);
        let deliver: forward::Deliver = {
            let (profile, pipeline) = (profile.clone(), pipeline.clone());
            Arc::new(move |exchange| {
                profile.tally(Tally::ForwardReceived);
                pipeline.submit_owned(exchange);
            })
        };
        let forward_key = forward::ForwardKey::new(keys.forward);
        let server = tokio::spawn(forward::serve(
            listener,
            forward_key.clone(),
            max_frame,
            deliver,
            stop_rx,
        ));

        let forwarder = Arc::new(forward::Forwarder::new(
            forward_key,
            max_frame,
            Arc::new(LocalFallback {
                profile: profile.clone(),
                pipeline,
            }),
        ));

        let membership = membership::Membership::start(membership::MembershipSettings {
            node_name: config.node_name.clone(),
            bind: section.bind_addr,
            advertise: section.advertise_addr,
            seeds: section.peers.clone(),
            key: keys.gossip,
            meta: NodeMeta {
                api: reachable(api),
                forward: forward_addr,
                vnodes: section.vnodes,
            },
        })
        .await?;

        let placement = Arc::new(RwLock::new(Arc::new(Placement::new(
            &membership.members(),
            section.vnodes,
        ))));
        let rebuild = tokio::spawn(rebuild_on_change(
            membership.subscribe(),
            placement.clone(),
            forwarder.clone(),
            section.vnodes,
        ));
        info!(
            node = %config.node_name,
            members = membership.members().len(),
            vnodes = section.vnodes,
            "Cluster node started"
        );

        Ok(Arc::new(Self {
            local: config.node_name.clone(),
            vnodes: section.vnodes,
            membership,
            placement,
            forwarder,
            profile,
            http: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build_http(),
            stop_forward,
            tasks: Mutex::new(vec![server, rebuild]),
        }))
    }

    /// This node's name.
    pub fn local_name(&self) -> &str {
        &self.local
    }

    /// Ring points per member.
    pub fn vnodes(&self) -> usize {
        self.vnodes
    }

    /// The live members, this node included, sorted by name.
    pub fn members(&self) -> Arc<[Member]> {
        self.membership.members()
    }

    /// The member that owns `key` now.
    pub fn owner_of(&self, key: &str) -> Option<String> {
        self.placement()
            .ring
            .owner(key.as_bytes())
            .map(str::to_owned)
    }

    /// Leaves the cluster and stops taking jobs from other nodes; called on shutdown, before
    /// the pipeline drains.
    pub async fn leave(&self, timeout: Duration) {
        self.membership.leave(timeout).await;
        let _ = self.stop_forward.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            task.abort();
        }
    }

    /// The whole cluster's profile: this node's, plus every other live member's read from its
    /// admin API (`/api/profile`) and merged exactly. Each member's part is reported.
    pub async fn merged_profile(&self) -> (Profile, Vec<NodeStatus>) {
        let merged = Profile::restore(&self.profile.snapshot()).unwrap_or_default();
        // The judgement settings are not in snapshots; every node shares this one's config.
        // Route names arrive already resolved, so no pattern is needed to merge them.
        merged.configure(self.profile.settings(), RouteTemplates::new(Vec::new(), 1));
        let mut statuses = vec![self.local_status()];
        for (member, answer) in self.gather("/api/profile").await {
            let answer = answer.and_then(|body| {
                merged
                    .merge_snapshot(&body)
                    .map_err(|e| format!("unreadable profile: {e}"))
            });
            statuses.push(status_of(&member, answer));
        }
        (merged, statuses)
    }

    /// The newest divergences over the cluster: `local` (this node's list) and every other live
    /// member's answer to `path_and_query` (a `/api/divergences` request), merged by
    /// [`merge_divergences`]. Each member's part is reported; one whose list could not be read
    /// is marked not ok.
    pub async fn merged_divergences(
        &self,
        local: Vec<serde_json::Value>,
        path_and_query: &str,
        limit: usize,
    ) -> (Vec<serde_json::Value>, Vec<NodeStatus>) {
        let mut lists = vec![(self.local.clone(), local)];
        let mut statuses = vec![self.local_status()];
        for (member, answer) in self.gather(path_and_query).await {
            let list = answer.and_then(|body| {
                serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|body| body["divergences"].as_array().cloned())
                    .ok_or_else(|| "unreadable divergence list".to_owned())
            });
            match list {
                Ok(list) => {
                    statuses.push(status_of(&member, Ok(())));
                    lists.push((member.name, list));
                }
                Err(e) => statuses.push(status_of(&member, Err(format!("divergences: {e}")))),
            }
        }
        (merge_divergences(lists, limit), statuses)
    }

    /// Every other live member's answer to `GET path_and_query` on its admin API, read
    /// concurrently.
    pub async fn gather(&self, path_and_query: &str) -> Vec<(Member, Result<Bytes, String>)> {
        let mut reads = tokio::task::JoinSet::new();
        for (index, member) in self.members().iter().enumerate() {
            if member.name == self.local {
                continue;
            }
            let member = member.clone();
            let http = self.http.clone();
            let path = path_and_query.to_owned();
            reads.spawn(async move {
                let answer = match &member.meta {
                    Some(meta) => fetch(&http, &member.name, meta.api, &path).await,
                    None => Err("its metadata cannot be read".to_owned()),
                };
                (index, member, answer)
            });
        }
        let mut answers = Vec::new();
        while let Some(read) = reads.join_next().await {
            if let Ok(answer) = read {
                answers.push(answer);
            }
        }
        answers.sort_by_key(|(index, _, _)| *index);
        answers
            .into_iter()
            .map(|(_, member, answer)| (member, answer))
            .collect()
    }

    /// The answer (status and body, whatever the status) of the live member called `name` to
    /// `GET path_and_query` on its admin API; `None` when no live member has that name.
    pub async fn ask(
        &self,
        name: &str,
        path_and_query: &str,
    ) -> Option<Result<(StatusCode, Bytes), String>> {
        let member = self.members().iter().find(|m| m.name == name).cloned()?;
        Some(match &member.meta {
            Some(meta) => fetch_answer(&self.http, &member.name, meta.api, path_and_query).await,
            None => Err("its metadata cannot be read".to_owned()),
        })
    }

    /// This node's entry in a cluster-wide answer.
    pub fn local_status(&self) -> NodeStatus {
        NodeStatus {
            name: self.local.clone(),
            api: self.membership.local().meta.as_ref().map(|m| m.api),
            ok: true,
            error: None,
        }
    }

    fn placement(&self) -> Arc<Placement> {
        self.placement
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Router for Cluster {
    fn route(&self, exchange: Exchange) -> Option<Exchange> {
        let placement = self.placement();
        let owner = ownership_key(&exchange).and_then(|key| placement.ring.owner(key.as_bytes()));
        let Some(owner) = owner.filter(|owner| *owner != self.local) else {
            return Some(exchange);
        };
        let Some(&addr) = placement.forward.get(owner) else {
            return Some(exchange);
        };
        let refused = self.forwarder.ship(owner, addr, exchange);
        if refused.is_some() {
            self.profile.tally(Tally::ForwardError);
        }
        refused
    }
}

/// What decides an exchange's owner: its routing key, else its client's IP (never the port,
/// which changes with every connection); none when neither is known, and it stays local.
pub fn ownership_key(exchange: &Exchange) -> Option<String> {
    match (&exchange.routing_key, exchange.client) {
        (Some(key), _) => Some(key.clone()),
        (None, Some(client)) => Some(client.ip().to_string()),
        (None, None) => None,
    }
}

/// Counts what became of shipped jobs, and replays here the ones that could not be shipped.
struct LocalFallback {
    profile: Arc<Profile>,
    pipeline: Pipeline,
}

impl forward::Outcome for LocalFallback {
    fn acknowledged(&self) {
        self.profile.tally(Tally::Forwarded);
    }

    fn unconfirmed(&self) {
        self.profile.tally(Tally::ForwardUnconfirmed);
    }

    fn not_shipped(&self, exchange: Exchange) {
        self.profile.tally(Tally::ForwardError);
        self.pipeline.submit_owned(exchange);
    }
}

/// Rebuilds the ring whenever the live view changes, and closes links to members that left.
async fn rebuild_on_change(
    mut view: watch::Receiver<Arc<[Member]>>,
    placement: Arc<RwLock<Arc<Placement>>>,
    forwarder: Arc<forward::Forwarder>,
    vnodes: usize,
) {
    while view.changed().await.is_ok() {
        let members = view.borrow_and_update().clone();
        let rebuilt = Placement::new(&members, vnodes);
        info!(members = ?rebuilt.ring.members(), "Ring rebuilt");
        forwarder.retain(|name| rebuilt.forward.contains_key(name));
        *placement.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rebuilt);
    }
}

async fn fetch(
    http: &Client<HttpConnector, Empty<Bytes>>,
    member: &str,
    api: SocketAddr,
    path: &str,
) -> Result<Bytes, String> {
    let answer = match fetch_answer(http, member, api, path).await {
        Ok((status, body)) if status.is_success() => Ok(body),
        Ok((status, body)) => Err(format!(
            "answered {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )),
        Err(error) => Err(error),
    };
    if let Err(error) = &answer {
        debug!(%api, path, %error, "Cannot read a member's admin API");
    }
    answer
}

/// `GET path` on `member`'s admin API: its status and body, or why there was none. An answer
/// from another node than `member` is an error.
async fn fetch_answer(
    http: &Client<HttpConnector, Empty<Bytes>>,
    member: &str,
    api: SocketAddr,
    path: &str,
) -> Result<(StatusCode, Bytes), String> {
    let read = async {
        let request = http::Request::get(format!("http://{api}{path}"))
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let response = http
            .request(request)
            .await
            .map_err(|e| crate::error_chain(&e))?;
        let answered_as = response
            .headers()
            .get(NODE_HEADER)
            .map(|name| String::from_utf8_lossy(name.as_bytes()).into_owned());
        if answered_as.as_deref() != Some(member) {
            let who = answered_as.map_or("something that is not a Specter node".to_owned(), |n| {
                format!("node {n:?}")
            });
            return Err(format!(
                "its advertised admin API {api} is answered by {who}; set its api.listen to an \
                 address the other members reach"
            ));
        }
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_FETCH_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(FETCH_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {FETCH_TIMEOUT:?}")))
}

fn status_of(member: &Member, answer: Result<(), String>) -> NodeStatus {
    if let Err(error) = &answer {
        warn!(member = %member.name, %error, "Member's figures missing from a cluster-wide answer");
    }
    NodeStatus {
        name: member.name.clone(),
        api: member.meta.as_ref().map(|m| m.api),
        ok: answer.is_ok(),
        error: answer.err(),
    }
}

/// Merges divergence summaries read from several nodes into one list, newest first, each
/// tagged with the node that recorded it (event ids are per node), at most `limit` long.
pub fn merge_divergences(
    lists: Vec<(String, Vec<serde_json::Value>)>,
    limit: usize,
) -> Vec<serde_json::Value> {
    let mut all: Vec<serde_json::Value> = lists
        .into_iter()
        .flat_map(|(node, list)| {
            list.into_iter().map(move |mut summary| {
                if let Some(fields) = summary.as_object_mut() {
                    fields.insert("node".to_owned(), serde_json::Value::from(node.clone()));
                }
                summary
            })
        })
        .collect();
    let key = |v: &serde_json::Value| {
        (
            v["time_ms"].as_u64().unwrap_or(0),
            v["id"].as_u64().unwrap_or(0),
        )
    };
    all.sort_by_key(|summary| std::cmp::Reverse(key(summary)));
    all.truncate(limit);
    all
}

#[cfg(test)]
mod tests;
