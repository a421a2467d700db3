//! The `switchboard` binary: parse the CLI, load the config, build the gateway, serve.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use switchboard::config::{Config, LogFormat};
use switchboard::Gateway;

mod keys_cli;

#[derive(Parser)]
#[command(name = "switchboard", version, about = "A self-hosted LLM gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Config file (default: ./switchboard.toml, else the built-in demo).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen address, HOST:PORT (127.0.0.1:8080, localhost:8080, [::1]:8080);
        /// overrides [server].listen.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Validate a config file and print every problem.
    Check {
        /// Config file (default: ./switchboard.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Administer client keys in the configured store.
    Keys {
        /// Config file whose [store] to use (default: ./switchboard.toml, else the demo store ./switchboard.db).
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: keys_cli::KeysCommand,
    },
}

/// mimalloc: fewer instructions per allocation than glibc malloc on the request path,
/// which allocates many small, short-lived objects (BENCHMARKS.md has the measurement).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Serve { config, listen } => serve(config, listen),
        Command::Check { config } => check(config),
        Command::Keys { config, command } => match load_for_keys(config) {
            Ok(c) => keys_cli::run(&c, command),
            Err(code) => code,
        },
    }
}

/// Loads the config: the named file, else ./switchboard.toml, else the demo.
fn load(path: Option<PathBuf>, demo_ok: bool) -> Result<Config, ExitCode> {
    let default = PathBuf::from("switchboard.toml");
    let path = match path {
        Some(p) => p,
        None if default.exists() => default,
        // `serve` says so once its log is set up (in the log format asked for).
        None if demo_ok => return Ok(Config::demo()),
        None => {
            eprintln!(
                "switchboard: no --config given and no ./switchboard.toml here; pass --config FILE"
            );
            return Err(ExitCode::from(1));
        }
    };
    Config::from_file(&path).map_err(|e| {
        eprintln!("switchboard: {e}");
        ExitCode::from(1)
    })
}

/// The config whose store `switchboard keys` works on.
fn load_for_keys(path: Option<PathBuf>) -> Result<Config, ExitCode> {
    if path.is_none() && !PathBuf::from("switchboard.toml").exists() {
        eprintln!("switchboard: no --config and no ./switchboard.toml: using the demo store ./switchboard.db");
        return Ok(Config::demo());
    }
    load(path, false)
}

