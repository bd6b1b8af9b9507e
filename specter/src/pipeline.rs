//! The pipeline every capture source feeds: sample, replay, compare, record.
//!
//! [`Pipeline::submit`] is the one entry point. It never blocks and never fails: an exchange is
//! either queued for replay or counted with the reason it was not (sampled out, unsafe method,
//! truncated, incomplete, queue full). Replays run on `replay.concurrency` lanes, each a bounded
//! queue; a routing key always maps to the same lane, so one user's requests reach the shadow
//! in the order they were captured. Events are written by one recorder thread in batches.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc as std_mpsc,
    },
    thread,
    time::{Duration, Instant, UNIX_EPOCH},
};

use tokio::{sync::mpsc, task::JoinSet};
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::{
    compare::{self, CompareOptions},
    config::Validated,
    event::{Event, Outcome, StoredResponse},
    exchange::{Exchange, Quality},
    profile::{self, Profile, Tally},
    replay::{LocalEndpointHook, ShadowClient},
    store::Store,
};

/// Events waiting for the recorder; beyond this they are dropped and counted.
const RECORDER_QUEUE: usize = 8192;
/// Events written per store transaction at most.
const RECORDER_BATCH: usize = 512;
/// How often the recorder saves the profile even when no event arrives.
const RECORDER_TICK: Duration = Duration::from_millis(250);

/// Decides which exchanges are mirrored.
#[derive(Debug, Clone)]
pub struct Sampler {
    rate: f64,
}

impl Sampler {
    pub fn new(rate: f64) -> Self {
        Self { rate }
    }

    /// With a routing key the decision is a hash of the key, so one user's traffic is mirrored
    /// wholly or not at all; without one it is random.
    pub fn keep(&self, routing_key: Option<&str>) -> bool {
        if self.rate >= 1.0 {
            return true;
        }
        if self.rate <= 0.0 {
            return false;
        }
        let point = match routing_key {
            Some(key) => xxhash_rust::xxh3::xxh3_64(key.as_bytes()) as f64 / u64::MAX as f64,
            None => rand::random::<f64>(),
        };
        point < self.rate
    }
}

enum Job {
    Replay(Box<Exchange>),
    Stop,
}

enum Record {
    Event(Box<Event>),
    /// Write what is pending and end the recorder.
    Stop,
}

struct Shared {
    profile: Arc<Profile>,
    shadow: ShadowClient,
    compare: CompareOptions,
    store_matched: bool,
    next_id: AtomicU64,
    node: String,
    recorder: std_mpsc::SyncSender<Record>,
}

/// The running pipeline. Cheap to clone; every clone feeds the same stages.
#[derive(Clone)]
pub struct Pipeline {
    lanes: Arc<[mpsc::Sender<Job>]>,
    next_lane: Arc<AtomicUsize>,
    closing: Arc<AtomicBool>,
    sampler: Sampler,
    replay_methods: Arc<[String]>,
    shared: Arc<Shared>,
}

/// What [`Pipeline::shutdown`] waits for.
pub struct Running {
    workers: JoinSet<()>,
    recorder: thread::JoinHandle<()>,
    pipeline: Pipeline,
}

