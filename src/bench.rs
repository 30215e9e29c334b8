//! `active-calls-agent bench`: the performance benchmark (BENCHMARKS.md).
//!
//! It runs the real agent as a child process (so its memory is its own), over a fresh
//! folder, and drives it as the switch and the customers do: snapshots POSTed to the
//! socket source or renamed into the watched file, queries over HTTP/1.1 keep-alive
//! connections on loopback. Snapshots look like a switch's: ~100 keys and ~2.3 KB a row,
//! 1,000 accounts of 50 customers, one account holding 30% of the calls. Times come from
//! the client's clock (and, for applies, from the agent's own log line too); memory from
//! `/proc/<pid>/status`, the peak reset before each apply through `/proc/<pid>/clear_refs`.
//! Nothing here asserts a timing: it measures and prints.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

use crate::auth::Authenticator;
use crate::feed::format_datetime;

/// The benchmark's options (the `bench` command's flags).
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Calls in the large snapshot.
    pub calls: usize,
    /// Calls in the small snapshot.
    pub small_calls: usize,
    /// Seconds of each throughput run.
    pub seconds: u64,
    /// Connections of the throughput runs.
    pub connections: usize,
    /// Where to keep the agent's files (a temporary folder when not given).
    pub dir: Option<PathBuf>,
    /// Also write the large snapshot, the directory and the queries here (for the
    /// ClickHouse comparison of BENCHMARKS.md).
    pub dump: Option<PathBuf>,
}

const ACCOUNTS: i64 = 1000;
const CUSTOMERS: i64 = 50;
/// The account that holds 30% of the calls.
const BIG_ACCOUNT: i64 = 1;
const SECRET: &str = "bench-secret";
const ENDPOINT: &str = crate::api::OUTGOING_ACTIVE_CALLS;

fn customer_of(account: i64) -> i64 {
    1 + (account - 1) % CUSTOMERS
}

fn uuid_of(account: i64) -> String {
    format!("00000000-0000-4000-8000-{account:012x}")
}

/// One generated call: what changes per snapshot is rendered around what does not.
struct GenCall {
    account: i64,
    dst_prefix_in: String,
    /// Keys before `end_time`, and after it.
    head: String,
    tail: String,
}

/// Snapshots of one node with controlled churn.
pub struct SnapshotGen {
    rng: fastrand::Rng,
    calls: Vec<GenCall>,
    serial: u64,
}

impl SnapshotGen {
    pub fn new(seed: u64) -> SnapshotGen {
        SnapshotGen {
            rng: fastrand::Rng::with_seed(seed),
            calls: Vec::new(),
            serial: 0,
        }
    }

    /// Adds calls until there are `total`.
    pub fn fill(&mut self, total: usize, now: i64) {
        while self.calls.len() < total {
            let call = self.new_call(now);
            self.calls.push(call);
        }
    }

    /// 10% of the calls end, as many new ones start; the rest change only their
    /// snapshot timestamp.
    pub fn churn(&mut self, now: i64) {
        let total = self.calls.len();
        let gone = total / 10;
        for _ in 0..gone {
            let i = self.rng.usize(..self.calls.len());
            self.calls.swap_remove(i);
        }
        self.fill(total, now);
    }

