//! `active-calls-agent demo`: a newcomer's first run, and a simulated switch.
//!
//! The demo writes a directory and a configuration into a folder, starts a [`Switch`] that
//! rewrites the snapshot file every few seconds (temporary file, then rename, as a real
//! writer should), serves, and prints a `curl` line with a valid token. The [`Switch`] makes
//! rows the way a yeti node does (~100 keys and ~2.7 KB a row, the keys of
//! `shared/samples/snapshot.jsonl` and more), for 1,000 accounts of 50 customers with one
//! account holding 30% of the calls: the same generator feeds the benchmark and the tests.

use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::Agent;
use crate::auth::Authenticator;
use crate::clock::format_datetime;
use crate::config::Config;

pub const ACCOUNTS: i64 = 1000;
pub const CUSTOMERS: i64 = 50;
/// The account that holds 30% of the calls.
pub const BIG_ACCOUNT: i64 = 1;

pub fn customer_of(account: i64) -> i64 {
    1 + (account - 1) % CUSTOMERS
}

pub fn uuid_of(account: i64) -> String {
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
pub struct Switch {
    rng: fastrand::Rng,
    calls: Vec<GenCall>,
    serial: u64,
}

impl Switch {
    pub fn new(seed: u64) -> Switch {
        Switch {
            rng: fastrand::Rng::with_seed(seed),
            calls: Vec::new(),
            serial: 0,
        }
    }

    /// Adds calls (or ends the newest) until there are `total`.
    pub fn fill(&mut self, total: usize, now: i64) {
        self.calls.truncate(total);
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
    pub fn big_account_numbers(&self) -> Vec<String> {
        self.calls
            .iter()
            .filter(|c| c.account == BIG_ACCOUNT)
            .map(|c| c.dst_prefix_in.clone())
            .collect()
    }

    pub fn count_in(&self, account: i64) -> usize {
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

/// Writes `content` to `path` atomically: a temporary file in the same directory, then a
/// rename over the target, so a reader never sees it half-written.
pub fn write_atomically(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(content)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

pub fn unix_now() -> i64 {
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
    let mut switch = Switch::new(unix_now() as u64);
    let secret = format!("demo-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    let scrape_token = format!(
        "scrape-{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..)
    );

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
    std::fs::write(&config.directory.path, directory_json())?;
    // An aggregator's token too, for the node-wide scrape.
    config.upstream.scrape_tokens_file = dir.join("scrape-tokens");
    std::fs::write(
        &config.upstream.scrape_tokens_file,
        format!("{scrape_token}\n"),
    )?;
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "# What `demo` runs with; `active-calls-agent serve --config {0}` reruns it.\n\
             [api]\nlisten = {1:?}\njwt_secret = {2:?}\n\n[store]\npath = {3:?}\n\n\
             [feed]\nwatch = {4:?}\nlisten = \"127.0.0.1:0\"\n\n[directory]\npath = {5:?}\n\n\
             [upstream]\nscrape_tokens_file = {6:?}\n",
            dir.join("config.toml").display(),
            config.api.listen,
            secret,
            config.store.path.display().to_string(),
            config.feed.watch.display().to_string(),
            config.directory.path.display().to_string(),
            config.upstream.scrape_tokens_file.display().to_string(),
        ),
    )?;

    let now = unix_now();
    switch.fill(options.calls, now);
    write_atomically(&config.feed.watch, &switch.render(now))?;

    let agent = Agent::start(&config).await?;
    let mut status = agent.feed_status();
    tokio::time::timeout(Duration::from_secs(30), status.wait_for(|s| s.applied > 0))
        .await
        .context("the first snapshot was not applied within 30 s")??;

    let auth = Authenticator::new(Some(secret.as_bytes()), Duration::ZERO);
    let token = auth
        .issue_for_access(customer_of(BIG_ACCOUNT), SystemTime::now())
        .context("signing the demo token")?;
    let account_uuid = uuid_of(BIG_ACCOUNT);
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
        customer_of(BIG_ACCOUNT)
    );
    println!();
    println!(
        "  curl -s -H 'Authorization: Bearer {token}' 'http://{}{}?account-id={}&connect-time-null=false'",
        agent.api_addr(),
        crate::api::OUTGOING_ACTIVE_CALLS,
        account_uuid
    );
    println!();
    println!("Add filters such as &dst-prefix-in-starts-with=44 or &src-name-in-contains=ali.");
    println!();
    println!("Every call of the node, as an aggregator scrapes it (one JSON object a line):");
    println!();
    println!(
        "  curl -s --compressed -H 'Authorization: Bearer {scrape_token}' 'http://{}{}'",
        agent.api_addr(),
        crate::api::scrape::ACTIVE_CALLS
    );
    println!();
    println!("Ctrl-C stops.");

    let period = options.period;
    let snapshot_path = config.feed.watch.clone();
    std::thread::Builder::new()
        .name("demo-switch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(period);
                let now = unix_now();
                switch.churn(now);
                if let Err(e) = write_atomically(&snapshot_path, &switch.render(now)) {
                    tracing::error!(error = %e, "the demo switch could not write its snapshot");
                }
            }
        })?;

    let _ = tokio::signal::ctrl_c().await;
    tokio::task::spawn_blocking(move || agent.stop()).await?;
    Ok(())
}