impl Pipeline {
    /// Starts the replay lanes and the recorder, with the profile the store last saved.
    ///
    /// `hook` learns the local endpoint of every shadow connection (see
    /// [`LocalEndpointHook`]).
    pub fn start(
        config: &Validated,
        store: Arc<dyn Store>,
        profile: Arc<Profile>,
        hook: Option<LocalEndpointHook>,
    ) -> Running {
        let replay = &config.config.replay;
        let shadow = ShadowClient::new(
            config.shadow.clone(),
            replay.preserve_host,
            replay.timeout,
            config.config.capture.max_body_bytes,
            hook,
        );
        let next_id = store.next_id().unwrap_or_else(|error| {
            warn!(%error, "Cannot read the next event id from the store; starting at 1");
            1
        });

        let (record_tx, record_rx) = std_mpsc::sync_channel(RECORDER_QUEUE);
        let recorder = {
            let profile = profile.clone();
            thread::Builder::new()
                .name("specter-recorder".into())
                .spawn(move || run_recorder(store, profile, record_rx))
                .expect("spawn recorder thread")
        };

        let shared = Arc::new(Shared {
            profile,
            shadow,
            compare: CompareOptions::default(),
            store_matched: !config.config.sampling.divergence_only,
            next_id: AtomicU64::new(next_id),
            node: config.node_name.clone(),
            recorder: record_tx,
        });

        let lane_capacity = (replay.queue_size / replay.concurrency).max(1);
        let mut lanes = Vec::with_capacity(replay.concurrency);
        let mut workers = JoinSet::new();
        for lane in 0..replay.concurrency {
            let (tx, rx) = mpsc::channel(lane_capacity);
            lanes.push(tx);
            workers.spawn(run_lane(shared.clone(), rx).instrument(info_span!("lane", lane)));
        }

        let pipeline = Pipeline {
            lanes: lanes.into(),
            next_lane: Arc::new(AtomicUsize::new(0)),
            closing: Arc::new(AtomicBool::new(false)),
            sampler: Sampler::new(config.config.sampling.rate),
            replay_methods: config.replay_methods.clone().into(),
            shared,
        };
        Running {
            workers,
            recorder,
            pipeline,
        }
    }

    pub fn profile(&self) -> &Arc<Profile> {
        &self.shared.profile
    }

    /// Hands one exchange to the pipeline. Never blocks.
    pub fn submit(&self, exchange: Exchange) {
        let profile = &self.shared.profile;
        profile.tally(Tally::Seen);

        match exchange.quality {
            Quality::Complete => {}
            Quality::Truncated => return profile.tally(Tally::Truncated),
            Quality::Incomplete => return profile.tally(Tally::Incomplete),
        }
        if !self.sampler.keep(exchange.routing_key.as_deref()) {
            return profile.tally(Tally::SampledOut);
        }
        if !self.replay_methods.contains(&exchange.request.method) {
            return profile.tally(Tally::SkippedUnsafe);
        }
        if self.closing.load(Ordering::Relaxed) {
            return profile.tally(Tally::ShadowDropped);
        }

        // A keyed exchange must use its key's lane to keep that key's order; an unkeyed one
        // may take any lane with room.
        let lanes = self.lanes.len();
        let (first, tries) = match &exchange.routing_key {
            Some(key) => (
                (xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % lanes as u64) as usize,
                1,
            ),
            None => (
                self.next_lane.fetch_add(1, Ordering::Relaxed) % lanes,
                lanes,
            ),
        };
        let mut job = Job::Replay(Box::new(exchange));
        for i in 0..tries {
            match self.lanes[(first + i) % lanes].try_send(job) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(back))
                | Err(mpsc::error::TrySendError::Closed(back)) => job = back,
            }
        }
        profile.tally(Tally::ShadowDropped);
    }
}

impl Running {
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Stops taking exchanges, lets queued replays finish until `deadline`, then writes every
    /// recorded event and the profile to the store.
    pub async fn shutdown(mut self, deadline: Duration) {
        self.pipeline.closing.store(true, Ordering::Relaxed);
        for lane in self.pipeline.lanes.iter() {
            // The lane's queue may be full; the stop waits behind the queued replays.
            let _ = tokio::time::timeout(deadline, lane.send(Job::Stop)).await;
        }

        let drained = tokio::time::timeout(deadline, async {
            while self.workers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                ?deadline,
                "Replays still in flight at the drain deadline were abandoned"
            );
            self.workers.abort_all();
        }

        let recorder_queue = self.pipeline.shared.recorder.clone();
        let recorder = self.recorder;
        let _ = tokio::task::spawn_blocking(move || recorder_queue.send(Record::Stop)).await;
        let _ = tokio::task::spawn_blocking(move || recorder.join()).await;
    }
}

