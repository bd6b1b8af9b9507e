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
//! - **Rejoining** is ours: the crate never contacts a member again once it declared it dead,
//!   so after a partition heals (or a seed restarts) the two sides would stay apart. A joiner
//!   task keeps trying the seeds and every member seen recently that is not in the live view.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use memberlist::{
    Options,
    delegate::{CompositeDelegate, EventDelegate, NodeDelegate, VoidDelegate},
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
use tracing::{debug, info, warn};

/// How often the live view is refreshed when no event arrives.
const REFRESH_TICK: Duration = Duration::from_secs(1);
/// How often seeds and recently seen members outside the live view are asked to (re)join.
const REJOIN_TICK: Duration = Duration::from_secs(2);
/// How long one join attempt may take.
const JOIN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a member that left the live view is still tried as a rejoin target.
const REMEMBER_FOR: Duration = Duration::from_secs(24 * 3600);

type Id = Arc<str>;
type Delegate = CompositeDelegate<
    Id,
    SocketAddr,
    VoidDelegate<Id, SocketAddr>,
    VoidDelegate<Id, SocketAddr>,
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
}

/// What a node tells the others about itself through gossip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    /// The admin API, where cluster-wide figures are read.
    pub api: SocketAddr,
    /// The node-to-node channel that takes mirror jobs for the keys this node owns.
    pub forward: SocketAddr,
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
        let delegate = CompositeDelegate::new()
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
        loop {
            let live = view.borrow_and_update().clone();
            let now = Instant::now();
            for member in live.iter() {
                self.remembered.insert(member.gossip, now);
            }
            self.remembered
                .retain(|_, seen| now.duration_since(*seen) < REMEMBER_FOR);

            self.attempt(&live).await;
            tokio::time::sleep(REJOIN_TICK).await;
        }
    }

    /// One join round: every seed and remembered address that is not live and not ours.
    async fn attempt(&mut self, live: &[Member]) {
        let live: HashSet<SocketAddr> = live.iter().map(|m| m.gossip).collect();
        let mut targets: Vec<SocketAddr> = Vec::new();
        for seed in &self.seeds {
            match tokio::net::lookup_host(seed.as_str()).await {
                Ok(addrs) => targets.extend(addrs),
                Err(error) => debug!(%seed, %error, "Cannot resolve cluster seed"),
            }
        }
        targets.extend(self.remembered.keys().copied());
        targets.sort_unstable();
        targets.dedup();
        targets.retain(|addr| !live.contains(addr) && !self.own.contains(addr));
        if targets.is_empty() {
            return;
        }

        // One task per target, so an unreachable one does not hold up the others.
        let mut joins = tokio::task::JoinSet::new();
        for target in targets {
            let gossip = self.gossip.clone();
            joins.spawn(async move {
                let join = gossip.join(MaybeResolvedAddress::Resolved(target));
                match tokio::time::timeout(JOIN_TIMEOUT, join).await {
                    Ok(Ok(_)) => debug!(%target, "Joined through cluster peer"),
                    Ok(Err(error)) => debug!(%target, %error, "Cannot join through cluster peer"),
                    Err(_) => debug!(%target, "Joining through cluster peer timed out"),
                }
            });
        }
        while joins.join_next().await.is_some() {}
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
