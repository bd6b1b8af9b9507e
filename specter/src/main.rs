//! The `specter` command: argument parsing and the wiring of the stages.

use std::{
    io::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;

use clap::{Parser, Subcommand, ValueEnum};
use specter::{
    api::{self, ApiState, CaptureView},
    capture::{
        Attachment, Capture, CaptureSettings,
        ring::{self, RingFigures},
    },
    cluster::Cluster,
    config::{Config, Validated},
    pipeline::{ExchangeLog, Pipeline},
    profile::Profile,
    proxy::{self, ProxySettings},
    reassembly::{Reassembler, ReassemblyConfig},
    replay::LocalEndpointHook,
    store, testserver,
};
use tokio::sync::watch;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// Mirror live HTTP traffic to a shadow service and report every divergence.
#[derive(Debug, Parser)]
#[command(name = "specter", version, about)]
struct Cli {
    /// Run a capture source directly: `--mode proxy --config FILE`.
    #[arg(long, value_enum, requires = "config")]
    mode: Option<Mode>,

    /// The YAML config, with `--mode`.
    #[arg(long, global = false)]
    config: Option<PathBuf>,

    /// Log format on stderr. Filter with RUST_LOG (default "info").
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Proxy,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the inline reverse proxy in front of the live service.
    Proxy {
        #[arg(long)]
        config: PathBuf,
    },
    /// Capture the live service's traffic passively with eBPF on an interface.
    Attach {
        /// The interface the live service's traffic crosses.
        #[arg(long)]
        iface: String,
        #[arg(long)]
        config: PathBuf,
        /// A live port to capture (repeatable); adds to `capture.ports`.
        #[arg(long = "port")]
        ports: Vec<u16>,
        /// Exit with the cause instead of falling back to proxy mode when eBPF is unavailable.
        #[arg(long)]
        no_fallback: bool,
    },
    /// Check a config file and print the settings it resolves to.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Serve the deterministic demo upstream (see docs/testserver.md).
    Testserver {
        #[arg(long)]
        port: u16,
        #[arg(long, value_enum)]
        mode: testserver::Mode,
        #[arg(long, default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
    },
    /// Send a deterministic mix of requests to a test server (directly or through Specter).
    Traffic(specter::traffic::TrafficArgs),
    /// Load every eBPF program through the kernel's verifier and report the result.
    CheckEbpf,
    /// Open the terminal dashboard on a running Specter's admin API.
    Tui {
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        api: String,
        /// Show this node's figures (`local`) or its whole cluster's, merged from every live
        /// member (`cluster`).
        #[arg(long, value_enum, default_value_t = specter::verdict::Scope::Local)]
        scope: specter::verdict::Scope,
    },
    /// Ask a running Specter whether the shadow passes: prints a table per route and exits 0
    /// (pass), 1 (fail), 2 (not enough evidence yet) or 3 (no verdict could be had).
    Verdict {
        #[command(flatten)]
        args: specter::verdict::VerdictArgs,
    },
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error),
    };
    // The dashboard owns the terminal: a log line on stderr would tear its screen.
    if !matches!(cli.command, Some(Command::Tui { .. })) {
        init_logging(cli.log_format);
    }

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("specter: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // Not eprintln!, which panics when stderr is gone (a closed terminal, say).
            let _ = writeln!(
                std::io::stderr(),
                "specter: {}",
                specter::error_chain(error.as_ref())
            );
            std::process::ExitCode::FAILURE
        }
    }
}