fn check(path: Option<PathBuf>) -> ExitCode {
    match load(path, false) {
        Ok(config) => {
            for w in config.warnings() {
                eprintln!("warning: {w}");
            }
            println!(
                "config ok: {} provider(s), {} model(s), {} key(s)",
                config.providers.len(),
                config.models.len(),
                config.keys.len()
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// The notice of `serve` without a config.
const DEMO_NOTICE: &str = "switchboard: no --config and no ./switchboard.toml: starting the built-in demo (provider `mock`, models mock/echo, mock/lorem and mock/embed, key sk-demo with $1 of credit, store ./switchboard.db)";

/// The environment variable that overrides `[server].log_format`.
const LOG_FORMAT_ENV: &str = "SWITCHBOARD_LOG_FORMAT";

/// Sets up the log on stderr: `RUST_LOG` filters (default `info`); `format` is
/// `[server].log_format` unless `SWITCHBOARD_LOG_FORMAT` says otherwise. Text has
/// ANSI colours only when stderr is a terminal; JSON is one object per line.
/// (`[telemetry]`'s spans do not go through this log: the gateway exports them
/// itself, [`switchboard::otel`].)
fn init_logs(format: LogFormat) -> Result<LogFormat, ExitCode> {
    let format = match std::env::var(LOG_FORMAT_ENV) {
        Ok(v) if !v.trim().is_empty() => {
            match v.parse::<LogFormat>() {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("switchboard: {LOG_FORMAT_ENV}: {e} (or unset it to use [server].log_format)");
                    return Err(ExitCode::from(1));
                }
            }
        }
        _ => format,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_ansi(false)
            .init(),
    }
    Ok(format)
}

fn serve(path: Option<PathBuf>, listen: Option<String>) -> ExitCode {
    let demo = path.is_none() && !PathBuf::from("switchboard.toml").exists();
    // What SIGHUP and POST /admin/reload read again.
    let file = match &path {
        Some(p) => Some(p.clone()),
        None if !demo => Some(PathBuf::from("switchboard.toml")),
        None => None,
    };
    let mut config = match load(path, true) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let json = match init_logs(config.server.log_format) {
        Ok(f) => f == LogFormat::Json,
        Err(code) => return code,
    };
    // What stops the server: a plain line for people, a log object for collectors.
    let fail = |message: String, code: u8| {
        if json {
            tracing::error!("{message}");
        } else {
            eprintln!("{message}");
        }
        ExitCode::from(code)
    };
    if demo {
        tracing::info!("{DEMO_NOTICE}");
    }
    // Which setting the address came from, for the messages about it.
    let listen_override = listen.clone();
    let setting = match listen {
        Some(addr) => {
            if let Err(message) = switchboard::config::check_listen(&addr) {
                return fail(format!("switchboard: --listen: {message}"), 1);
            }
            config.server.listen = addr;
            "--listen"
        }
        None => "server.listen",
    };
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => return fail(format!("switchboard: cannot start the runtime: {e}"), 2),
    };
    let config_listen = config.server.listen.clone();
    // `[telemetry]`'s exporter, once the gateway has made it: flushed at the end.
    let telemetry = std::sync::Arc::new(std::sync::OnceLock::new());
    let exporter = telemetry.clone();
    let code = runtime.block_on(async move {
        let mut builder = Gateway::builder().config(config);
        if let Some(file) = file {
            builder = builder.config_file(file);
        }
        if let Some(addr) = listen_override {
            builder = builder.listen_override(addr);
        }
        let gateway = match builder.build() {
            Ok(g) => g,
            // The store or the request log cannot be opened: a runtime failure (SPEC §1).
            Err(
                e @ (switchboard::gateway::BuildError::Store(_)
                | switchboard::gateway::BuildError::Logging(_)),
            ) => return fail(format!("switchboard: {e}"), 2),
            Err(e) => return fail(format!("switchboard: {e}"), 1),
        };
        if let Some(t) = gateway.telemetry() {
            let _ = exporter.set(t);
        }
        reload_on_sighup(&gateway);
        let listener = match bind(&config_listen, setting).await {
            Ok(l) => l,
            Err(message) => return fail(format!("switchboard: {message}"), 2),
        };
        let shutdown = shutdown_signal(grace);
        let local = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::info!("switchboard listening on http://{local}");
        match gateway.serve(listener, shutdown, grace).await {
            Ok(()) => {
                tracing::info!("switchboard stopped");
                ExitCode::SUCCESS
            }
            Err(e) => fail(format!("switchboard: server failed: {e}"), 2),
        }
    });
    // The spans of the last requests: exported before the process ends (a dead
    // collector costs at most `[telemetry].export_timeout_secs`).
    if let Some(t) = telemetry.get() {
        t.shutdown();
    }
    code
}

/// Resolves `listen` (HOST:PORT; `setting` is where it was given) and binds the first
/// of its addresses that works, or says why none did and what to do.
async fn bind(listen: &str, setting: &str) -> Result<tokio::net::TcpListener, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(listen)
        .await
        .map_err(|e| {
            format!(
                "{setting} `{listen}`: cannot resolve the host name ({e}); use a name this machine resolves (DNS or /etc/hosts) or an IP address, e.g. 127.0.0.1:8080"
            )
        })?
        .collect();
    if addrs.is_empty() {
        return Err(format!(
            "{setting} `{listen}`: the host name resolves to no address; use an IP address, e.g. 127.0.0.1:8080"
        ));
    }
    let mut failures = Vec::new();
    for addr in &addrs {
        match Gateway::bind(*addr).await {
            Ok(listener) => {
                if listen.parse::<SocketAddr>().is_err() {
                    tracing::info!("{setting} `{listen}` resolved to {addrs:?}; bound {addr}");
                }
                return Ok(listener);
            }
            Err(e) => failures.push(format!("{addr}: {e}")),
        }
    }
    Err(format!(
        "cannot listen on {setting} `{listen}` ({}); is another process using the port? pass --listen HOST:PORT or change {setting}",
        failures.join("; ")
    ))
}

/// Reloads the config file on every SIGHUP from now on (SPEC §9), logging what
/// changed or every problem that kept the old config.
fn reload_on_sighup(gateway: &Gateway) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot listen for SIGHUP ({e}); reload with POST /admin/reload");
                return;
            }
        };
        let gateway = gateway.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let gw = gateway.clone();
                match tokio::task::spawn_blocking(move || gw.reload_file()).await {
                    Ok(Ok(report)) => tracing::info!(
                        "config reloaded (SIGHUP): {}",
                        serde_json::to_string(&report).unwrap_or_default()
                    ),
                    Ok(Err(e)) => {
                        tracing::error!("config reload refused (SIGHUP), the old config stays: {e}")
                    }
                    Err(e) => tracing::error!("config reload failed (SIGHUP): {e}"),
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = gateway;
}

/// Listens for Ctrl-C and SIGTERM from now on, and resolves on either; `grace` is
/// `[server].shutdown_grace_secs`. Called (in the runtime) before the listening line
/// is logged: a signal sent as soon as it is seen must start the drain, not meet the
/// default action (death, exit status 143).
fn shutdown_signal(grace: Duration) -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{signal, SignalKind};
        [
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ]
        .map(Result::ok)
    };
    async move {
        #[cfg(unix)]
        {
            let [term, int] = signals.map(|s| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            });
            tokio::select! { _ = term => {}, _ = int => {} }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!(
            "shutting down: no new connections; letting in-flight requests finish ({} s at most, [server].shutdown_grace_secs)",
            grace.as_secs()
        );
    }
}
