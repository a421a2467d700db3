//! The `switchboard` binary: parse the CLI, load the config, build the gateway, serve.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use switchboard::config::Config;
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
        None if demo_ok => {
            eprintln!("switchboard: no --config and no ./switchboard.toml: starting the built-in demo (provider `mock`, models mock/echo, mock/lorem and mock/embed, key sk-demo with $1 of credit, store ./switchboard.db)");
            return Ok(Config::demo());
        }
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

fn serve(path: Option<PathBuf>, listen: Option<String>) -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut config = match load(path, true) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Which setting the address came from, for the messages about it.
    let setting = match listen {
        Some(addr) => {
            if let Err(message) = switchboard::config::check_listen(&addr) {
                eprintln!("switchboard: --listen: {message}");
                return ExitCode::from(1);
            }
            config.server.listen = addr;
            "--listen"
        }
        None => "server.listen",
    };
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("switchboard: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let config_listen = config.server.listen.clone();
    runtime.block_on(async move {
        let gateway = match Gateway::builder().config(config).build() {
            Ok(g) => g,
            // The store or the request log cannot be opened: a runtime failure (SPEC §1).
            Err(
                e @ (switchboard::gateway::BuildError::Store(_)
                | switchboard::gateway::BuildError::Logging(_)),
            ) => {
                eprintln!("switchboard: {e}");
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("switchboard: {e}");
                return ExitCode::from(1);
            }
        };
        let listener = match bind(&config_listen, setting).await {
            Ok(l) => l,
            Err(message) => {
                eprintln!("switchboard: {message}");
                return ExitCode::from(2);
            }
        };
        let shutdown = shutdown_signal();
        let local = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::info!("switchboard listening on http://{local}");
        match gateway
            .serve(listener, shutdown, Duration::from_secs(30))
            .await
        {
            Ok(()) => {
                tracing::info!("switchboard stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("switchboard: server failed: {e}");
                ExitCode::from(2)
            }
        }
    })
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

/// Resolves on Ctrl-C or SIGTERM. SIGTERM is caught from the call on (not from the
/// first poll), so one sent as soon as "listening" is printed is a graceful stop too.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    async move {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        let term = async {
            match term {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! { _ = ctrl_c => {}, _ = term => {} }
        tracing::info!(
            "shutting down: no new connections; letting in-flight requests finish (30 s at most)"
        );
    }
}