/// Prints a command-line error (or the help or version asked for) and picks the exit code:
/// 0 for help and version; for a mistake, 3 under `verdict` (its "no verdict could be had",
/// so a gate never reads a typo as a verdict) and 1 elsewhere, as for any other failure.
fn usage_error(error: &clap::Error) -> std::process::ExitCode {
    let _ = error.print();
    if !error.use_stderr() {
        return std::process::ExitCode::SUCCESS;
    }
    // The mistake may come before the command is read (a bad global option), so any word
    // `verdict` on the line counts.
    let verdict = std::env::args().skip(1).any(|arg| arg == "verdict");
    std::process::ExitCode::from(if verdict { 3 } else { 1 })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match (cli.command, cli.mode, cli.config) {
        (Some(Command::Proxy { config }), None, None) | (None, Some(Mode::Proxy), Some(config)) => {
            run_proxy(Config::load(&config)?).await
        }
        (
            Some(Command::Attach {
                iface,
                config,
                ports,
                no_fallback,
            }),
            None,
            None,
        ) => run_attach(Config::load(&config)?, iface, ports, no_fallback).await,
        (Some(Command::CheckConfig { config }), None, None) => {
            let mut validated = Config::load(&config)?;
            // What a node reads on start besides the file: the cluster secret, and the DSN's
            // syntax (the server itself is not contacted).
            if let Some(section) = &validated.config.cluster {
                specter::cluster::check_secret(section)?;
            }
            if let Some(dsn) = validated.config.store.postgres_dsn.as_deref() {
                specter::store::check_postgres_dsn(dsn)?;
            }
            // The DSN may carry a password; the printout must not.
            if let Some(dsn) = validated.config.store.postgres_dsn.as_mut() {
                *dsn = specter::store::redact_dsn(dsn);
            }
            println!("{:#?}", validated.config);
            Ok(())
        }
        (Some(Command::Testserver { port, mode, bind }), None, None) => {
            let addr = std::net::SocketAddr::new(bind, port);
            let listener = testserver::bind(addr).await?;
            testserver::serve(listener, mode, shutdown_signal()).await?;
            Ok(())
        }
        (Some(Command::Traffic(args)), None, None) => {
            let summary = specter::traffic::run(args.plan()).await?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            Ok(())
        }
        (Some(Command::CheckEbpf), None, None) => {
            let (_ebpf, loaded) = specter::capture::load_all()?;
            println!("loaded: {}", loaded.join(", "));
            Ok(())
        }
        (Some(Command::Tui { api, scope }), None, None) => {
            // A blocking loop with its own poller runtime: keep it off the async workers.
            tokio::task::spawn_blocking(move || specter::tui::run(api, scope)).await??;
            Ok(())
        }
        (Some(Command::Verdict { args }), None, None) => {
            let code = specter::verdict::run(&args).await;
            // The exit code is the answer, so leave with it rather than through main's
            // success-or-failure.
            let _ = std::io::stdout().flush();
            std::process::exit(i32::from(code));
        }
        (None, None, _) => anyhow::bail!("nothing to do: give a subcommand or --mode (see --help)"),
        _ => anyhow::bail!("--mode and --config go together, without a subcommand (see --help)"),
    }
}

/// Proxy mode: the stages, the admin API and the proxy itself, then a clean stop.
async fn run_proxy(config: Validated) -> anyhow::Result<()> {
    let (listen, live) = config.proxy_endpoints()?;
    let proxy_listener = proxy::bind(listen).await?;
    let stages = Stages::start(&config, "proxy", None, None).await?;

    let settings = &config.config;
    let proxy_settings = ProxySettings {
        live,
        routing_key: config.routing_key.clone(),
        max_body_bytes: settings.capture.max_body_bytes,
        live_timeout: settings.specter.live_timeout,
        connect_timeout: settings.specter.connect_timeout,
    };
    proxy::serve(
        proxy_listener,
        proxy_settings,
        stages.pipeline(),
        shutdown_signal(),
    )
    .await;

    stages.stop(settings.specter.drain_timeout).await;
    Ok(())
}

