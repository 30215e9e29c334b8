//! `active-calls-agent calls`: the node's current calls, from a shell on the node.
//!
//! It opens the store read-only, as the local admin scripts do, so it needs no token and
//! no running agent: the database file's permissions decide who may read it. It asks
//! the store through the same statements and the same filters as the customer endpoint
//! ([`Readers::list_calls`] shares their conditions and row writer), and each filter flag
//! is read by the endpoint's own parameter code ([`params::filter`]): a flag means what
//! its query-string parameter means, and no second query engine can drift from the first.

use std::ffi::OsString;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::SystemTime;

use anyhow::{Context, bail};
use clap::{Arg, ArgMatches, FromArgMatches};

use crate::api::params;
use crate::clock::unix_millis;
use crate::config::Config;
use crate::directory::Directory;
use crate::store::{CallListing, CountBy, Filter, Readers};

/// What `calls` was asked.
#[derive(Debug, clap::Args)]
pub struct CallsOptions {
    /// Only this node's calls.
    #[arg(long, value_name = "NODE_ID")]
    node: Option<i64>,
    /// Only this customer's calls (its contractor id).
    #[arg(long, value_name = "CUSTOMER_ID")]
    customer: Option<i64>,
    /// Only this account's calls: its id, or its uuid (looked up in the directory).
    #[arg(long, value_name = "ID|UUID")]
    account: Option<String>,
    /// Print JSON for scripts: `{"data":[calls],"rows":N}`, each call as the node-wide
    /// scrape writes it (its node, local tag, customer and account, then the endpoint's
    /// columns).
    #[arg(long)]
    json: bool,
    /// Print how many calls each node, customer or account has instead.
    #[arg(long, value_name = "WHAT")]
    by: Option<By>,
    /// Also the calls of stale nodes (silent past feed.stale_after), which the endpoint
    /// leaves out.
    #[arg(long)]
    include_stale: bool,
    #[command(flatten)]
    filters: FilterFlags,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum By {
    Node,
    Customer,
    Account,
}

impl From<By> for CountBy {
    fn from(by: By) -> CountBy {
        match by {
            By::Node => CountBy::Node,
            By::Customer => CountBy::Customer,
            By::Account => CountBy::Account,
        }
    }
}

/// The endpoint's filter parameters as flags (`--dst-prefix-in-starts-with 380`), made
/// from its list of parameters rather than written out a second time.
#[derive(Debug, Clone, Default)]
struct FilterFlags(Vec<(&'static str, OsString)>);

const FILTERS_HEADING: &str = "Filters (the endpoint's parameters, with the same meaning)";

impl FromArgMatches for FilterFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(FilterFlags(
            params::filter_names()
                .filter_map(|name| Some((name, matches.get_one::<OsString>(name)?.clone())))
                .collect(),
        ))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = FilterFlags::from_arg_matches(matches)?;
        Ok(())
    }
}

impl clap::Args for FilterFlags {
    fn augment_args(command: clap::Command) -> clap::Command {
        params::filter_names().fold(command, |command, name| {
            command.arg(
                Arg::new(name)
                    .long(name)
                    .value_name("VALUE")
                    .value_parser(clap::value_parser!(OsString))
                    // `--auth-orig-port -1` is a value; a needle that starts with '-'
                    // is written `--src-name-in-eq=-x`, and a flag is never a value.
                    .allow_negative_numbers(true)
                    .help(filter_help(name))
                    .help_heading(FILTERS_HEADING),
            )
        })
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        FilterFlags::augment_args(command)
    }
}

/// One line of help for a filter flag, from its name.
fn filter_help(name: &'static str) -> String {
    for (suffix, how) in [
        ("-eq", "is"),
        ("-starts-with", "starts with"),
        ("-ends-with", "ends with"),
        ("-contains", "contains"),
    ] {
        if let Some(column) = name.strip_suffix(suffix) {
            let case = if suffix == "-contains" {
                " (ASCII case ignored)"
            } else {
                ""
            };
            return format!("{} {how} VALUE{case}", column.replace('-', "_"));
        }
    }
    match name {
        "connect-time-null" => "VALUE empty, 0, f, F, false, FALSE, off or OFF: only answered \
                                calls; anything else: only calls not yet answered (as at the \
                                endpoint)"
            .into(),
        _ => format!("{} is VALUE", name.replace('-', "_")),
    }
}

/// Runs `calls` with `config`'s store (and directory, for an account's uuid), printing
/// to `out`. A reader that stops reading (`calls | head`) is no error.
pub fn run(config: &Config, options: &CallsOptions, out: &mut dyn Write) -> anyhow::Result<()> {
    match list(config, options, out) {
        Err(e)
            if e.chain().any(|cause| {
                cause
                    .downcast_ref::<io::Error>()
                    .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
            }) =>
        {
            Ok(())
        }
        done => done,
    }
}

fn list(config: &Config, options: &CallsOptions, out: &mut dyn Write) -> anyhow::Result<()> {
    let path = &config.store.path;
    readable(path)?;
    let now = SystemTime::now();
    let (account_id, customer_id) = match options.account.as_deref() {
        None => (None, options.customer),
        Some(account) => {
            let (id, owner) = account_id(account, &config.directory.path)?;
            (Some(id), scope(account, owner, options.customer)?)
        }
    };
    let listing = CallListing {
        node_id: options.node,
        customer_id,
        account_id,
        filters: filters(&options.filters)?,
        now_ms: if options.include_stale {
            i64::MIN
        } else {
            unix_millis(now)
        },
    };
    let by = options.by.map(CountBy::from);
    let reading = || format!("reading the store {}", path.display());
    let at_rest = !Readers::may_be_written(path);
    let mut readers = if at_rest {
        Readers::at_rest(path)
    } else {
        Readers::new(path)
    };
    let mut listed = read(&readers, &listing, by).with_context(reading)?;
    if at_rest && Readers::may_be_written(path) {
        // An agent started during that read, and may have changed the file under it,
        // which an immutable reader does not see: read again, as an ordinary reader.
        readers = Readers::new(path);
        listed = read(&readers, &listing, by).with_context(reading)?;
    }
    let mut out = io::BufWriter::new(out);
    match listed {
        Listed::Counts(by, counts, periods) => {
            print_counts(&mut out, by, &counts, &periods, options.json)?
        }
        Listed::Calls(calls) if options.json => print_json(&mut out, &calls)?,
        Listed::Calls(calls) => print_table(&mut out, &calls)?,
    }
    out.flush()?;
    if !options.include_stale {
        note_stale(&readers, unix_millis(now));
    }
    Ok(())
}

/// What a listing read: each call as a scrape's JSON object, or the counts.
enum Listed {
    Calls(Vec<Vec<u8>>),
    /// The counts, and with them per node each node's learned period (`None`: unknown).
    Counts(CountBy, Vec<(i64, i64)>, Vec<(i64, Option<i64>)>),
}

/// Reads the whole listing before anything is printed: a read transaction held open
/// while a paused terminal or pipe (`calls --json | less`) takes its time would keep the
/// agent's checkpoints from recycling its WAL, which would grow with every snapshot.
fn read(readers: &Readers, listing: &CallListing, by: Option<CountBy>) -> rusqlite::Result<Listed> {
    Ok(match by {
        Some(by) => {
            let periods = match by {
                CountBy::Node => readers
                    .node_stats()?
                    .into_iter()
                    .map(|n| (n.node_id, n.period_ms))
                    .collect(),
                CountBy::Customer | CountBy::Account => Vec::new(),
            };
            Listed::Counts(by, readers.count_calls(listing, by)?, periods)
        }
        None => Listed::Calls(readers.list_calls(listing)?),
    })
}

/// The customer a listing of `account` is scoped to. As the endpoint does, an account
/// given by uuid is taken with its directory customer, so that calls the switch filed
/// under another customer are not listed for it; `--customer` must then agree.
fn scope(account: &str, owner: Option<i64>, customer: Option<i64>) -> anyhow::Result<Option<i64>> {
    match (owner, customer) {
        (Some(owner), Some(customer)) if owner != customer => bail!(
            "account {account} is customer {owner}'s in the directory, not --customer {customer}'s"
        ),
        (Some(owner), _) => Ok(Some(owner)),
        (None, customer) => Ok(customer),
    }
}

/// Fails with what to do when the store is missing or this user may not read it.
fn readable(path: &Path) -> anyhow::Result<()> {
    match std::fs::File::open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
            "no store at {} (store.path; on a packaged node: --config \
             /etc/active-calls-agent/config.toml)",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => bail!(
            "may not read the store {}: its permissions decide who may (on a packaged node: \
             root, or a member of the active-calls-agent group)",
            path.display()
        ),
        Err(e) => Err(e).with_context(|| format!("opening the store {}", path.display())),
    }
}

