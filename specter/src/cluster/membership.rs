//! Gossip membership: which Specter nodes are alive, and how to reach each one.
//!
//! This is the only module that sees the `memberlist` crate (SWIM gossip over UDP, with TCP for
//! joins and state sync). Everything else in Specter reads [`Member`] lists from a
//! [`Membership`]: the live view, published on a watch channel whenever it changes.
//!
//! What the crate is asked for, and why:
//! - **The live view comes from `online_members()`**, never from the states in `members()`,
//!   which keep saying alive for about 30 s after a member died. An event delegate pokes the
//!   view to refresh at once on a join, a death or an update; a tick refreshes it anyway.
//! - **Encryption with the cluster key** (AES-256-GCM), required on what is sent and on what is
//!   received, so a node without the secret can neither join nor forge a member's metadata.
//! - **Node metadata** carries this node's admin API and node-to-node forward addresses, as
//!   compact JSON well under the crate's 512-byte cap.
//! - **A gatekeeper** refuses members that would split ownership: one whose name is already
//!   taken by another live node (both would answer for the same keys), and one whose ring has
//!   another number of points per member (the two would disagree on every key's owner). A node
//!   that meets either while joining does not start; one met later is logged as an error.
//! - **Rejoining** is ours: the crate never contacts a member again once it declared it dead,
//!   so after a partition heals (or a seed restarts) the two sides would stay apart. A joiner
//!   task keeps trying the seeds and every member seen recently that is not in the live view.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use memberlist::{
    Options,
    delegate::{
        AliveDelegate, CompositeDelegate, ConflictDelegate, EventDelegate, NodeDelegate,
        VoidDelegate,
    },
    net::NetTransportOptions,
    proto::{EncryptionAlgorithm, MaybeResolvedAddress, Meta, NodeState, SecretKey},
    tokio::{TokioSocketAddrResolver, TokioTcpMemberlist},
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
};
use tracing::{debug, error, info, warn};

/// How often the live view is refreshed when no event arrives.
const REFRESH_TICK: Duration = Duration::from_secs(1);
/// How often seeds and recently seen members outside the live view are asked to (re)join.
const REJOIN_TICK: Duration = Duration::from_secs(2);
/// How long one join attempt may take.
const JOIN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a member that left the live view is still tried as a rejoin target.
const REMEMBER_FOR: Duration = Duration::from_secs(24 * 3600);
/// How long a node with peers may stay alone before it says so, and how often it says so again.
const ALONE_WARNING: Duration = Duration::from_secs(10);
/// How often the same refusal of a member is logged again.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

type Id = Arc<str>;
type Delegate = CompositeDelegate<
    Id,
    SocketAddr,
    Gatekeeper,
    Gatekeeper,
    Poke,
    VoidDelegate<Id, SocketAddr>,
    LocalMeta,
    VoidDelegate<Id, SocketAddr>,
>;
type Gossip = TokioTcpMemberlist<Id, TokioSocketAddrResolver, Delegate>;

#[derive(Debug, Error)]
pub enum MembershipError {
    #[error(
        "cannot start cluster membership on {bind} (cluster.bind_addr): {message}; check that \
         the address is local and its TCP and UDP ports are free"
    )]
    Start { bind: SocketAddr, message: String },
    #[error("node metadata is {len} bytes, above the gossip limit of {limit}")]
    MetaTooLarge { len: usize, limit: usize },
    #[error("not joining the cluster: {0}")]
    Refused(String),
}

/// What a node tells the others about itself through gossip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    /// The admin API, where cluster-wide figures are read.
    pub api: SocketAddr,
    /// The node-to-node channel that takes mirror jobs for the keys this node owns.
    pub forward: SocketAddr,
    /// Its ring's points per member (`cluster.vnodes`); 0 when not said.
    #[serde(default)]
    pub vnodes: usize,
}

/// One live member of the cluster, this node included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub name: String,
    /// The gossip address it advertises.
    pub gossip: SocketAddr,
    /// None when its metadata could not be read (another Specter version, say); such a member
    /// owns no keys and is left out of cluster-wide figures.
    #[serde(flatten)]
    pub meta: Option<NodeMeta>,
}

/// How to start membership; resolved from the `cluster` config section.
#[derive(Debug, Clone)]
pub struct MembershipSettings {
    pub node_name: String,
    pub bind: SocketAddr,
    /// The address other members reach this one at; the bind address when unset.
    pub advertise: Option<SocketAddr>,
    /// `host:port` of nodes to join through.
    pub seeds: Vec<String>,
    /// The AES-256 gossip key.
    pub key: [u8; 32],
    pub meta: NodeMeta,
}