async fn run_lane(shared: Arc<Shared>, mut jobs: mpsc::Receiver<Job>) {
    while let Some(job) = jobs.recv().await {
        match job {
            Job::Replay(exchange) => mirror(&shared, *exchange).await,
            Job::Stop => break,
        }
    }
}

/// Replays one exchange, compares the answers and records the outcome.
async fn mirror(shared: &Shared, exchange: Exchange) {
    let request = &exchange.request;
    let route = profile::route_of(&request.method, request.path());
    let live = StoredResponse::from_response(&exchange.response, exchange.timing.live_latency);
    let time_ms = exchange
        .timing
        .started
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);

    let (outcome, shadow, differences, error, shadow_latency) =
        match shared.shadow.replay(request).await {
            Ok(answer) => {
                let differences =
                    compare::compare(&exchange.response, &answer.response, &shared.compare);
                let outcome = if differences.is_empty() {
                    Outcome::Matched
                } else {
                    Outcome::Diverged
                };
                let shadow = StoredResponse::from_response(&answer.response, answer.latency);
                (
                    outcome,
                    Some(shadow),
                    differences,
                    None,
                    Some(answer.latency),
                )
            }
            Err(error) => {
                debug!(%error, target = %request.target, "Shadow replay failed");
                (
                    Outcome::ShadowError,
                    None,
                    Vec::new(),
                    Some(error.to_string()),
                    None,
                )
            }
        };

    shared.profile.record(
        &route,
        outcome,
        exchange.timing.live_latency,
        shadow_latency,
    );
    if outcome == Outcome::Matched && !shared.store_matched {
        return;
    }

    let event = Event {
        id: shared.next_id.fetch_add(1, Ordering::Relaxed),
        time_ms,
        node: shared.node.clone(),
        outcome,
        method: request.method.clone(),
        target: request.target.clone(),
        route,
        routing_key: exchange.routing_key.clone(),
        live,
        shadow,
        differences,
        error,
    };
    if shared
        .recorder
        .try_send(Record::Event(Box::new(event)))
        .is_err()
    {
        shared.profile.tally(Tally::StoreDropped);
    }
}

/// The recorder thread: batches events into store transactions, each saving the profile too.
fn run_recorder(store: Arc<dyn Store>, profile: Arc<Profile>, records: std_mpsc::Receiver<Record>) {
    info!(store = %store.describe(), "Recorder started");
    let mut batch = Vec::with_capacity(RECORDER_BATCH);
    let mut saved = profile.counters();
    let mut last_error: Option<Instant> = None;

    loop {
        let mut stop_after = false;
        let (stop, flush) = match records.recv_timeout(RECORDER_TICK) {
            Ok(Record::Event(event)) => {
                batch.push(*event);
                while batch.len() < RECORDER_BATCH {
                    match records.try_recv() {
                        Ok(Record::Event(event)) => batch.push(*event),
                        Ok(Record::Stop) => {
                            stop_after = true;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                (stop_after, true)
            }
            Ok(Record::Stop) => (true, true),
            Err(std_mpsc::RecvTimeoutError::Timeout) => (false, profile.counters() != saved),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => (true, true),
        };

        if flush {
            let counters = profile.counters();
            match store.commit(&batch, &profile.snapshot()) {
                Ok(()) => saved = counters,
                Err(error) => {
                    for _ in 0..batch.len() {
                        profile.tally(Tally::StoreDropped);
                    }
                    // One line per failure burst, not one per batch.
                    if last_error.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                        warn!(%error, events = batch.len(), "Store write failed; events dropped");
                        last_error = Some(Instant::now());
                    }
                }
            }
            batch.clear();
        }
        if stop {
            break;
        }
    }
    info!("Recorder stopped");
}

#[cfg(test)]
mod tests;