/// An account given as its id, or as its uuid (found in the directory, with the
/// customer it belongs to).
fn account_id(account: &str, directory: &Path) -> anyhow::Result<(i64, Option<i64>)> {
    if let Ok(id) = account.parse::<i64>() {
        return Ok((id, None));
    }
    if crate::directory::parse_uuid(account.as_bytes()).is_none() {
        bail!("--account {account:?} is neither an account id nor a uuid");
    }
    let directory = Directory::load(directory)
        .with_context(|| format!("looking up account {account} in the directory"))?;
    match directory.account_by_uuid(account.as_bytes()) {
        Some(found) => Ok((found.id, Some(found.contractor_id))),
        None => bail!("account {account} is not in the directory"),
    }
}

/// The flags' filters, or the endpoint's 400 message for the first bad one.
fn filters(flags: &FilterFlags) -> anyhow::Result<Vec<Filter>> {
    flags
        .0
        .iter()
        .map(
            |(name, value)| match params::filter(name, value.as_bytes().to_vec()) {
                Some(Ok(filter)) => Ok(filter),
                Some(Err(e)) => bail!(
                    "--{name} {value:?} is not valid (the endpoint would answer 400: {})",
                    e.message()
                ),
                None => bail!("--{name} is not a filter"),
            },
        )
        .collect()
}

