//! `active-calls-agent demo`: a newcomer's first run, and a simulated switch.
//!
//! The demo writes a directory and a configuration into a folder, starts a [`Switch`] that
//! rewrites the snapshot file every few seconds (temporary file, then rename, as a real
//! writer should), serves, and prints a `curl` line with a valid token. The [`Switch`] makes
//! rows the way a yeti node does (the same ~90 keys as `shared/samples/snapshot.jsonl`),
//! so it also feeds the tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::{Value, json};

use crate::Agent;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::feed::format_datetime;

/// One simulated call, with what stays fixed while it lasts.
#[derive(Debug, Clone)]
struct SimCall {
    local_tag: String,
    account: usize,
    start: i64,
    connect: Option<i64>,
    row: Value,
}

/// An account of the simulated directory.
#[derive(Debug, Clone)]
pub struct SimAccount {
    pub id: i64,
    pub uuid: String,
    pub customer_id: i64,
}

/// A simulated switch node: a set of calls that start, connect and end over time.
pub struct Switch {
    pub node_id: i64,
    pub accounts: Vec<SimAccount>,
    calls: Vec<SimCall>,
    rng: fastrand::Rng,
    next_tag: u64,
}

const NAMES: [&str; 10] = [
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
const PREFIXES: [&str; 8] = ["380", "44", "49", "1", "7", "971", "123", "4930"];
const RATES: [&str; 6] = ["0.0", "0.11", "0.5", "1", "2.3", "0.0123"];

impl Switch {
    /// A node with `customers` customers of `accounts_per_customer` accounts each.
    pub fn new(node_id: i64, customers: usize, accounts_per_customer: usize, seed: u64) -> Switch {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut accounts = Vec::new();
        for c in 0..customers {
            for a in 0..accounts_per_customer {
                let id = (100 + c * accounts_per_customer + a) as i64;
                let uuid = format!(
                    "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
                    rng.u32(..),
                    rng.u16(..),
                    rng.u16(..0x1000),
                    rng.u16(..0x1000),
                    rng.u64(..1 << 48)
                );
                accounts.push(SimAccount {
                    id,
                    uuid,
                    customer_id: 1000 + c as i64,
                });
            }
        }
        Switch {
            node_id,
            accounts,
            calls: Vec::new(),
            rng,
            next_tag: 0,
        }
    }

    /// The directory file (SPEC 3) for these accounts: per customer, one API access to all
    /// its accounts (id `5000 + n`) and one to its first account only (id `6000 + n`).
    pub fn directory(&self) -> Value {
        let mut accesses = Vec::new();
        let mut customers: Vec<i64> = self.accounts.iter().map(|a| a.customer_id).collect();
        customers.dedup();
        for (n, customer) in customers.iter().enumerate() {
            let first = self
                .accounts
                .iter()
                .find(|a| a.customer_id == *customer)
                .map(|a| a.id);
            accesses
                .push(json!({"id": 5000 + n as i64, "customer_id": customer, "account_ids": []}));
            accesses.push(
                json!({"id": 6000 + n as i64, "customer_id": customer, "account_ids": [first]}),
            );
        }
        json!({
            "accounts": self.accounts.iter().map(|a| json!({"id": a.id, "uuid": a.uuid, "contractor_id": a.customer_id})).collect::<Vec<_>>(),
            "api_accesses": accesses,
            "customers": customers.iter().map(|c| json!({"id": c})).collect::<Vec<_>>(),
            "customer_portal_access_profiles": [{"id": 1}, {"id": 2}],
        })
    }

    /// Moves time to `now`: about `churn` of the calls end, new ones start until there are
    /// `target` calls, some ringing calls connect.
    pub fn step(&mut self, now: i64, target: usize, churn: f64) {
        let rng = &mut self.rng;
        self.calls.retain(|_| rng.f64() >= churn);
        for call in &mut self.calls {
            if call.connect.is_none() && self.rng.f64() < 0.3 {
                call.connect = Some(now - self.rng.i64(0..5));
            }
        }
        while self.calls.len() < target {
            let call = self.new_call(now);
            self.calls.push(call);
        }
    }

    fn new_call(&mut self, now: i64) -> SimCall {
        let rng = &mut self.rng;
        self.next_tag += 1;
        let local_tag = format!(
            "{:08X}-{:04X}-{:08X}",
            rng.u32(..),
            rng.u16(..),
            self.next_tag
        );
        // One account in three gets most of the traffic, as real traffic is skewed.
        let account = if rng.bool() {
            rng.usize(..self.accounts.len().div_ceil(3))
        } else {
            rng.usize(..self.accounts.len())
        };
        let start = now - rng.i64(0..3600);
        let connect = rng.bool().then(|| start + rng.i64(1..30));
        let pick = |rng: &mut fastrand::Rng, list: &[&'static str]| list[rng.usize(..list.len())];
        let digits = |rng: &mut fastrand::Rng| {
            let prefix = pick(rng, &PREFIXES);
            format!("{prefix}{}", rng.u64(0..10_000_000))
        };
        let maybe = |rng: &mut fastrand::Rng| -> Value {
            match rng.u8(..4) {
                0 => Value::Null,
                1 => json!(""),
                2 => json!("anonymous"),
                _ => json!("<sip:1@x>"),
            }
        };
        let a = &self.accounts[account];
        let row = json!({
            "id": rng.u64(..), "pop_id": 4, "legB_remote_port": 5060, "legB_local_port": 5061,
            "legA_remote_port": 5060, "legA_local_port": 5061, "legB_remote_ip": "10.1.2.3",
            "legB_local_ip": "10.1.2.4", "legA_remote_ip": "192.168.88.23", "legA_local_ip": "192.168.88.24",
            "orig_call_id": format!("{}-{}-{}", rng.u32(..), rng.u32(..), self.next_tag),
            "term_call_id": format!("8-{:X}", rng.u64(..)), "global_tag": "", "time_limit": 7200,
            "dump_level_id": 0, "audio_record_enabled": 0, "attempt_num": 1, "resources": "",
            "active_resources": "", "customer_id": a.customer_id, "customer_acc_id": a.id,
            "vendor_id": 77, "vendor_acc_id": 78, "customer_auth_id": 20085, "destination_id": rng.u32(..),
            "destination_prefix": pick(rng, &PREFIXES), "dialpeer_id": rng.u32(..), "dialpeer_prefix": "380",
            "orig_gw_id": 19, "term_gw_id": 20, "routing_group_id": 24, "rateplan_id": 18, "routing_plan_id": 3,
            "destination_initial_rate": pick(rng, &RATES), "destination_next_rate": pick(rng, &RATES),
            "destination_initial_interval": if rng.bool() { json!(60) } else { json!("1") },
            "destination_next_interval": if rng.bool() { 60 } else { 1 },
            "destination_fee": pick(rng, &["0.0", "0.01"]), "destination_rate_policy_id": 1,
            "dialpeer_initial_rate": "0.005", "dialpeer_next_rate": "0.001", "dialpeer_initial_interval": 1,
            "dialpeer_next_interval": 1, "dialpeer_fee": "0.0",
            "src_name_in": pick(rng, &NAMES), "src_name_out": "",
            "src_prefix_in": digits(rng), "src_prefix_out": "",
            "dst_prefix_in": digits(rng), "dst_prefix_out": "",
            "src_prefix_routing": digits(rng),
            "dst_prefix_routing": digits(rng),
            "auth_orig_ip": pick(rng, &["127.0.0.1", "10.20.30.40", "2001:db8::1", "192.168.88.23"]),
            "auth_orig_port": if rng.bool() { json!(5060) } else { json!("5061") },
            "src_network_id": 1522, "src_country_id": 222, "dst_country_id": 222, "dst_network_id": 1522,
            "lrn": null, "lnp_database_id": null,
            "from_domain": pick(rng, &["example.org", "qwe", ""]), "to_domain": pick(rng, &["example.com", "asd"]),
            "ruri_domain": pick(rng, &["10.0.0.1", "qwe.asd"]), "src_area_id": null, "dst_area_id": null,
            "routing_tag_ids": [1, 2], "customer_acc_check_balance": 1, "destination_reverse_billing": 0,
            "dialpeer_reverse_billing": 0, "customer_acc_vat": "0", "customer_auth_name": "test auth",
            "metadata": null, "diversion_in": maybe(rng), "pai_in": maybe(rng), "ppi_in": maybe(rng),
            "privacy_in": maybe(rng), "rpid_in": maybe(rng), "rpid_privacy_in": maybe(rng),
            "auth_orig_transport_protocol_id": rng.u8(1..4),
        });
        SimCall {
            local_tag,
            account,
            start,
            connect,
            row,
        }
    }

    /// The current calls as the switch sends them: the INSERT line, then one row per call.
    pub fn snapshot(&self, now: i64) -> String {
        let mut out = String::from("INSERT INTO active_calls FORMAT JSONEachRow\n");
        let stamp = format_datetime(now);
        for call in &self.calls {
            let mut row = call.row.clone();
            if let Value::Object(fields) = &mut row {
                fields.insert("snapshot_timestamp".into(), json!(stamp));
                fields.insert("snapshot_date".into(), json!(&stamp[..10]));
                fields.insert("node_id".into(), json!(self.node_id));
                fields.insert("local_tag".into(), json!(call.local_tag));
                fields.insert("cdr_born_time".into(), json!(format_datetime(call.start)));
                fields.insert("start_time".into(), json!(format_datetime(call.start)));
                fields.insert(
                    "start_date".into(),
                    json!(&format_datetime(call.start)[..10]),
                );
                fields.insert(
                    "connect_time".into(),
                    json!(call.connect.map(format_datetime)),
                );
                fields.insert("end_time".into(), json!(stamp));
            }
            out.push_str(&row.to_string());
            out.push('\n');
        }
        out
    }

    /// The account that has the most calls now.
    pub fn busiest_account(&self) -> &SimAccount {
        let mut counts = vec![0usize; self.accounts.len()];
        for call in &self.calls {
            counts[call.account] += 1;
        }
        let best = (0..counts.len()).max_by_key(|&i| counts[i]).unwrap_or(0);
        &self.accounts[best]
    }
}

/// Writes `content` to `path` atomically: a temporary file in the same directory, then a
/// rename over the target, so a reader never sees it half-written.
pub fn write_atomically(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(content)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The demo's options (the `demo` command's flags).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub dir: PathBuf,
    pub listen: String,
    pub calls: usize,
    pub period: Duration,
}

/// Runs the demo until Ctrl-C.
pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let dir = &options.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut switch = Switch::new(1, 3, 4, unix_now() as u64);
    let secret = format!("demo-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));

    let mut config = Config::default();
    config.api.listen = options.listen.clone();
    if std::net::TcpListener::bind(&config.api.listen).is_err() {
        // Something else has the port: any free one will do for a demo.
        eprintln!(
            "{} is taken; the demo takes a free port instead",
            config.api.listen
        );
        config.api.listen = "127.0.0.1:0".into();
    }
    config.api.jwt_secret = Some(secret.clone());
    config.store.path = dir.join("active-calls.db");
    config.feed.watch = dir.join("snapshot.jsonl");
    // The socket source too, on any free port: the demo's switch writes the file, and a
    // curl can post a snapshot the way a real switch does.
    config.feed.listen = "127.0.0.1:0".into();
    config.directory.path = dir.join("directory.json");
    std::fs::write(
        &config.directory.path,
        serde_json::to_vec_pretty(&switch.directory())?,
    )?;
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "# What `demo` runs with; `active-calls-agent serve --config {0}` reruns it.\n\
             [api]\nlisten = {1:?}\njwt_secret = {2:?}\n\n[store]\npath = {3:?}\n\n\
             [feed]\nwatch = {4:?}\nlisten = \"127.0.0.1:0\"\n\n[directory]\npath = {5:?}\n",
            dir.join("config.toml").display(),
            config.api.listen,
            secret,
            config.store.path.display().to_string(),
            config.feed.watch.display().to_string(),
            config.directory.path.display().to_string(),
        ),
    )?;

    let now = unix_now();
    switch.step(now, options.calls, 0.0);
    write_atomically(&config.feed.watch, switch.snapshot(now).as_bytes())?;

    let agent = Agent::start(&config).await?;
    let mut status = agent.feed_status();
    tokio::time::timeout(Duration::from_secs(30), status.wait_for(|s| s.applied > 0))
        .await
        .context("the first snapshot was not applied within 30 s")??;

    let auth = Authenticator::new(Some(secret.as_bytes()), Duration::ZERO);
    let token = auth
        .issue_for_access(5000, SystemTime::now())
        .context("signing the demo token")?;
    let account = switch.busiest_account().clone();
    println!();
    println!(
        "active-calls-agent demo: {} calls on node 1, a new snapshot every {:?}",
        options.calls, options.period
    );
    println!("  files:    {}", dir.display());
    println!(
        "  endpoint: http://{}{}",
        agent.api_addr(),
        crate::api::OUTGOING_ACTIVE_CALLS
    );
    if let Some(feed) = agent.feed_addr() {
        println!("  feed:     http://{feed}/ (ClickHouse-compatible: POST a snapshot, GET /ping)");
    }
    println!();
    println!(
        "Try it (customer {}, its busiest account):",
        account.customer_id
    );
    println!();
    println!(
        "  curl -s -H 'Authorization: Bearer {token}' 'http://{}{}?account-id={}&connect-time-null=false'",
        agent.api_addr(),
        crate::api::OUTGOING_ACTIVE_CALLS,
        account.uuid
    );
    println!();
    println!(
        "Add filters such as &dst-prefix-in-starts-with=44 or &src-name-in-contains=ali. Ctrl-C stops."
    );

    let period = options.period;
    let calls = options.calls;
    let snapshot_path = config.feed.watch.clone();
    std::thread::Builder::new()
        .name("demo-switch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(period);
                let now = unix_now();
                switch.step(now, calls, 0.1);
                if let Err(e) = write_atomically(&snapshot_path, switch.snapshot(now).as_bytes()) {
                    tracing::error!(error = %e, "the demo switch could not write its snapshot");
                }
            }
        })?;

    let _ = tokio::signal::ctrl_c().await;
    tokio::task::spawn_blocking(move || agent.stop()).await?;
    Ok(())
}
