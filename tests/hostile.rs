//! A hostile world against the real binary (issue 20): a directory of the wrong shape,
//! stores SQLite cannot read, a full disk, slow readers and a WAL that would grow, and a
//! watched file with an old modification time. Each case gives a clear line and loses
//! nothing the next snapshot would not restore.

mod common;

use common::*;

/// Metrics of the real agent, on its API listener.
fn metrics_text(agent: &Process) -> String {
    let reply = request(agent.api, "GET", "/metrics", &[]);
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.text()
}

#[test]
fn a_directory_of_the_wrong_shape_is_refused_and_the_last_good_one_kept() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_process_config(dir.path(), "");
    let agent = Process::start(&config);
    assert_eq!(
        post(agent.feed, "/", &[], &named_snapshot("A", 3)).status,
        200
    );
    assert_eq!(agent.answer().1, 3);
    let directory = dir.path().join("directory.json");
    let wrapped = format!("{{\"directory\": {SAMPLE_DIRECTORY}}}");
    let camel = SAMPLE_DIRECTORY.replace("api_accesses", "apiAccesses");
    for (failed, (content, names)) in [
        (wrapped.as_str(), r#"(the file has "directory")"#),
        (camel.as_str(), r#"no "api_accesses" list"#),
        ("{}", "no other key"),
    ]
    .into_iter()
    .enumerate()
    {
        write_file(&directory, content.as_bytes());
        let line = agent.wait_log("directory not loaded").replace("\\\"", "\"");
        assert!(line.contains(names), "{line}");
        // Customers are still answered from the previous directory.
        assert_eq!(agent.answer().1, 3, "after {content}");
        let text = metrics_text(&agent);
        assert_eq!(
            metric(
                &text,
                r#"active_calls_agent_directory_loads_total{result="failed"}"#
            ),
            Some(failed as f64 + 1.0)
        );
        let (ok, said) = check(&config);
        assert!(!ok && said.contains(names), "{said}");
    }
    assert_eq!(request(agent.api, "GET", "/readyz", &[]).status, 200);

    // A file that parses but drops every account is applied, with a warning, and `check`
    // warns too.
    write_file(&directory, br#"{"accounts": [], "api_accesses": []}"#);
    let line = agent.wait_log("none of the accounts the previous one had");
    assert!(line.contains("WARN"), "{line}");
    let (ok, said) = check(&config);
    assert!(ok && said.contains("no account"), "{said}");
    let target = format!("{ENDPOINT}?account-id={ACCOUNT_101}");
    let reply = request(
        agent.api,
        "GET",
        &target,
        &[("Authorization", &token_for(5001))],
    );
    assert_eq!(reply.status, 401);
}