/// `{"data":[calls],"rows":N}`.
fn print_json(out: &mut dyn Write, calls: &[Vec<u8>]) -> io::Result<()> {
    out.write_all(b"{\"data\":[")?;
    for (i, call) in calls.iter().enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        out.write_all(call)?;
    }
    writeln!(out, "],\"rows\":{}}}", calls.len())
}

/// A row of the table: which call, and what an operator looks at first.
const TABLE_COLUMNS: [(&str, &str); 10] = [
    ("NODE", "node_id"),
    ("CUSTOMER", "customer_id"),
    ("ACCOUNT", "customer_acc_id"),
    ("START_TIME", "start_time"),
    ("CONNECT_TIME", "connect_time"),
    ("SRC_PREFIX_IN", "src_prefix_in"),
    ("DST_PREFIX_IN", "dst_prefix_in"),
    ("DST_PREFIX_ROUTING", "dst_prefix_routing"),
    ("AUTH_ORIG", "auth_orig_ip"),
    ("LOCAL_TAG", "local_tag"),
];

fn print_table(out: &mut dyn Write, calls: &[Vec<u8>]) -> anyhow::Result<()> {
    let cells = calls
        .iter()
        .map(|call| serde_json::from_slice(call).map(|call| table_row(&call)))
        .collect::<Result<Vec<_>, _>>()
        .context("a stored call is not JSON: a bug")?;
    aligned(out, &TABLE_COLUMNS.map(|(title, _)| title), &cells)?;
    writeln!(out, "{} call(s)", cells.len())?;
    Ok(())
}