/// A running membership. Dropping it does not leave the cluster: call [`Membership::leave`].
pub struct Membership {
    gossip: Gossip,
    local: Member,
    view: watch::Receiver<Arc<[Member]>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Membership {
    /// Binds the gossip ports, starts the refresh and join tasks, and tries the seeds once
    /// before returning. A node whose seeds are all unreachable starts alone and keeps trying.
    pub async fn start(settings: MembershipSettings) -> Result<Self, MembershipError> {
        let meta_json = serde_json::to_string(&settings.meta).expect("node metadata serialises");
        if meta_json.len() > Meta::MAX_SIZE {
            return Err(MembershipError::MetaTooLarge {
                len: meta_json.len(),
                limit: Meta::MAX_SIZE,
            });
        }
        let meta = Meta::try_from(meta_json).map_err(|e| MembershipError::Start {
            bind: settings.bind,
            message: e.to_string(),
        })?;

        let poke = Arc::new(Notify::new());
        let gatekeeper = Gatekeeper(Arc::new(Gate {
            name: settings.node_name.clone(),
            vnodes: settings.meta.vnodes,
            refused: Mutex::new(BTreeMap::new()),
            name_taken: Mutex::new(None),
            vnodes_differ: Mutex::new(None),
        }));
        let delegate = CompositeDelegate::new()
            .with_alive_delegate(gatekeeper.clone())
            .with_conflict_delegate(gatekeeper.clone())
            .with_event_delegate(Poke(poke.clone()))
            .with_node_delegate(LocalMeta(meta));

        let mut transport = NetTransportOptions::new(Id::from(settings.node_name.as_str()))
            .with_advertise_address(settings.advertise.unwrap_or(settings.bind));
        transport.add_bind_address(settings.bind);

        let options = Options::lan()
            .with_encryption_algo(EncryptionAlgorithm::NoPadding)
            .with_primary_key(SecretKey::Aes256(settings.key))
            .with_gossip_verify_incoming(true)
            .with_gossip_verify_outgoing(true);

        let gossip = Gossip::with_delegate(delegate, transport, options)
            .await
            .map_err(|e| MembershipError::Start {
                bind: settings.bind,
                message: e.to_string(),
            })?;
        let local = Member {
            name: settings.node_name.clone(),
            gossip: *gossip.advertise_address(),
            meta: Some(settings.meta.clone()),
        };
        info!(
            node = %local.name,
            gossip = %local.gossip,
            seeds = ?settings.seeds,
            "Cluster membership started"
        );

        let (publish, view) = watch::channel::<Arc<[Member]>>(Arc::from(vec![local.clone()]));
        let mut membership = Self {
            gossip: gossip.clone(),
            local,
            view,
            tasks: Vec::new(),
        };

        // The first join is awaited, so a node that can reach its seed starts as a member.
        let mut joiner = Joiner {
            gossip: gossip.clone(),
            own: [settings.bind, membership.local.gossip]
                .into_iter()
                .collect(),
            seeds: settings.seeds,
            remembered: BTreeMap::new(),
        };
        joiner.attempt(&[]).await;
        let alone = gossip.online_members().await.len() <= 1;
        if let Some(reason) = gatekeeper.0.blocks_start(alone) {
            if let Err(error) = gossip.shutdown().await {
                debug!(%error, "Gossip shutdown reported an error");
            }
            return Err(MembershipError::Refused(reason));
        }
        refresh(&gossip, &publish).await;

        membership
            .tasks
            .push(tokio::spawn(run_refresh(gossip.clone(), poke, publish)));
        membership
            .tasks
            .push(tokio::spawn(joiner.run(membership.view.clone())));
        Ok(membership)
    }

    /// This node as the others see it.
    pub fn local(&self) -> &Member {
        &self.local
    }

    /// The live members now, this node included, sorted by name.
    pub fn members(&self) -> Arc<[Member]> {
        self.view.borrow().clone()
    }

    /// A receiver that sees every change of the live view.
    pub fn subscribe(&self) -> watch::Receiver<Arc<[Member]>> {
        self.view.clone()
    }

    /// Tells the others this node is leaving (waiting at most `timeout` for the message to go
    /// out), then stops gossiping.
    pub async fn leave(&self, timeout: Duration) {
        for task in &self.tasks {
            task.abort();
        }
        match self.gossip.leave(timeout).await {
            Ok(_) => info!(node = %self.local.name, "Left the cluster"),
            Err(error) => {
                warn!(%error, "Leaving the cluster did not complete; peers will time us out")
            }
        }
        if let Err(error) = self.gossip.shutdown().await {
            debug!(%error, "Gossip shutdown reported an error");
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Publishes the live view whenever gossip reports an event, and once a tick regardless.
async fn run_refresh(gossip: Gossip, poke: Arc<Notify>, publish: watch::Sender<Arc<[Member]>>) {
    loop {
        tokio::select! {
            () = poke.notified() => {}
            () = tokio::time::sleep(REFRESH_TICK) => {}
        }
        refresh(&gossip, &publish).await;
    }
}

async fn refresh(gossip: &Gossip, publish: &watch::Sender<Arc<[Member]>>) {
    let mut members: Vec<Member> = gossip
        .online_members()
        .await
        .iter()
        .map(|state| member_of(state))
        .collect();
    members.sort_by(|a, b| a.name.cmp(&b.name));

    publish.send_if_modified(|current| {
        if current[..] == members[..] {
            return false;
        }
        let before: HashSet<&str> = current.iter().map(|m| m.name.as_str()).collect();
        let after: HashSet<&str> = members.iter().map(|m| m.name.as_str()).collect();
        for joined in after.difference(&before) {
            info!(member = %joined, members = after.len(), "Cluster member joined");
        }
        for gone in before.difference(&after) {
            info!(member = %gone, members = after.len(), "Cluster member gone");
        }
        *current = Arc::from(members);
        true
    });
}

fn member_of(state: &NodeState<Id, SocketAddr>) -> Member {
    let meta = serde_json::from_slice::<NodeMeta>(state.meta().as_bytes());
    if let Err(error) = &meta {
        debug!(member = %state.id(), %error, "Unreadable member metadata");
    }
    Member {
        name: state.id().to_string(),
        gossip: *state.address(),
        meta: meta.ok(),
    }
}

/// Keeps trying to (re)join seeds and recently seen members that are not in the live view.
struct Joiner {
    gossip: Gossip,
    /// Our own addresses, never joined.
    own: HashSet<SocketAddr>,
    seeds: Vec<String>,
    /// Gossip address of every member seen, and when it was last in the live view.
    remembered: BTreeMap<SocketAddr, Instant>,
}

impl Joiner {
    async fn run(mut self, mut view: watch::Receiver<Arc<[Member]>>) {
        // A node given peers that stays alone says so: its peers are unreachable, or they do
        // not let it in (another cluster secret, say), and it owns every key meanwhile.
        let mut alone_since = Instant::now();
        let mut warned_at: Option<Instant> = None;
        loop {
            let live = view.borrow_and_update().clone();
            let now = Instant::now();
            for member in live.iter() {
                self.remembered.insert(member.gossip, now);
            }
            self.remembered
                .retain(|_, seen| now.duration_since(*seen) < REMEMBER_FOR);

            let failures = self.attempt(&live).await;
            if live.len() > 1 || self.seeds.is_empty() {
                alone_since = now;
                warned_at = None;
            } else if now.duration_since(alone_since) >= ALONE_WARNING
                && warned_at.is_none_or(|at| now.duration_since(at) >= ALONE_WARNING * 6)
            {
                warn!(
                    peers = ?self.seeds,
                    failures = ?failures,
                    "No cluster peer has let this node in after {} s; it runs alone and owns \
                     every key. Check that the peers are reachable on their gossip port and \
                     use the same cluster secret",
                    now.duration_since(alone_since).as_secs()
                );
                warned_at = Some(now);
            }
            tokio::time::sleep(REJOIN_TICK).await;
        }
    }

    /// One join round: every seed and remembered address that is not live and not ours.
    /// Returns why each target could not be joined through.
    async fn attempt(&mut self, live: &[Member]) -> Vec<String> {
        let live: HashSet<SocketAddr> = live.iter().map(|m| m.gossip).collect();
        let mut targets: Vec<SocketAddr> = Vec::new();
        let mut failures = Vec::new();
        for seed in &self.seeds {
            match tokio::net::lookup_host(seed.as_str()).await {
                Ok(addrs) => targets.extend(addrs),
                Err(error) => {
                    debug!(%seed, %error, "Cannot resolve cluster seed");
                    failures.push(format!("{seed}: {error}"));
                }
            }
        }
        targets.extend(self.remembered.keys().copied());
        targets.sort_unstable();
        targets.dedup();
        targets.retain(|addr| !live.contains(addr) && !self.own.contains(addr));
        if targets.is_empty() {
            return failures;
        }

        // One task per target, so an unreachable one does not hold up the others.
        let mut joins = tokio::task::JoinSet::new();
        for target in targets {
            let gossip = self.gossip.clone();
            joins.spawn(async move {
                let join = gossip.join(MaybeResolvedAddress::Resolved(target));
                let failure = match tokio::time::timeout(JOIN_TIMEOUT, join).await {
                    Ok(Ok(_)) => None,
                    Ok(Err(error)) => Some(error.to_string()),
                    Err(_) => Some(format!("no answer within {JOIN_TIMEOUT:?}")),
                };
                match &failure {
                    None => debug!(%target, "Joined through cluster peer"),
                    Some(error) => debug!(%target, %error, "Cannot join through cluster peer"),
                }
                failure.map(|error| format!("{target}: {error}"))
            });
        }
        while let Some(joined) = joins.join_next().await {
            failures.extend(joined.ok().flatten());
        }
        failures
    }
}

/// Refuses members that would split ownership, and remembers why (see the module docs).
#[derive(Clone)]
struct Gatekeeper(Arc<Gate>);

struct Gate {
    /// This node's name and ring points.
    name: String,
    vnodes: usize,
    /// Each refusal's reason, and when it was last logged.
    refused: Mutex<BTreeMap<String, Instant>>,
    /// Set when another node has this node's name.
    name_taken: Mutex<Option<String>>,
    /// Set when a member was refused for its ring points.
    vnodes_differ: Mutex<Option<String>>,
}

impl Gate {
    /// Logs a refusal, at most once a [`REFUSAL_LOG_EVERY`] per reason.
    fn log(&self, reason: &str) {
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let due = refused
            .get(reason)
            .is_none_or(|logged| now.duration_since(*logged) >= REFUSAL_LOG_EVERY);
        if due {
            error!("{reason}");
            refused.insert(reason.to_owned(), now);
        }
    }

    fn note(slot: &Mutex<Option<String>>, reason: &str) {
        slot.lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| reason.to_owned());
    }

    /// Why this node must not start after its first join: another node has its name, or it let
    /// no member in because each has other ring points. `alone` says whether it is alone.
    fn blocks_start(&self, alone: bool) -> Option<String> {
        let taken = self.name_taken.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(reason) = taken.clone() {
            return Some(reason);
        }
        let differ = self.vnodes_differ.lock().unwrap_or_else(|p| p.into_inner());
        differ.clone().filter(|_| alone)
    }
}

/// Why a member's metadata was refused.
#[derive(Debug, Error)]
#[error("{0}")]
struct Refusal(String);

impl AliveDelegate for Gatekeeper {
    type Id = Id;
    type Address = SocketAddr;
    type Error = Refusal;

    async fn notify_alive(&self, peer: Arc<NodeState<Id, SocketAddr>>) -> Result<(), Refusal> {
        let Ok(meta) = serde_json::from_slice::<NodeMeta>(peer.meta().as_bytes()) else {
            return Ok(());
        };
        let gate = &self.0;
        if meta.vnodes == 0 || gate.vnodes == 0 || meta.vnodes == gate.vnodes {
            return Ok(());
        }
        let reason = format!(
            "member {} at {} uses cluster.vnodes {} and this node {}: the two would disagree \
             on who owns each key, so it is not let in; every node needs the same value",
            peer.id(),
            peer.address(),
            meta.vnodes,
            gate.vnodes
        );
        gate.log(&reason);
        Gate::note(&gate.vnodes_differ, &reason);
        Err(Refusal(reason))
    }
}

impl ConflictDelegate for Gatekeeper {
    type Id = Id;
    type Address = SocketAddr;

    async fn notify_conflict(
        &self,
        existing: Arc<NodeState<Id, SocketAddr>>,
        other: Arc<NodeState<Id, SocketAddr>>,
    ) {
        let gate = &self.0;
        let reason = if existing.id().as_ref() == gate.name {
            let reason = format!(
                "cluster.node_name {:?} is also the name of the node at {}; each node needs a \
                 name of its own",
                gate.name,
                other.address()
            );
            Gate::note(&gate.name_taken, &reason);
            reason
        } else {
            format!(
                "two nodes call themselves {:?}, at {} and at {}; each node needs a name of \
                 its own",
                existing.id(),
                existing.address(),
                other.address()
            )
        };
        gate.log(&reason);
    }
}

/// Wakes the refresh task on every membership event.
struct Poke(Arc<Notify>);

impl EventDelegate for Poke {
    type Id = Id;
    type Address = SocketAddr;

    async fn notify_join(&self, _node: Arc<NodeState<Id, SocketAddr>>) {
        self.0.notify_one();
    }

    async fn notify_leave(&self, _node: Arc<NodeState<Id, SocketAddr>>) {
        self.0.notify_one();
    }

    async fn notify_update(&self, _node: Arc<NodeState<Id, SocketAddr>>) {
        self.0.notify_one();
    }
}

/// Hands this node's metadata to gossip.
struct LocalMeta(Meta);

impl NodeDelegate for LocalMeta {
    async fn node_meta(&self, _limit: usize) -> Meta {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests;