/// Attach mode: eBPF capture on `iface`, or proxy mode when eBPF cannot be used.
async fn run_attach(
    config: Validated,
    iface: String,
    extra_ports: Vec<u16>,
    no_fallback: bool,
) -> anyhow::Result<()> {
    let settings = &config.config;
    let mut ports = settings.capture.ports.clone();
    ports.extend(extra_ports);
    ports.sort_unstable();
    ports.dedup();
    if ports.is_empty() {
        anyhow::bail!("no live port to capture: set capture.ports in the config or pass --port");
    }
    let capture_settings = CaptureSettings {
        iface: iface.clone(),
        ports,
        ring_bytes: settings.capture.ring_bytes,
    };

    let capture = match Attachment::attach(&capture_settings) {
        Ok(capture) => capture,
        Err(cause) if no_fallback => {
            anyhow::bail!("cannot capture on {iface}: {cause} (--no-fallback given)")
        }
        Err(cause) => {
            let Ok((listen, _)) = config.proxy_endpoints() else {
                anyhow::bail!(
                    "cannot capture on {iface}: {cause}; and proxy mode cannot take over \
                     because the config lacks specter.listen or specter.live_target"
                );
            };
            warn!(%iface, %cause, %listen, "eBPF capture unavailable; falling back to proxy mode");
            return run_proxy(config).await;
        }
    };
    let Capture {
        attachment,
        exclusions,
        ring,
        counters,
    } = capture;

    // Specter's own replays never count as live traffic, even to a shadow on the same port.
    let exclusions = Arc::new(exclusions);
    let hook: LocalEndpointHook = Arc::new(move |local, open| {
        if open {
            exclusions.add(local)
        } else {
            exclusions.remove(local)
        }
    });

    let figures = Arc::new(Mutex::new(RingFigures::default()));
    let capture_view: CaptureView = {
        let figures = figures.clone();
        let mode = attachment.mode();
        let iface = attachment.iface().to_owned();
        Arc::new(move || {
            capture_json(
                &iface,
                mode,
                &counters.read(),
                &figures.lock().unwrap_or_else(|p| p.into_inner()),
            )
        })
    };
    let stages = Stages::start(&config, "attach", Some(hook), Some(capture_view)).await?;

    let reassembler = Reassembler::new(ReassemblyConfig {
        max_body_bytes: settings.capture.max_body_bytes,
        max_out_of_order_bytes: settings.capture.max_out_of_order_bytes,
        idle_timeout: settings.capture.idle_timeout,
        routing_key: config.routing_key.clone(),
        wall_clock_at_zero: ring::wall_clock_at_zero(),
        ..ReassemblyConfig::default()
    });
    // The ring is read on a thread of its own, so replays and API requests never delay it.
    let pipeline = stages.pipeline();
    let (stop_capture, capture_stopped) = tokio::sync::oneshot::channel::<()>();
    let capture_thread = std::thread::Builder::new()
        .name("specter-capture".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(ring::run(
                ring,
                reassembler,
                move |exchange| pipeline.submit(exchange),
                figures,
                async move {
                    let _ = capture_stopped.await;
                },
            ))
        })
        .context("cannot start the capture thread")?;

    shutdown_signal().await;
    let _ = stop_capture.send(());
    match tokio::task::spawn_blocking(move || capture_thread.join()).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => warn!(%error, "Reading the capture ring failed"),
        _ => warn!("The capture thread ended abnormally"),
    }

    stages.stop(settings.specter.drain_timeout).await;
    drop(attachment);
    Ok(())
}

/// The capture object of `/api/stats`.
fn capture_json(
    iface: &str,
    mode: specter::capture::AttachMode,
    kernel: &specter::capture::KernelCounters,
    ring: &RingFigures,
) -> serde_json::Value {
    let r = &ring.reassembly;
    serde_json::json!({
        "iface": iface,
        "attach_mode": mode,
        "packets": kernel.packets_copied,
        "bytes": kernel.bytes_copied,
        "ring_drops": kernel.ring_drops,
        "truncated": kernel.truncated,
        "out_of_order": r.out_of_order,
        "retransmits": r.retransmits,
        "gaps": r.gaps,
        "parse_errors": r.parse_errors,
        "connections_open": r.connections_open,
        "exchanges_incomplete": r.exchanges_incomplete,
        "upgrades_skipped": r.upgrades_skipped,
        "non_http_skipped": r.non_http_skipped,
        "http2_skipped": r.http2_skipped,
        "own_traffic_skipped": kernel.own_traffic,
        "fragments_skipped": kernel.fragments,
        "decode_errors": ring.decode_errors,
    })
}

