//! The `specter` command: argument parsing and the wiring of the stages.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;

use clap::{Parser, Subcommand, ValueEnum};
use specter::{
    api::{self, ApiState, CaptureView},
    config::{Config, Validated},
    pipeline::Pipeline,
    profile::Profile,
    proxy::{self, ProxySettings},
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
    Traffic {
        /// Where to send: host:port.
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long, default_value_t = 1000)]
        requests: usize,
        #[arg(long, default_value_t = 8)]
        connections: usize,
        #[arg(long, default_value_t = 50)]
        users: usize,
        /// Include POST uploads in the mix.
        #[arg(long)]
        uploads: bool,
        /// Write one JSON line per exchange made to this file.
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// Load every eBPF program through the kernel's verifier and report the result.
    CheckEbpf,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);

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
            eprintln!("specter: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match (cli.command, cli.mode, cli.config) {
        (Some(Command::Proxy { config }), None, None) | (None, Some(Mode::Proxy), Some(config)) => {
            run_proxy(Config::load(&config)?).await
        }
        (Some(Command::CheckConfig { config }), None, None) => {
            let validated = Config::load(&config)?;
            println!("{:#?}", validated.config);
            Ok(())
        }
        (Some(Command::Testserver { port, mode, bind }), None, None) => {
            let addr = std::net::SocketAddr::new(bind, port);
            let listener = testserver::bind(addr).await?;
            info!(%addr, ?mode, "Test server listening");
            testserver::serve(listener, mode, shutdown_signal()).await?;
            Ok(())
        }
        (
            Some(Command::Traffic {
                target,
                requests,
                connections,
                users,
                uploads,
                log,
            }),
            None,
            None,
        ) => {
            let plan = specter::traffic::Plan {
                addr: target,
                host: target.to_string(),
                requests,
                connections,
                users,
                uploads,
                log,
            };
            let summary = specter::traffic::run(plan).await?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            Ok(())
        }
        (Some(Command::CheckEbpf), None, None) => {
            let (_ebpf, loaded) = specter::capture::load_all()?;
            println!("loaded: {}", loaded.join(", "));
            Ok(())
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

/// The stages every capture source feeds: store, profile, pipeline and the admin API.
struct Stages {
    running: specter::pipeline::Running,
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
        let store = store::open(&settings.store)?;
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

        let running = Pipeline::start(config, store.clone(), Arc::new(profile), hook);
        let (stop_api, stop_rx) = watch::channel(false);
        let state = ApiState {
            node: config.node_name.clone(),
            mode,
            profile: running.pipeline().profile().clone(),
            store,
            capture,
        };
        let api = tokio::spawn(api::serve(api_listener, state, async move {
            let mut rx = stop_rx;
            let _ = rx.wait_for(|stop| *stop).await;
        }));
        Ok(Self {
            running,
            stop_api,
            api,
        })
    }

    fn pipeline(&self) -> Pipeline {
        self.running.pipeline().clone()
    }

    /// Drains in-flight replays up to `deadline`, then stops the API.
    async fn stop(self, deadline: std::time::Duration) {
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
