//! The `active-calls-agent` command: `serve` (the default), `demo` and `token`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Parser, Subcommand};

use active_calls_agent::auth::Authenticator;
use active_calls_agent::config::Config;
use active_calls_agent::demo::{self, DemoOptions};

#[derive(Parser)]
#[command(
    version,
    about = "Serves yeti's outgoing-active-calls API from the switch node"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The configuration file (for `serve` when no command is given).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Serve,
    /// A first run: a simulated switch, a sample directory, and a curl line to try.
    Demo {
        /// Where the demo writes its configuration, directory, snapshot and database.
        #[arg(long, default_value = "demo-data")]
        dir: PathBuf,
        /// The API listener.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// How many calls the simulated switch carries.
        #[arg(long, default_value_t = 300)]
        calls: usize,
        /// Seconds between two snapshots.
        #[arg(long, default_value_t = 3)]
        period: u64,
    },
    /// Measure the agent: apply times, latency, throughput, memory (see BENCHMARKS.md).
    Bench {
        /// Calls in the large snapshot.
        #[arg(long, default_value_t = 100_000)]
        calls: usize,
        /// Calls in the small snapshot.
        #[arg(long, default_value_t = 10_000)]
        small_calls: usize,
        /// Seconds of each throughput run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Connections of the throughput runs.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Keep the agents' files here (default: a temporary folder).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Also write the large snapshot, directory and queries here.
        #[arg(long)]
        dump: Option<PathBuf>,
    },
    /// Print a customer token for an API access id, signed with the configured secret.
    Token {
        /// The API access id (the token's `sub`).
        #[arg(long)]
        access_id: i64,
        /// Seconds until it expires; 0 = no `exp` claim.
        #[arg(long, default_value_t = 3600)]
        lifetime: u64,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours for a terminal, plain text for the journal.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let config = Config::load(cli.config.as_deref())?;
            runtime.block_on(active_calls_agent::serve(&config))
        }
        Command::Demo {
            dir,
            listen,
            calls,
            period,
        } => runtime.block_on(demo::run(DemoOptions {
            dir,
            listen,
            calls,
            period: Duration::from_secs(period.max(1)),
        })),
        Command::Bench {
            calls,
            small_calls,
            seconds,
            connections,
            dir,
            dump,
        } => active_calls_agent::bench::run(active_calls_agent::bench::BenchOptions {
            calls,
            small_calls,
            seconds: seconds.max(1),
            connections: connections.max(1),
            dir,
            dump,
        }),
        Command::Token {
            access_id,
            lifetime,
        } => {
            let config = Config::load(cli.config.as_deref())?;
            let secret = config
                .jwt_secret()?
                .context("no api.jwt_secret configured")?;
            let auth = Authenticator::new(Some(&secret), Duration::from_secs(lifetime));
            let token = auth
                .issue_for_access(access_id, SystemTime::now())
                .context("signing the token")?;
            println!("{token}");
            Ok(())
        }
    }
}
