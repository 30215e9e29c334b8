//! `active-calls-agent calls`, the real binary, over the store of a real agent fed the
//! sample snapshot: the calls it prints are the endpoint's, filter for filter.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use active_calls_agent::config::StaleAfter;
use common::*;
use serde_json::Value;

/// The configuration `calls` reads: the agent's store and directory. (When a node is
/// stale is the store's to say: the agent writes each node's expiry.)
fn cli_config(agent: &TestAgent) -> PathBuf {
    let path = agent.dir.path().join("cli.toml");
    std::fs::write(
        &path,
        format!(
            "[store]\npath = {:?}\n[directory]\npath = {:?}\n",
            agent.config.store.path, agent.config.directory.path
        ),
    )
    .unwrap();
    path
}

fn calls(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_active-calls-agent"))
        .arg("calls")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

/// The `data` of `calls --json`, after checking its `rows`.
fn json_calls(config: &Path, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let output = calls(config, &all);
    assert!(output.status.success(), "{args:?}: {output:?}");
    let body: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let data = body["data"].as_array().expect("data").clone();
    assert_eq!(body["rows"], data.len());
    data
}

/// A call of `calls --json` as the endpoint shows it: without its identity columns.
fn as_answered(mut call: Value) -> Value {
    let object = call.as_object_mut().unwrap();
    for key in ["node_id", "local_tag", "customer_id", "customer_acc_id"] {
        assert!(object.remove(key).is_some(), "{key} in {object:?}");
    }
    call
}

#[test]
fn calls_prints_what_the_endpoint_answers_for_each_account_and_filter() {
    let agent = TestAgent::start();
    agent.feed(SAMPLE_SNAPSHOT);
    let config = cli_config(&agent);
    let every = json_calls(&config, &[]);
    assert_eq!(every.len(), 20, "the sample's calls");
    // Needles taken from the calls themselves, so that each filter keeps some of them.
    let first = &every[0];
    let text = |key: &str, len: usize| first[key].as_str().unwrap()[..len].to_string();
    let port = first["auth_orig_port"].to_string();
    let filters: Vec<Vec<(&str, String)>> = vec![
        vec![],
        vec![("dst-prefix-in-starts-with", text("dst_prefix_in", 3))],
        vec![("dst-prefix-routing-starts-with", "44".into())],
        vec![("connect-time-null", "true".into())],
        vec![("connect-time-null", "false".into())],
        vec![("src-prefix-in-ends-with", text("src_prefix_in", 0))],
        vec![
            ("auth-orig-port", port.clone()),
            ("connect-time-null", "0".into()),
        ],
        vec![("src-name-in-contains", "A".into())],
        vec![(
            "auth-orig-ip",
            first["auth_orig_ip"].as_str().unwrap().into(),
        )],
    ];
    let mut nonempty = 0;
    for (account, access) in [
        (ACCOUNT_101, 5001),
        (ACCOUNT_102, 5001),
        (ACCOUNT_103, 5002),
        (ACCOUNT_104, 5002),
    ] {
        for filter in &filters {
            let query: String = filter
                .iter()
                .map(|(name, value)| format!("&{name}={value}"))
                .collect();
            let answered = request(
                agent.addr(),
                "GET",
                &format!("{ENDPOINT}?account-id={account}{query}"),
                &[("Authorization", &token_for(access))],
            )
            .rows();
            let mut args = vec!["--account".to_string(), account.to_string()];
            for (name, value) in filter {
                args.push(format!("--{name}"));
                args.push(value.clone());
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let listed: Vec<Value> = json_calls(&config, &args)
                .into_iter()
                .map(as_answered)
                .collect();
            assert_eq!(listed, answered, "account {account}, filters {filter:?}");
            nonempty += usize::from(!answered.is_empty());
        }
    }
    assert!(nonempty >= 10, "most cases have calls: {nonempty}");
}

#[test]
fn an_account_id_a_customer_and_a_node_select_as_their_uuid_does() {
    let agent = TestAgent::start();
    agent.feed(SAMPLE_SNAPSHOT);
    let config = cli_config(&agent);
    let by_uuid = json_calls(&config, &["--account", ACCOUNT_103]);
    assert!(!by_uuid.is_empty());
    assert!(by_uuid.iter().all(|c| c["customer_acc_id"] == 103));
    assert_eq!(json_calls(&config, &["--account", "103"]), by_uuid);
    let customer = json_calls(&config, &["--customer", "1002"]);
    assert!(customer.iter().all(|c| c["customer_id"] == 1002));
    assert!(
        customer.len() > by_uuid.len(),
        "1002 has accounts 103 and 104"
    );
    assert_eq!(
        json_calls(&config, &["--node", &SAMPLE_NODE.to_string()]).len(),
        20
    );
    assert!(json_calls(&config, &["--node", "8"]).is_empty());
}

#[test]
fn counts_per_account_add_up_to_the_endpoints_rows() {
    let agent = TestAgent::start();
    agent.feed(SAMPLE_SNAPSHOT);
    let config = cli_config(&agent);
    let output = calls(&config, &["--by", "account", "--json"]);
    assert!(output.status.success(), "{output:?}");
    let body: Value = serde_json::from_slice(&output.stdout).unwrap();
    let counts = body["data"].as_array().unwrap();
    assert_eq!(body["rows"], counts.len());
    let mut previous = i64::MAX;
    for (id, uuid, access) in [
        (101, ACCOUNT_101, 5001),
        (102, ACCOUNT_102, 5001),
        (103, ACCOUNT_103, 5002),
        (104, ACCOUNT_104, 5002),
    ] {
        let answered = request(
            agent.addr(),
            "GET",
            &format!("{ENDPOINT}?account-id={uuid}"),
            &[("Authorization", &token_for(access))],
        )
        .rows()
        .len();
        let counted = counts
            .iter()
            .find(|c| c["customer_acc_id"] == id)
            .map_or(0, |c| c["calls"].as_u64().unwrap());
        assert_eq!(counted as usize, answered, "account {id}");
    }
    for count in counts {
        let calls = count["calls"].as_i64().unwrap();
        assert!(calls <= previous, "the busiest first: {counts:?}");
        previous = calls;
    }
    let total: u64 = counts.iter().map(|c| c["calls"].as_u64().unwrap()).sum();
    assert_eq!(total, 20);

    // The node's period is not known from one snapshot; the next one tells it.
    let table = calls(&config, &["--by", "node"]);
    let text = String::from_utf8(table.stdout).unwrap();
    assert_eq!(text, "NODE  CALLS  PERIOD\n7     20     -\n20 call(s)\n");
    applied_report(agent.feed(SAMPLE_SNAPSHOT_2), 2);
    let table = calls(&config, &["--by", "node"]);
    let text = String::from_utf8(table.stdout).unwrap();
    assert_eq!(text, "NODE  CALLS  PERIOD\n7     20     5 s\n20 call(s)\n");
    let counts = json_calls(&config, &["--by", "node"]);
    assert_eq!(
        counts,
        [serde_json::json!({"node_id": 7, "calls": 20, "period": 5})]
    );
}

#[test]
fn the_table_shows_each_call_and_escapes_what_could_drive_the_terminal() {
    let agent = TestAgent::start();
    // A switch can send any text: here an escape sequence that would clear the screen.
    let hostile =
        SAMPLE_SNAPSHOT.replacen("\"src_prefix_in\":\"", "\"src_prefix_in\":\"\\u001b[2J", 1);
    assert_ne!(hostile, SAMPLE_SNAPSHOT);
    applied_report(agent.feed(&hostile), 1);
    let output = calls(&cli_config(&agent), &[]);
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("NODE  CUSTOMER  ACCOUNT  START_TIME"),
        "{text}"
    );
    assert_eq!(lines.len(), 1 + 20 + 1, "{text}");
    assert_eq!(*lines.last().unwrap(), "20 call(s)");
    assert!(!text.contains('\u{1b}'), "{text}");
    assert!(text.contains("\\u{1b}[2J"), "{text}");
    assert!(lines[1].starts_with("7 "), "{text}");
}

#[test]
fn bad_flags_and_missing_things_are_clear_errors() {
    let agent = TestAgent::start();
    agent.feed(SAMPLE_SNAPSHOT);
    let config = cli_config(&agent);
    for (args, says) in [
        (
            vec!["--auth-orig-port", "x"],
            "the endpoint would answer 400: invalid value auth-orig-port",
        ),
        (
            vec!["--account", "00000000-0000-4000-8000-000000009999"],
            "is not in the directory",
        ),
        (
            vec!["--account", "nope"],
            "neither an account id nor a uuid",
        ),
    ] {
        let output = calls(&config, &args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?}");
    }
    // A port of -1 is a value, not a flag, and valid for the endpoint too: no calls.
    assert!(json_calls(&config, &["--auth-orig-port", "-1"]).is_empty());

    let nowhere = agent.dir.path().join("nowhere.toml");
    std::fs::write(&nowhere, "[store]\npath = \"/nonexistent/calls.db\"\n").unwrap();
    let output = calls(&nowhere, &[]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no store at /nonexistent/calls.db"),
        "{output:?}"
    );
}

#[test]
fn a_stale_node_is_left_out_as_the_endpoint_leaves_it_and_said_so() {
    let mut agent = TestAgent::start_with(|c| c.feed.stale_after = StaleAfter::Seconds(3));
    agent.feed(SAMPLE_SNAPSHOT);
    // Stopped before its expiry removes the node: the store then holds a stale node.
    agent.agent.take().expect("running").stop();
    let config = cli_config(&agent);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let output = loop {
        let output = calls(&config, &["--json"]);
        let body: Value = serde_json::from_slice(&output.stdout).unwrap();
        if body["rows"] == 0 || std::time::Instant::now() > deadline {
            break output;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let body: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(body["rows"], 0, "stale after 1 s");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("left out as stale: node 7 (20 call(s)"),
        "{stderr}"
    );
    assert_eq!(
        json_calls(&config, &["--include-stale"]).len(),
        20,
        "--include-stale"
    );
}

#[test]
fn a_stopped_agents_store_is_read_without_a_file_written_beside_it() {
    let mut agent = TestAgent::start();
    agent.feed(SAMPLE_SNAPSHOT);
    agent.agent.take().expect("running").stop();
    // At rest: whatever WAL the agent left is checkpointed away, as at a clean stop.
    let store = agent.config.store.path.clone();
    rusqlite::Connection::open(&store)
        .unwrap()
        .pragma_update(None, "wal_checkpoint", "TRUNCATE")
        .unwrap();
    let folder = store.parent().unwrap();
    let files = || {
        let mut names: Vec<String> = std::fs::read_dir(folder)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(files(), ["active-calls.db"], "no WAL: the agent is stopped");
    // A reader that may not write the folder (a group member of the packaged state
    // folder) could not create the -shm and -wal files that an ordinary open makes.
    assert_eq!(json_calls(&cli_config(&agent), &[]).len(), 20);
    assert_eq!(
        files(),
        ["active-calls.db"],
        "nothing written beside the store"
    );
}

#[test]
fn an_account_by_uuid_is_scoped_to_its_directory_customer_as_the_endpoint_scopes_it() {
    let agent = TestAgent::start();
    // The switch files one of account 103's calls under customer 1001, where the
    // directory says 1002 (an account moved to another customer, say).
    let mut moved = None;
    let snapshot: Vec<String> = SAMPLE_SNAPSHOT
        .lines()
        .map(|line| {
            if moved.is_none() && line.contains("\"customer_acc_id\":103,") {
                moved = Some(line.to_string());
                line.replace("\"customer_id\":1002,", "\"customer_id\":1001,")
            } else {
                line.to_string()
            }
        })
        .collect();
    assert!(moved.is_some_and(|line| line.contains("\"customer_id\":1002,")));
    applied_report(agent.feed(&(snapshot.join("\n") + "\n")), 1);
    let config = cli_config(&agent);
    let answered = request(
        agent.addr(),
        "GET",
        &format!("{ENDPOINT}?account-id={ACCOUNT_103}"),
        &[("Authorization", &token_for(5002))],
    )
    .rows();
    let listed: Vec<Value> = json_calls(&config, &["--account", ACCOUNT_103])
        .into_iter()
        .map(as_answered)
        .collect();
    assert_eq!(listed, answered);
    // By its id, the account is not looked up: every call filed under it.
    let by_id = json_calls(&config, &["--account", "103"]);
    assert_eq!(by_id.len(), answered.len() + 1);
    // A --customer that is not the account's is said to be wrong, not answered empty.
    let output = calls(&config, &["--account", ACCOUNT_103, "--customer", "1001"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("is customer 1002's in the directory, not --customer 1001's"),
        "{output:?}"
    );
}

#[test]
fn a_filter_flag_without_its_value_is_refused_not_fed_the_next_flag() {
    let agent = TestAgent::start();
    agent.feed(SAMPLE_SNAPSHOT);
    let output = calls(&cli_config(&agent), &["--dst-prefix-in-eq", "--json"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(output.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("a value is required"),
        "{output:?}"
    );
    // A needle that starts with '-' is given with '='.
    let first = json_calls(&cli_config(&agent), &[]).remove(0);
    let tag = first["src_name_in"].as_str().unwrap().to_string();
    let flag = format!("--src-name-in-eq={tag}");
    assert!(!json_calls(&cli_config(&agent), &[&flag]).is_empty());
    assert!(json_calls(&cli_config(&agent), &["--src-name-in-eq=-x"]).is_empty());
}