/// `header` and `rows` in columns two spaces apart, each as wide as its widest cell.
fn aligned<const N: usize>(
    out: &mut dyn Write,
    header: &[&str; N],
    rows: &[[String; N]],
) -> io::Result<()> {
    let header = header.map(str::to_string);
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    Ok(())
}

/// The table's cells of one call (a scrape's JSON object).
fn table_row(call: &serde_json::Value) -> [String; TABLE_COLUMNS.len()] {
    TABLE_COLUMNS.map(|(_, key)| match (key, &call[key]) {
        ("auth_orig_ip", ip) => format!("{}:{}", text(ip), text(&call["auth_orig_port"])),
        (_, value) => text(value),
    })
}

/// A value as a cell: `-` for null, and a string's control characters escaped, so that
/// what a switch sent can neither break the table nor drive the terminal.
fn text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) if s.is_empty() => "\"\"".into(),
        serde_json::Value::String(s) => {
            let mut cell = String::with_capacity(s.len());
            for c in s.chars() {
                if c.is_control() {
                    cell.extend(c.escape_default());
                } else {
                    cell.push(c);
                }
            }
            cell
        }
        other => other.to_string(),
    }
}

fn print_counts(
    out: &mut dyn Write,
    by: CountBy,
    counts: &[(i64, i64)],
    periods: &[(i64, Option<i64>)],
    json: bool,
) -> anyhow::Result<()> {
    let column = by.column();
    // Per node, its learned snapshot period (SPEC 2.5), in seconds.
    let period = |id: &i64| {
        (by == CountBy::Node).then(|| {
            periods
                .iter()
                .find(|(node, _)| node == id)
                .and_then(|(_, ms)| *ms)
                .map(|ms| ms as f64 / 1000.0)
        })
    };
    if json {
        let data: Vec<String> = counts
            .iter()
            .map(|(id, calls)| match period(id) {
                None => format!("{{\"{column}\":{id},\"calls\":{calls}}}"),
                Some(seconds) => format!(
                    "{{\"{column}\":{id},\"calls\":{calls},\"period\":{}}}",
                    seconds.map_or("null".into(), |s| s.to_string())
                ),
            })
            .collect();
        writeln!(
            out,
            "{{\"data\":[{}],\"rows\":{}}}",
            data.join(","),
            counts.len()
        )?;
        return Ok(());
    }
    // The call table's title of the column counted per.
    let title = TABLE_COLUMNS
        .iter()
        .find(|(_, key)| *key == column)
        .map_or(column, |(title, _)| title);
    if by == CountBy::Node {
        let rows: Vec<[String; 3]> = counts
            .iter()
            .map(|(id, calls)| {
                let seconds = period(id).flatten();
                let period = seconds.map_or("-".into(), |s| format!("{s} s"));
                [id.to_string(), calls.to_string(), period]
            })
            .collect();
        aligned(out, &[title, "CALLS", "PERIOD"], &rows)?;
    } else {
        let rows: Vec<[String; 2]> = counts
            .iter()
            .map(|(id, calls)| [id.to_string(), calls.to_string()])
            .collect();
        aligned(out, &[title, "CALLS"], &rows)?;
    }
    let total: i64 = counts.iter().map(|(_, calls)| calls).sum();
    writeln!(out, "{total} call(s)")?;
    Ok(())
}

/// Says on stderr which nodes were left out as stale: an empty table is then explained.
fn note_stale(readers: &Readers, now_ms: i64) {
    let Ok(nodes) = readers.node_stats() else {
        return;
    };
    let stale: Vec<String> = nodes
        .iter()
        .filter(|n| n.expires_at_ms <= now_ms && n.calls > 0)
        .map(|n| {
            format!(
                "node {} ({} call(s), last heard {} s ago)",
                n.node_id,
                n.calls,
                (now_ms - n.heard_at_ms) / 1000
            )
        })
        .collect();
    if !stale.is_empty() {
        eprintln!(
            "left out as stale: {}; --include-stale shows their calls",
            stale.join(", ")
        );
    }
}