/// How long a stopping node waits for its leave message to reach another member.
const CLUSTER_LEAVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The stages every capture source feeds: store, profile, pipeline and the admin API.
struct Stages {
    running: specter::pipeline::Running,
    cluster: Option<Arc<Cluster>>,
    stop_api: watch::Sender<bool>,
    api: tokio::task::JoinHandle<()>,
}

impl Stages {
    async fn start(
        config: &Validated,
        mode: &'static str,
        hook: Option<LocalEndpointHook>,
        capture: Option<CaptureView>,
    ) -> anyhow::Result<Self> {
        let settings = &config.config;
        let store = store::open(&settings.store, &config.node_name)?;
        let profile = match store.load_profile() {
            Ok(Some(bytes)) => Profile::restore(&bytes).unwrap_or_else(|error| {
                warn!(%error, "Stored profile unreadable; counters start from zero");
                Profile::new()
            }),
            Ok(None) => Profile::new(),
            Err(error) => {
                warn!(%error, "Cannot read the stored profile; counters start from zero");
                Profile::new()
            }
        };
        let api_listener = api::bind(settings.api.listen).await?;

        let exchange_log = match &settings.capture.exchange_log {
            Some(path) => Some(ExchangeLog::create(path).with_context(|| {
                format!("cannot create capture.exchange_log {}", path.display())
            })?),
            None => None,
        };
        let mut running =
            Pipeline::start(config, store.clone(), Arc::new(profile), hook, exchange_log);

        // The cluster is up before the capture source starts, so the first exchange already
        // goes to its owner.
        let cluster = match &settings.cluster {
            Some(_) => {
                let api_addr = api_listener.local_addr().unwrap_or(settings.api.listen);
                let cluster =
                    match Cluster::start(config, running.pipeline().clone(), api_addr).await {
                        Ok(cluster) => cluster,
                        Err(error) => {
                            // Nothing was captured yet; the recorder is stopped before the
                            // runtime goes, as the store may still need it.
                            running.shutdown(std::time::Duration::ZERO).await;
                            return Err(error.into());
                        }
                    };
                running.set_router(cluster.clone());
                Some(cluster)
            }
            None => None,
        };

        let (stop_api, stop_rx) = watch::channel(false);
        let state = ApiState {
            node: config.node_name.clone(),
            mode,
            profile: running.pipeline().profile().clone(),
            store,
            capture,
            cluster: cluster.clone(),
        };
        let api = tokio::spawn(api::serve(api_listener, state, async move {
            let mut rx = stop_rx;
            let _ = rx.wait_for(|stop| *stop).await;
        }));
        Ok(Self {
            running,
            cluster,
            stop_api,
            api,
        })
    }

    fn pipeline(&self) -> Pipeline {
        self.running.pipeline().clone()
    }

    /// Drains in-flight replays up to `deadline`, then stops the API.
    async fn stop(self, deadline: std::time::Duration) {
        // Leaving first lets the others take over this node's keys while it drains.
        if let Some(cluster) = &self.cluster {
            cluster.leave(CLUSTER_LEAVE_TIMEOUT).await;
        }
        info!(?deadline, "Draining in-flight replays");
        self.running.shutdown(deadline).await;
        let _ = self.stop_api.send(true);
        let _ = self.api.await;
        info!("Stopped");
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            warn!(%error, "Cannot watch SIGTERM; only Ctrl-C stops Specter");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT received; stopping"),
        _ = term.recv() => info!("SIGTERM received; stopping"),
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: a log file or journal gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