    fn new_call(&mut self, now: i64) -> GenCall {
        self.serial += 1;
        let rng = &mut self.rng;
        let account = if rng.f64() < 0.3 {
            BIG_ACCOUNT
        } else {
            rng.i64(2..=ACCOUNTS)
        };
        let start = now - rng.i64(0..7200);
        let connect = rng.bool().then(|| start + rng.i64(1..30));
        let prefixes = ["380", "44", "49", "1", "7", "971", "123", "4930"];
        let number = |rng: &mut fastrand::Rng| {
            format!(
                "{}{}",
                prefixes[rng.usize(..prefixes.len())],
                rng.u64(1_000_000..100_000_000)
            )
        };
        let dst_prefix_in = number(rng);
        let names = [
            "Alice",
            "Bob",
            "ÄÖÜ",
            "Zoë",
            "O'Brien",
            "100%",
            "x*y",
            "bob_smith",
            "MiXeD",
            "",
        ];
        let sip = ["null", "\"\"", "\"anonymous\"", "\"<sip:1@x>\"", "\"Id\""];
        let pick = |rng: &mut fastrand::Rng, list: &[&'static str]| list[rng.usize(..list.len())];
        let local_tag = format!(
            "{:08X}-{:04X}-{:08X}",
            rng.u32(..),
            rng.u16(..),
            self.serial
        );
        let mut head = String::with_capacity(1400);
        let _ = write!(
            head,
            r#""node_id":1,"pop_id":4,"cdr_born_time":"{st}","start_time":"{st}","connect_time":{ct},"start_date":"{sd}","#,
            st = format_datetime(start),
            sd = &format_datetime(start)[..10],
            ct = connect
                .map(|c| format!("\"{}\"", format_datetime(c)))
                .unwrap_or_else(|| "null".into()),
        );
        let _ = write!(
            head,
            r#""legB_remote_port":5060,"legB_local_port":5061,"legA_remote_port":5060,"legA_local_port":5061,"legB_remote_ip":"10.1.2.3","legB_local_ip":"10.1.2.4","legA_remote_ip":"192.168.88.{a}","legA_local_ip":"192.168.88.24","orig_call_id":"{o}-{s}","term_call_id":"8-{t:X}","local_tag":"{local_tag}","global_tag":"","time_limit":7200,"dump_level_id":0,"audio_record_enabled":0,"attempt_num":1,"resources":"","active_resources":"","customer_id":{cu},"customer_acc_id":{account},"vendor_id":77,"vendor_acc_id":78,"customer_auth_id":20085,"destination_id":{d},"destination_prefix":"{dp}","dialpeer_id":{dd},"dialpeer_prefix":"380","orig_gw_id":19,"term_gw_id":20,"routing_group_id":24,"rateplan_id":18,"routing_plan_id":3,"#,
            a = rng.u8(1..255),
            o = rng.u32(..),
            s = self.serial,
            t = rng.u64(..),
            cu = customer_of(account),
            d = rng.u32(..),
            dp = &dst_prefix_in[..2],
            dd = rng.u32(..),
        );
        let mut tail = String::with_capacity(1200);
        let rates = [
            "\"0.0\"", "\"0.11\"", "\"0.5\"", "\"1\"", "\"2.3\"", "0.0123",
        ];
        let _ = write!(
            tail,
            r#""destination_initial_rate":{ir},"destination_next_rate":{nr},"destination_initial_interval":{ii},"destination_next_interval":{ni},"destination_fee":"0.01","destination_rate_policy_id":1,"dialpeer_initial_rate":"0.005","dialpeer_next_rate":"0.001","dialpeer_initial_interval":1,"dialpeer_next_interval":1,"dialpeer_fee":"0.0","src_name_in":"{sn}","src_name_out":"","src_prefix_in":"{sp}","src_prefix_out":"","dst_prefix_in":"{dst_prefix_in}","dst_prefix_out":"","src_prefix_routing":"{sr}","dst_prefix_routing":"{dr}","auth_orig_ip":"10.20.{x}.{y}","auth_orig_port":{port},"#,
            ir = pick(rng, &rates),
            nr = pick(rng, &rates),
            ii = if rng.bool() { "60" } else { "\"1\"" },
            ni = if rng.bool() { "60" } else { "1" },
            sn = pick(rng, &names),
            sp = number(rng),
            sr = number(rng),
            dr = number(rng),
            x = rng.u8(..),
            y = rng.u8(..),
            port = if rng.bool() { "5060" } else { "\"5061\"" },
        );
        let _ = write!(
            tail,
            r#""src_network_id":1522,"src_country_id":222,"dst_country_id":222,"dst_network_id":1522,"lrn":null,"lnp_database_id":null,"from_domain":"example.org","to_domain":"example.com","ruri_domain":"10.0.0.1","src_area_id":null,"dst_area_id":null,"routing_tag_ids":[1,2],"customer_acc_check_balance":1,"destination_reverse_billing":0,"dialpeer_reverse_billing":0,"customer_acc_vat":"0","customer_auth_name":"test auth","metadata":null,"diversion_in":{dv},"pai_in":{pai},"ppi_in":{ppi},"privacy_in":{pr},"rpid_in":{rp},"rpid_privacy_in":{rpp},"auth_orig_transport_protocol_id":{proto},"#,
            dv = pick(rng, &sip),
            pai = pick(rng, &sip),
            ppi = pick(rng, &sip),
            pr = pick(rng, &sip),
            rp = pick(rng, &sip),
            rpp = pick(rng, &sip),
            proto = rng.u8(1..4),
        );
        // The rest of a real row: media, resources, headers the agent never reads.
        let _ = write!(
            tail,
            r#""lega_user_agent":"Yeti-SBC/1.{v}","legb_user_agent":"FreeSWITCH-mod_sofia/1.10.{v}","lega_headers":{{"x-orig-ip":"192.168.88.{a}"}},"legb_headers":{{}},"pdd":{pdd},"rtt":0.{rtt},"early_media_present":false,"lega_codec":"PCMA/8000","legb_codec":"PCMA/8000","lega_rx_payloads":"8","legb_rx_payloads":"8","p_charge_info_in":null,"failed_resource_type_id":null,"failed_resource_id":null,"dump_file":null,"internal_disconnect_code":null,"is_redirected":false,"legb_disconnect_code":null,"auth_orig_protocol_name":"UDP","buffered":false"#,
            v = rng.u8(..),
            a = rng.u8(..),
            pdd = rng.f32(),
            rtt = rng.u16(..1000),
        );
        GenCall {
            account,
            dst_prefix_in,
            head,
            tail,
        }
    }

    /// The snapshot as the switch sends it at `now`: the INSERT line, then one row a call.
    pub fn render(&self, now: i64) -> Vec<u8> {
        let stamp = format_datetime(now);
        let mut out = Vec::with_capacity(self.calls.len() * 2400);
        out.extend_from_slice(b"INSERT INTO active_calls FORMAT JSONEachRow\n");
        for (i, call) in self.calls.iter().enumerate() {
            let _ = write!(
                out,
                r#"{{"id":{i},"snapshot_timestamp":"{stamp}","snapshot_date":"{date}",{head}"end_time":"{stamp}",{tail}}}"#,
                date = &stamp[..10],
                head = call.head,
                tail = call.tail,
            );
            out.push(b'\n');
        }
        out
    }

    /// `dst_prefix_in` values of the big account's calls, for selective queries.
    fn big_account_numbers(&self) -> Vec<String> {
        self.calls
            .iter()
            .filter(|c| c.account == BIG_ACCOUNT)
            .map(|c| c.dst_prefix_in.clone())
            .collect()
    }

    fn count_in(&self, account: i64) -> usize {
        self.calls.iter().filter(|c| c.account == account).count()
    }
}

/// The directory of the generated accounts: API access `n` sees customer `n`'s accounts.
pub fn directory_json() -> String {
    let accounts: Vec<String> = (1..=ACCOUNTS)
        .map(|a| {
            format!(
                r#"{{"id":{a},"uuid":"{}","contractor_id":{}}}"#,
                uuid_of(a),
                customer_of(a)
            )
        })
        .collect();
    let accesses: Vec<String> = (1..=CUSTOMERS)
        .map(|c| format!(r#"{{"id":{c},"customer_id":{c},"account_ids":[]}}"#))
        .collect();
    format!(
        r#"{{"accounts":[{}],"api_accesses":[{}]}}"#,
        accounts.join(","),
        accesses.join(",")
    )
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// The agent under test

struct AgentProcess {
    child: Child,
    api: SocketAddr,
    feed: SocketAddr,
    /// Server-side apply durations (ms) from the agent's log lines, as they come.
    applied: mpsc::Receiver<f64>,
    snapshot_file: PathBuf,
}

impl AgentProcess {
    fn start(dir: &Path) -> anyhow::Result<AgentProcess> {
        std::fs::create_dir_all(dir)?;
        let snapshot_file = dir.join("snapshot.jsonl");
        let config = dir.join("config.toml");
        std::fs::write(dir.join("directory.json"), directory_json())?;
        std::fs::write(
            &config,
            format!(
                "[api]\nlisten = \"127.0.0.1:0\"\njwt_secret = \"{SECRET}\"\n[store]\npath = {:?}\n\
                 [feed]\nwatch = {:?}\nlisten = \"127.0.0.1:0\"\nstale_after = 0\n\
                 [directory]\npath = {:?}\n",
                dir.join("active-calls.db"),
                snapshot_file,
                dir.join("directory.json"),
            ),
        )?;
        let mut child = Command::new(std::env::current_exe()?)
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the agent")?;
        let stderr = child.stderr.take().context("the agent's stderr")?;
        let (lines_tx, lines) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut api, mut feed) = (None, None);
        while api.is_none() || feed.is_none() {
            let line = lines
                .recv_timeout(Duration::from_secs(30))
                .context("the agent did not start")?;
            let addr = || line.rsplit('=').next()?.trim().parse::<SocketAddr>().ok();
            if line.contains("serving") {
                api = addr();
            } else if line.contains("taking snapshots over HTTP") {
                feed = addr();
            }
        }
        let (applied_tx, applied) = mpsc::channel();
        std::thread::spawn(move || {
            for line in lines {
                if line.contains("snapshot rejected") {
                    eprintln!("agent: {line}");
                }
                let ms = line
                    .split("duration_ms=")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok());
                if let Some(ms) = ms
                    && applied_tx.send(ms).is_err()
                {
                    break;
                }
            }
        });
        Ok(AgentProcess {
            child,
            api: api.context("no API address")?,
            feed: feed.context("no feed address")?,
            applied,
            snapshot_file,
        })
    }

    fn proc_status(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    }

    /// Resident memory now, MB.
    fn rss_mb(&self) -> f64 {
        self.proc_status("VmRSS:") as f64 / 1024.0
    }

    /// Peak resident memory since the last reset, MB.
    fn peak_mb(&self) -> f64 {
        self.proc_status("VmHWM:") as f64 / 1024.0
    }

    fn reset_peak(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5");
    }

    /// POSTs a snapshot; the client-observed time until the 200.
    fn post(&self, body: &[u8]) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut conn = Conn::open(self.feed)?;
        let head = format!(
            "POST / HTTP/1.1\r\nHost: agent\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        conn.writer.write_all(head.as_bytes())?;
        conn.writer.write_all(body)?;
        let reply = conn.read_reply()?;
        if reply.status != 200 {
            bail!(
                "snapshot refused: {} {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
        }
        let _ = self.applied.recv_timeout(Duration::from_secs(120));
        Ok(started.elapsed())
    }

    /// Renames a snapshot file into place; the time until the agent logged it applied,
    /// and the duration it logged.
    fn feed_file(&self, body: &[u8]) -> anyhow::Result<(Duration, f64)> {
        let tmp = self.snapshot_file.with_extension("writing");
        std::fs::write(&tmp, body)?;
        while self.applied.try_recv().is_ok() {}
        let started = Instant::now();
        std::fs::rename(&tmp, &self.snapshot_file)?;
        let ms = self
            .applied
            .recv_timeout(Duration::from_secs(120))
            .context("the file was not applied")?;
        Ok((started.elapsed(), ms))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// A minimal keep-alive HTTP/1.1 client (the load generator must not be the bottleneck)

struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

struct Reply {
    status: u16,
    runtime: Option<f64>,
    body: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Conn {
            reader: BufReader::with_capacity(64 * 1024, stream.try_clone()?),
            writer: stream,
        })
    }

    fn get(&mut self, target: &str, token: &str) -> anyhow::Result<Reply> {
        let head = format!(
            "GET {target} HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        self.writer.write_all(head.as_bytes())?;
        self.read_reply()
    }

    fn read_reply(&mut self) -> anyhow::Result<Reply> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line.split(' ').nth(1).context("no status line")?.parse()?;
        let (mut length, mut runtime) = (0usize, None);
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse()?;
                } else if name.eq_ignore_ascii_case("x-runtime") {
                    runtime = value.trim().parse().ok();
                }
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        Ok(Reply {
            status,
            runtime,
            body,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Queries

/// A random account-filtered query: a small account, 0–3 random filters of SPEC 1.2.
fn random_query(rng: &mut fastrand::Rng) -> (String, i64) {
    let account = rng.i64(2..=ACCOUNTS);
    let mut target = format!("{ENDPOINT}?account-id={}", uuid_of(account));
    let columns = [
        "src-name-in",
        "src-prefix-in",
        "dst-prefix-in",
        "src-prefix-routing",
        "dst-prefix-routing",
    ];
    for _ in 0..rng.usize(0..=3) {
        let filter = match rng.u8(..8) {
            0 => format!("auth-orig-port={}", if rng.bool() { 5060 } else { 5061 }),
            1 => format!(
                "connect-time-null={}",
                if rng.bool() { "true" } else { "false" }
            ),
            2 => format!("auth-orig-transport-protocol-id={}", rng.u8(1..4)),
            3 => format!("{}-eq={}", columns[rng.usize(..5)], rng.u32(..1000)),
            4 => format!(
                "{}-starts-with={}",
                columns[rng.usize(1..5)],
                ["38", "44", "49", "1", "7"][rng.usize(..5)]
            ),
            5 => format!("{}-ends-with={}", columns[rng.usize(1..5)], rng.u8(..100)),
            6 => format!(
                "src-name-in-contains={}",
                ["ali", "B", "x", "%25"][rng.usize(..4)]
            ),
            _ => format!("auth-orig-ip=10.20.{}.{}", rng.u8(..), rng.u8(..)),
        };
        target.push('&');
        target.push_str(&filter);
    }
    (target, customer_of(account))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn tokens() -> HashMap<i64, String> {
    let auth = Authenticator::new(Some(SECRET.as_bytes()), Duration::ZERO);
    (1..=CUSTOMERS)
        .filter_map(|c| Some((c, auth.issue_for_access(c, SystemTime::now())?)))
        .collect()
}

/// Requests/s over `connections` connections for `seconds`, with small answers.
fn throughput(
    api: SocketAddr,
    connections: usize,
    seconds: u64,
    tokens: &HashMap<i64, String>,
) -> anyhow::Result<(f64, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..connections)
        .map(|w| {
            let (stop, tokens) = (stop.clone(), tokens.clone());
            std::thread::spawn(move || -> anyhow::Result<(u64, u64)> {
                let mut rng = fastrand::Rng::with_seed(100 + w as u64);
                let mut conn = Conn::open(api)?;
                let (mut done, mut errors) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    // A selective filter: answers of zero to a few rows.
                    let account = rng.i64(2..=ACCOUNTS);
                    let target = format!(
                        "{ENDPOINT}?account-id={}&dst-prefix-in-starts-with={}",
                        uuid_of(account),
                        ["3805", "4420", "4930", "9715"][rng.usize(..4)]
                    );
                    let reply = conn.get(&target, &tokens[&customer_of(account)])?;
                    if reply.status == 200 {
                        done += 1;
                    } else {
                        errors += 1;
                    }
                }
                Ok((done, errors))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let (mut done, mut errors) = (0, 0);
    for worker in workers {
        let (d, e) = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        done += d;
        errors += e;
    }
    Ok((done as f64 / seconds as f64, errors))
}

// ---------------------------------------------------------------------------------------
// The run

struct Row {
    what: String,
    value: String,
    target: &'static str,
}

/// Runs the benchmark and prints its table.
pub fn run(options: BenchOptions) -> anyhow::Result<()> {
    let scratch;
    let base = match &options.dir {
        Some(dir) => dir.clone(),
        None => {
            scratch =
                std::env::temp_dir().join(format!("active-calls-bench-{}", std::process::id()));
            scratch.clone()
        }
    };
    let _ = std::fs::remove_dir_all(&base);
    let mut rows: Vec<Row> = Vec::new();
    let mut add = |what: &str, value: String, target: &'static str| {
        eprintln!("  {what}: {value}");
        rows.push(Row {
            what: what.into(),
            value,
            target,
        });
    };
    let now = unix_now();
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);

    eprintln!(
        "generating snapshots ({} and {} calls)…",
        options.small_calls, options.calls
    );
    let mut small = SnapshotGen::new(1);
    small.fill(options.small_calls, now);
    let small_body = small.render(now);
    let mut large = SnapshotGen::new(2);
    large.fill(options.calls, now);
    let large_body = large.render(now);
    let row_bytes = large_body.len() / options.calls.max(1);
    add(
        "snapshot size",
        format!(
            "{} calls, {:.1} MB, {} B a row",
            options.calls,
            large_body.len() as f64 / 1e6,
            row_bytes
        ),
        "",
    );
    if let Some(dump) = &options.dump {
        std::fs::create_dir_all(dump)?;
        std::fs::write(dump.join("snapshot.jsonl"), &large_body)?;
        std::fs::write(dump.join("directory.json"), directory_json())?;
    }

    // Small snapshot, both sources.
    {
        let agent = AgentProcess::start(&base.join("small-socket"))?;
        add(
            &format!("full {}-call snapshot, socket", options.small_calls),
            ms(agent.post(&small_body)?),
            "",
        );
        let agent = AgentProcess::start(&base.join("small-file"))?;
        let (wall, logged) = agent.feed_file(&small_body)?;
        add(
            &format!("full {}-call snapshot, file", options.small_calls),
            format!("{} (applied in {logged:.0} ms)", ms(wall)),
            "",
        );
    }

    // Large snapshot through the socket, then a churn snapshot, then the queries.
    let agent = AgentProcess::start(&base.join("large-socket"))?;
    std::thread::sleep(Duration::from_millis(500));
    add(
        "idle RSS, empty store",
        format!("{:.1} MB", agent.rss_mb()),
        "≤ 20 MB",
    );
    agent.reset_peak();
    let full = agent.post(&large_body)?;
    add(
        &format!("full {}-call snapshot, socket", options.calls),
        ms(full),
        "≤ 1500 ms",
    );
    add(
        &format!("peak RSS during the full {}-call apply", options.calls),
        format!("{:.1} MB", agent.peak_mb()),
        "≤ 96 MB",
    );
    large.churn(now + 5);
    let churn_body = large.render(now + 5);
    agent.reset_peak();
    add(
        "10%-churn snapshot, socket",
        ms(agent.post(&churn_body)?),
        "≤ 600 ms",
    );
    add(
        "peak RSS during the churn apply",
        format!("{:.1} MB", agent.peak_mb()),
        "≤ 96 MB",
    );
    // Idle: no snapshot for longer than the agent keeps its write cache (10 s).
    std::thread::sleep(Duration::from_secs(12));
    add(
        &format!("idle RSS, {} calls stored", options.calls),
        format!("{:.1} MB", agent.rss_mb()),
        "≤ 20 MB",
    );

    let tokens = tokens();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut conn = Conn::open(agent.api)?;
    let mut latencies = Vec::new();
    let mut server_times = Vec::new();
    let mut queries = Vec::new();
    for i in 0..3000 {
        let (target, customer) = random_query(&mut rng);
        let started = Instant::now();
        let reply = conn.get(&target, &tokens[&customer])?;
        if i >= 200 {
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
            server_times.extend(reply.runtime.map(|r| r * 1000.0));
        }
        if reply.status != 200 {
            bail!("{target}: {}", reply.status);
        }
        queries.push(target);
    }
    let latencies = sorted(latencies);
    add(
        "latency, 1 connection, small account, 0–3 random filters (p50 / p99)",
        format!(
            "{:.3} / {:.3} ms",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99)
        ),
        "≤ 0.3 / 2 ms",
    );
    let server_times = sorted(server_times);
    add(
        "the same, server time (X-Runtime, p50 / p99)",
        format!(
            "{:.3} / {:.3} ms",
            percentile(&server_times, 0.5),
            percentile(&server_times, 0.99)
        ),
        "",
    );

    let numbers = large.big_account_numbers();
    let big = uuid_of(BIG_ACCOUNT);
    let big_token = &tokens[&customer_of(BIG_ACCOUNT)];
    add(
        "calls in the big account",
        format!("{}", large.count_in(BIG_ACCOUNT)),
        "",
    );
    for (kind, make) in [
        (
            "-eq",
            (|n: &str| format!("dst-prefix-in-eq={n}")) as fn(&str) -> String,
        ),
        ("-starts-with", |n: &str| {
            format!("dst-prefix-in-starts-with={}", &n[..n.len() - 2])
        }),
        ("-ends-with", |n: &str| {
            format!("dst-prefix-in-ends-with={}", &n[n.len() - 6..])
        }),
    ] {
        let mut server = Vec::new();
        for i in 0..1000 {
            let n = &numbers[rng.usize(..numbers.len())];
            let target = format!("{ENDPOINT}?account-id={big}&{}", make(n));
            let reply = conn.get(&target, big_token)?;
            if i >= 100
                && let Some(runtime) = reply.runtime
            {
                server.push(runtime * 1000.0);
            }
            if i == 0 {
                queries.push(target);
            }
        }
        let server = sorted(server);
        add(
            &format!("server time (X-Runtime), selective {kind} in the big account (p50 / p99)"),
            format!(
                "{:.3} / {:.3} ms",
                percentile(&server, 0.5),
                percentile(&server, 0.99)
            ),
            "≤ 0.2 ms",
        );
    }
    if let Some(dump) = &options.dump {
        std::fs::write(dump.join("queries.txt"), queries.join("\n"))?;
    }

    let (rps, errors) = throughput(agent.api, options.connections, options.seconds, &tokens)?;
    add(
        &format!(
            "throughput, {} connections, small answers",
            options.connections
        ),
        format!("{rps:.0} req/s ({errors} errors)"),
        "≥ 10,000 req/s",
    );
    let feeding = Arc::new(AtomicBool::new(true));
    let feeder = {
        let feeding = feeding.clone();
        let bodies = [large.render(now + 10), churn_body.clone()];
        let feed = agent.feed;
        std::thread::spawn(move || -> anyhow::Result<usize> {
            let mut sent = 0;
            while feeding.load(Ordering::Relaxed) {
                let started = Instant::now();
                let body = &bodies[sent % 2];
                let mut conn = Conn::open(feed)?;
                let head = format!(
                    "POST / HTTP/1.1\r\nHost: agent\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                conn.writer.write_all(head.as_bytes())?;
                conn.writer.write_all(body)?;
                conn.read_reply()?;
                sent += 1;
                std::thread::sleep(Duration::from_secs(1).saturating_sub(started.elapsed()));
            }
            Ok(sent)
        })
    };
    let (rps_fed, errors_fed) =
        throughput(agent.api, options.connections, options.seconds, &tokens)?;
    feeding.store(false, Ordering::Relaxed);
    let sent = feeder
        .join()
        .map_err(|_| anyhow::anyhow!("the feeder panicked"))??;
    add(
        "throughput, same, while a snapshot arrives every second",
        format!("{rps_fed:.0} req/s ({errors_fed} errors, {sent} snapshots applied)"),
        "≥ 80% of the above",
    );
    drop(agent);

    // Large snapshot through the file.
    {
        let agent = AgentProcess::start(&base.join("large-file"))?;
        agent.reset_peak();
        let (wall, logged) = agent.feed_file(&large_body)?;
        add(
            &format!("full {}-call snapshot, file", options.calls),
            format!("{} (applied in {logged:.0} ms)", ms(wall)),
            "≤ 1500 ms",
        );
        add(
            "peak RSS during it",
            format!("{:.1} MB", agent.peak_mb()),
            "≤ 96 MB",
        );
        let (wall, logged) = agent.feed_file(&churn_body)?;
        add(
            "10%-churn snapshot, file",
            format!("{} (applied in {logged:.0} ms)", ms(wall)),
            "≤ 600 ms",
        );
    }
    let _ = std::fs::remove_dir_all(&base);

    println!("| measure | result | target |");
    println!("|---|---|---|");
    for row in rows {
        println!("| {} | {} | {} |", row.what, row.value, row.target);
    }
    Ok(())
}
