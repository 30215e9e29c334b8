//! The `active-calls-agent` command: `serve` (the default), `check`, `calls`, `demo`,
//! `bench`, `soak` and `token`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Parser, Subcommand};

use active_calls_agent::auth::Authenticator;
use active_calls_agent::config::Config;
use active_calls_agent::lab::demo::{self, DemoOptions};

#[derive(Parser)]
#[command(
    version,
    about = "Serves yeti's outgoing-active-calls API from the switch node"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The configuration file, for serve (the default command), check, calls and token;
    /// demo, bench and soak make their own.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Serve,
    /// Validate the configuration, the secret, the directory and the store, and say what
    /// is wrong (exit status 1 if anything would keep the agent from serving).
    Check,
    /// Print the node's current calls from the store (read-only; no token needed), with
    /// the endpoint's filters as flags, or counts per node, customer or account.
    Calls(active_calls_agent::calls::CallsOptions),
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
        /// Only the hostile clients' figures: trickling feed senders, and slow readers
        /// of the largest answer, of the scrape and of the metrics.
        #[arg(long)]
        hostile: bool,
        /// Only the call events' figures (issue 19): an event's answer and the time until
        /// it shows, idle and beside an apply, the sustained rate beside queries, and a
        /// minute's CPU with a 60 s period and events against a 5 s one without.
        #[arg(long, conflicts_with = "hostile")]
        events: bool,
        /// Only the live streams' figures (issue 21): an event's latency to 100 streams,
        /// RSS and CPU with 1,000, a period's reach, and 50 streams that never read.
        #[arg(long, conflicts_with_all = ["hostile", "events"])]
        streams: bool,
        /// Only the large node's four applies beside their floors (issue 23's figures),
        /// without the queries, the relay and the file.
        #[arg(long, conflicts_with_all = ["hostile", "events", "streams"])]
        applies: bool,
    },
    /// A bounded soak: mixed queries while snapshots arrive every second; fails on any
    /// 5xx, torn answer or memory growth (see RELIABILITY.md).
    Soak {
        /// Seconds of load.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Query connections.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Queries a second, over all connections.
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        /// Calls in the smallest snapshot.
        #[arg(long, default_value_t = 10_000)]
        min_calls: usize,
        /// Calls in the largest snapshot.
        #[arg(long, default_value_t = 100_000)]
        max_calls: usize,
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

/// glibc gives each thread that allocates under contention an arena of its own (up to
/// eight per core), and keeps freed memory in each: with the API's worker and blocking
/// threads, the soak showed ~170 MB of resident memory, most of it free memory spread over
/// arenas. Two arenas keep the allocator fast on two cores and the footprint small.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before any other
    // thread exists, takes no pointers, and an unsupported value is ignored (returns 0).
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// An error is one line on stderr (its causes after colons), exit status 1: no
/// backtrace, which `RUST_BACKTRACE` would add to an `anyhow` error returned from main.
fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    limit_malloc_arenas();
    let cli = Cli::parse();
    if cli.config.is_some()
        && matches!(
            cli.command,
            Some(Command::Demo { .. } | Command::Bench { .. } | Command::Soak { .. })
        )
    {
        anyhow::bail!(
            "demo, bench and soak make their own configuration: --config is not used \
             (the demo's files go where --dir says)"
        );
    }
    let command = cli.command.unwrap_or(Command::Serve);
    // The configuration is read before logging starts, so that its level applies from
    // the first line.
    let config = match command {
        Command::Serve | Command::Token { .. } | Command::Calls(_) => {
            Config::load(cli.config.as_deref())?
        }
        Command::Check | Command::Demo { .. } | Command::Bench { .. } | Command::Soak { .. } => {
            Config::default()
        }
    };
    // The demo keeps its terminal for its curl lines: warnings only.
    let level = if matches!(command, Command::Demo { .. }) {
        "warn"
    } else {
        config.log.level.as_str()
    };
    let logs = active_calls_agent::logs::init(level);
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the runtime")
    };
    match command {
        Command::Serve => {
            runtime()?.block_on(active_calls_agent::serve(cli.config, config, &logs))?
        }
        Command::Check => {
            let path = cli.config.context("check needs --config FILE")?;
            let report = active_calls_agent::check::check(&path);
            print!("{report}");
            if report.has_errors() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Calls(options) => {
            active_calls_agent::calls::run(&config, &options, &mut std::io::stdout().lock())?
        }
        Command::Demo {
            dir,
            listen,
            calls,
            period,
        } => runtime()?.block_on(demo::run(DemoOptions {
            dir,
            listen,
            calls,
            period: Duration::from_secs(period.max(1)),
        }))?,
        Command::Bench {
            calls,
            small_calls,
            seconds,
            connections,
            dir,
            dump,
            hostile,
            events,
            streams,
            applies,
        } => active_calls_agent::lab::bench::run(active_calls_agent::lab::bench::BenchOptions {
            calls,
            small_calls,
            seconds: seconds.max(1),
            connections: connections.max(1),
            dir,
            dump,
            hostile,
            events,
            streams,
            applies,
        })?,
        Command::Soak {
            seconds,
            connections,
            rate,
            min_calls,
            max_calls,
        } => active_calls_agent::lab::soak::run(active_calls_agent::lab::soak::SoakOptions {
            seconds: seconds.max(1),
            connections: connections.max(1),
            rate,
            min_calls,
            max_calls,
        })?,
        Command::Token {
            access_id,
            lifetime,
        } => print_token(&config, access_id, lifetime)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `token`: prints a customer token for API access `access_id`, valid `lifetime` seconds.
fn print_token(config: &Config, access_id: i64, lifetime: u64) -> anyhow::Result<()> {
    let secret = config
        .jwt_secret()?
        .with_context(|| config.missing_secret())?;
    let auth = Authenticator::new(Some(&secret), Duration::from_secs(lifetime));
    let token = auth
        .issue_for_access(access_id, SystemTime::now())
        .context("signing the token")?;
    // Still printed: the directory may be about to get the access. But a token
    // the agent would refuse today is said so, on stderr.
    match active_calls_agent::directory::Directory::load(&config.directory.path) {
        Ok(directory) if directory.api_access(access_id).is_none() => eprintln!(
            "warning: API access {access_id} is not in the directory {}: the agent \
             answers this token 401 (unknown_access) until it is",
            config.directory.path.display()
        ),
        Ok(_) => {}
        Err(e) => eprintln!(
            "warning: cannot read the directory {} ({e:#}): access {access_id} not checked",
            config.directory.path.display()
        ),
    }
    println!("{token}");
    Ok(())
}
