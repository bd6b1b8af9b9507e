//! The pipeline every capture source feeds: sample, replay, compare, record.
//!
//! [`Pipeline::submit`] is the one entry point. It never blocks and never fails: an exchange is
//! either queued for replay or counted with the reason it was not (sampled out, unsafe method,
//! truncated, incomplete, queue full). Replays run on `replay.concurrency` lanes, each a bounded
//! queue; a routing key always maps to the same lane, so one user's requests reach the shadow
//! in the order they were captured. Events are written by one recorder thread in batches.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc as std_mpsc,
    },
    thread,
    time::{Duration, Instant, UNIX_EPOCH},
};

use tokio::{sync::mpsc, task::JoinSet};

mod exchange_log;

pub use exchange_log::ExchangeLog;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::{
    compare::{
        self, CompareOptions, Context, Side,
        noise::{self, LiveNoiseCache, NoiseRule, NoiseSource},
    },
    config::Validated,
    event::{Event, Outcome, StoredResponse},
    exchange::{Exchange, Quality, Response},
    profile::{Mirrored, NoiseLearning, Profile, RoutePattern, RouteTemplates, Settings, Tally},
    replay::{LocalEndpointHook, ReplayError, ShadowClient, ShadowResponse},
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

pub(crate) enum Record {
    Event(Box<Event>),
    /// Write what is pending and end the recorder.
    Stop,
}

struct Shared {
    profile: Arc<Profile>,
    shadow: ShadowClient,
    /// `specter.secondary_target`: a second copy of the live version, replayed to with the
    /// shadow so that what differs between live and secondary is learned as noise.
    secondary: Option<ShadowClient>,
    /// Without a secondary: the share of safe requests replayed to the shadow twice.
    noise_sample_rate: f64,
    /// Without a secondary: the last live answer of each distinct safe request.
    live_noise: Option<Mutex<LiveNoiseCache>>,
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
    exchange_log: Option<Arc<ExchangeLog>>,
    /// Decides which node replays each exchange; none on a single node.
    router: Option<Arc<dyn Router>>,
    shared: Arc<Shared>,
}

/// Decides where an exchange that passed every check is replayed: on this node, or on the node
/// that owns its routing key (see `cluster`).
pub trait Router: Send + Sync + 'static {
    /// Gives the exchange back to be replayed here, or keeps it (`None`) when it was shipped to
    /// its owner. Must never block: it runs on the capture path.
    fn route(&self, exchange: Exchange) -> Option<Exchange>;
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
        exchange_log: Option<ExchangeLog>,
    ) -> Running {
        let replay = &config.config.replay;
        let shadow = ShadowClient::new(
            config.shadow.clone(),
            replay.preserve_host,
            replay.timeout,
            config.config.capture.max_body_bytes,
            hook.clone(),
        );
        // The secondary's connections are Specter's own too, so passive capture must skip them.
        let secondary = config.secondary.clone().map(|target| {
            ShadowClient::new(
                target,
                replay.preserve_host,
                replay.timeout,
                config.config.capture.max_body_bytes,
                hook,
            )
        });
        configure_analysis(config, &profile);
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

        let compare_section = &config.config.compare;
        let learn_from_traffic = secondary.is_none();
        let shared = Arc::new(Shared {
            profile,
            shadow,
            secondary,
            noise_sample_rate: if learn_from_traffic {
                compare_section.noise_sample_rate
            } else {
                0.0
            },
            live_noise: learn_from_traffic
                .then(|| Mutex::new(LiveNoiseCache::new(compare_section.live_noise_cache_bytes))),
            compare: CompareOptions::from_config(
                compare_section,
                config.live.as_ref(),
                &config.shadow,
                config.secondary.as_ref(),
            ),
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
            exchange_log: exchange_log.map(Arc::new),
            router: None,
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
        if let Some(log) = &self.exchange_log
            && !log.record(&exchange)
        {
            profile.tally(Tally::LogDropped);
        }

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
        let exchange = match &self.router {
            Some(router) => match router.route(exchange) {
                Some(exchange) => exchange,
                None => return,
            },
            None => exchange,
        };
        self.submit_owned(exchange);
    }

    /// Queues an exchange whose checks were made and counted, and whose owner is this node:
    /// one shipped here by another node, or one that could not be shipped to its owner. It is
    /// not counted as `seen` again (the node that captured it counted it) nor routed again.
    pub fn submit_owned(&self, exchange: Exchange) {
        let profile = &self.shared.profile;
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

    /// Sets the router of the pipeline clones handed out from now on; call it before any.
    pub fn set_router(&mut self, router: Arc<dyn Router>) {
        self.pipeline.router = Some(router);
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

        // The log's writer finishes once the last pipeline clone lets go of it.
        self.pipeline.exchange_log = None;
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

/// Hands the `compare` and `routes` settings of the config to the profile.
fn configure_analysis(config: &Validated, profile: &Profile) {
    let compare = &config.config.compare;
    let noise_learning = if config.secondary.is_some() {
        NoiseLearning::Secondary
    } else if compare.noise_sample_rate > 0.0 {
        NoiseLearning::Learned
    } else {
        NoiseLearning::Off
    };
    let settings = Settings {
        noise_rule: NoiseRule {
            min_samples: compare.min_samples,
            min_noise_samples: compare.min_noise_samples,
            z: compare.noise_z,
            margin: compare.noise_margin,
        },
        noise_learning,
        latency_ratio: compare.latency_ratio,
        max_fields_per_route: compare.max_fields_per_route,
    };
    // Validation already parsed every pattern, so none is dropped here.
    let patterns = config
        .config
        .routes
        .patterns
        .iter()
        .filter_map(|p| RoutePattern::parse(p).ok())
        .collect();
    let templates = RouteTemplates::new(patterns, config.config.routes.max_segment_values);
    info!(?noise_learning, "Divergence analysis configured");
    profile.configure(settings, templates);
}

/// Replays one exchange, compares the answers, records the outcome, and learns noise.
async fn mirror(shared: &Shared, exchange: Exchange) {
    let request = &exchange.request;
    let route = shared.profile.route(&request.method, request.path());
    let time_ms = exchange
        .timing
        .started
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let context = Context {
        route: &route,
        request_host: request.headers.get_str("host"),
        sides: (Side::Live, Side::Shadow),
    };

    // The secondary answers at the same moment as the shadow, so live against secondary
    // measures noise under the conditions live against shadow is measured in.
    let (primary, secondary) = match &shared.secondary {
        Some(secondary) => {
            let (primary, secondary) =
                tokio::join!(shared.shadow.replay(request), secondary.replay(request));
            (primary, Some(secondary))
        }
        None => (shared.shadow.replay(request).await, None),
    };

    let (outcome, comparison, error) = match &primary {
        Ok(answer) => {
            let mut comparison = compare::compare_exchange(
                &context,
                &exchange.response,
                &answer.response,
                &shared.compare,
            );
            let outcome = shared.profile.judge(&route, &mut comparison.differences);
            (outcome, comparison, None)
        }
        Err(error) => {
            debug!(%error, target = %request.target, "Shadow replay failed");
            (
                Outcome::ShadowError,
                compare::Comparison::default(),
                Some(error.to_string()),
            )
        }
    };
    let answer = primary.as_ref().ok();

    let stored = outcome != Outcome::Matched || shared.store_matched;
    let event_id = stored.then(|| shared.next_id.fetch_add(1, Ordering::Relaxed));
    shared.profile.record_mirrored(&Mirrored {
        route: &route,
        outcome,
        live_status: exchange.response.status,
        shadow_status: answer.map(|a| a.response.status),
        live_latency: exchange.timing.live_latency,
        shadow_latency: answer.map(|a| a.latency),
        differences: &comparison.differences,
        event_id,
    });

    if let Some(id) = event_id {
        let event = Event {
            id,
            time_ms,
            node: shared.node.clone(),
            outcome,
            method: request.method.clone(),
            target: request.target.clone(),
            route: route.clone(),
            routing_key: exchange.routing_key.clone(),
            live: StoredResponse::from_response(&exchange.response, exchange.timing.live_latency),
            shadow: answer.map(|a| StoredResponse::from_response(&a.response, a.latency)),
            differences: comparison.into_stored(),
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

    match secondary {
        Some(secondary) => learn_from_secondary(shared, &context, &exchange.response, secondary),
        None => learn_from_traffic(shared, &context, &exchange, answer).await,
    }
}

/// Live against secondary: two answers of the live version, so whatever differs is noise.
fn learn_from_secondary(
    shared: &Shared,
    context: &Context<'_>,
    live: &Response,
    secondary: Result<ShadowResponse, ReplayError>,
) {
    let context = Context {
        sides: (Side::Live, Side::Secondary),
        ..*context
    };
    match secondary {
        Ok(answer) => {
            let comparison =
                compare::compare_exchange(&context, live, &answer.response, &shared.compare);
            shared.profile.record_noise(
                context.route,
                NoiseSource::Secondary,
                Some(&comparison.differences),
            );
        }
        Err(error) => {
            debug!(%error, "Secondary replay failed");
            shared
                .profile
                .record_noise(context.route, NoiseSource::Secondary, None);
        }
    }
}

/// Without a secondary: a sample of safe requests is replayed to the shadow a second time, and
/// every safe request is compared with the last live answer to the same request.
async fn learn_from_traffic(
    shared: &Shared,
    context: &Context<'_>,
    exchange: &Exchange,
    first_answer: Option<&ShadowResponse>,
) {
    let request = &exchange.request;
    if !noise::is_safe_method(&request.method) {
        return;
    }

    if let Some(first) = first_answer
        && shared.noise_sample_rate > 0.0
        && rand::random::<f64>() < shared.noise_sample_rate
    {
        let again = Context {
            sides: (Side::Shadow, Side::Shadow),
            ..*context
        };
        match shared.shadow.replay(request).await {
            Ok(second) => {
                let comparison = compare::compare_exchange(
                    &again,
                    &first.response,
                    &second.response,
                    &shared.compare,
                );
                shared.profile.record_noise(
                    context.route,
                    NoiseSource::Shadow,
                    Some(&comparison.differences),
                );
            }
            Err(error) => {
                debug!(%error, "Second shadow replay for noise learning failed");
                shared
                    .profile
                    .record_noise(context.route, NoiseSource::Shadow, None);
            }
        }
    }

    let Some(cache) = &shared.live_noise else {
        return;
    };
    let Some(key) = LiveNoiseCache::key(request) else {
        return;
    };
    let previous = cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .swap(key, &exchange.response);
    if let Some(previous) = previous {
        let repeat = Context {
            sides: (Side::Live, Side::Live),
            ..*context
        };
        let comparison =
            compare::compare_exchange(&repeat, &previous, &exchange.response, &shared.compare);
        shared.profile.record_noise(
            context.route,
            NoiseSource::Live,
            Some(&comparison.differences),
        );
    }
}

/// The recorder thread: batches events into store transactions, each saving the profile too.
pub(crate) fn run_recorder(
    store: Arc<dyn Store>,
    profile: Arc<Profile>,
    records: std_mpsc::Receiver<Record>,
) {
    info!(store = %store.describe(), "Recorder started");
    let mut batch = Vec::with_capacity(RECORDER_BATCH);
    let mut saved = profile.counters();
    let mut last_error: Option<Instant> = None;
    // Events a background-writing backend accepted and then lost count as store drops too.
    let mut backend_dropped = store.health().dropped;

    loop {
        let dropped_now = store.health().dropped;
        if dropped_now > backend_dropped {
            profile.tally_n(Tally::StoreDropped, dropped_now - backend_dropped);
            backend_dropped = dropped_now;
        }
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
            // The last commit before stopping saves the field tables as they are now.
            let snapshot = if stop {
                profile.snapshot()
            } else {
                profile.snapshot_for_store()
            };
            match store.commit(&batch, &snapshot) {
                Ok(()) => saved = counters,
                Err(error) => {
                    profile.tally_n(Tally::StoreDropped, batch.len() as u64);
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
            // A backend that writes in the background gets a last chance to finish.
            if let Err(error) = store.flush(Duration::from_secs(10)) {
                warn!(%error, "Store could not write everything before shutdown");
            }
            break;
        }
    }
    info!("Recorder stopped");
}

#[cfg(test)]
mod tests;
