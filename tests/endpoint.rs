//! The endpoint checked from outside, over HTTP, against the SPEC: the sample snapshot in,
//! answers out.

mod common;

use common::*;
use serde_json::{Value, json};

/// The sample rows (the INSERT line dropped), as JSON.
fn sample_rows() -> Vec<Value> {
    SAMPLE_SNAPSHOT
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// How an output key is derived from the input row (SPEC 1.3).
enum Kind {
    /// As given (a time or null, a string or null).
    Same,
    /// A string; a number's text; missing or null is "".
    Text,
    /// An integer from a number or a string; missing or null is 0.
    Int,
}

const OUTPUT: [(&str, Kind); 26] = [
    ("snapshot_timestamp", Kind::Same),
    ("start_time", Kind::Same),
    ("connect_time", Kind::Same),
    ("destination_prefix", Kind::Text),
    ("destination_initial_interval", Kind::Int),
    ("destination_initial_rate", Kind::Text),
    ("destination_next_interval", Kind::Int),
    ("destination_next_rate", Kind::Text),
    ("destination_fee", Kind::Text),
    ("src_name_in", Kind::Text),
    ("src_prefix_in", Kind::Text),
    ("dst_prefix_in", Kind::Text),
    ("src_prefix_routing", Kind::Text),
    ("dst_prefix_routing", Kind::Text),
    ("from_domain", Kind::Text),
    ("to_domain", Kind::Text),
    ("ruri_domain", Kind::Text),
    ("diversion_in", Kind::Same),
    ("pai_in", Kind::Same),
    ("ppi_in", Kind::Same),
    ("privacy_in", Kind::Same),
    ("rpid_in", Kind::Same),
    ("rpid_privacy_in", Kind::Same),
    ("auth_orig_transport_protocol_id", Kind::Int),
    ("auth_orig_ip", Kind::Text),
    ("auth_orig_port", Kind::Int),
];

/// SPEC 1.3 computed independently from an input row: what the endpoint must answer.
fn expected(row: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for (key, kind) in OUTPUT {
        let mut given = &row[key];
        if key == "auth_orig_transport_protocol_id" && given.is_null() {
            given = &row["auth_orig_protocol_id"];
        }
        let value = match (kind, given) {
            (Kind::Same, v) => v.clone(),
            (Kind::Text, Value::String(s)) => json!(s),
            (Kind::Text, Value::Number(n)) => json!(n.to_string()),
            (Kind::Text, _) => json!(""),
            (Kind::Int, Value::Number(n)) => json!(n.as_i64().unwrap()),
            (Kind::Int, Value::String(s)) => json!(s.parse::<i64>().unwrap()),
            (Kind::Int, _) => json!(0),
        };
        out.insert(key.into(), value);
    }
    Value::Object(out)
}

/// The expected answer for an account id: its rows, newest start first (ties: local_tag).
fn expected_for(account: i64, keep: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut rows: Vec<&Value> = sample_rows_cache()
        .iter()
        .filter(|r| r["customer_acc_id"] == account && keep(r))
        .collect();
    rows.sort_by(|a, b| {
        b["start_time"]
            .as_str()
            .cmp(&a["start_time"].as_str())
            .then(a["local_tag"].as_str().cmp(&b["local_tag"].as_str()))
    });
    rows.into_iter().map(expected).collect()
}

fn sample_rows_cache() -> &'static [Value] {
    static ROWS: std::sync::OnceLock<Vec<Value>> = std::sync::OnceLock::new();
    ROWS.get_or_init(sample_rows)
}

fn with_sample() -> TestAgent {
    let agent = TestAgent::start();
    let report = applied_report(agent.feed(SAMPLE_SNAPSHOT), 1);
    assert_eq!((report.rows, report.skipped), (20, 0));
    agent
}

#[test]
fn answers_every_row_of_the_account_with_the_26_keys_in_order() {
    let agent = with_sample();
    for (uuid, id) in [(ACCOUNT_101, 101), (ACCOUNT_102, 102)] {
        let reply = agent.get(&format!("account-id={uuid}"));
        assert_eq!(reply.rows(), expected_for(id, |_| true), "account {id}");
    }
    let reply = agent.get(&format!("account-id={ACCOUNT_102}"));
    let body = reply.text();
    let first = &body[body.find("{\"snapshot_timestamp\"").unwrap()..];
    let keys: Vec<&str> = first[..first.find('}').unwrap()]
        .split(",\"")
        .map(|kv| {
            kv.trim_start_matches('{')
                .trim_start_matches('"')
                .split('"')
                .next()
                .unwrap()
        })
        .collect();
    let want: Vec<&str> = OUTPUT.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys, want);
    assert!(
        body.starts_with("{\"data\":[{")
            && body.ends_with(&format!("],\"rows\":{}}}", reply.rows().len()))
    );
}

#[test]
fn headers_of_a_200() {
    let agent = with_sample();
    let reply = agent.request(
        "GET",
        &format!("{ENDPOINT}?account-id={ACCOUNT_101}"),
        &[
            ("Authorization", &format!("Bearer {}", token_for(5001))),
            ("X-Request-Id", "abc-123 <x>"),
        ],
    );
    assert_eq!(reply.status, 200);
    for (name, value) in [
        ("content-type", "application/json; charset=utf-8"),
        ("cache-control", "max-age=0, private, must-revalidate"),
        ("vary", "Accept"),
        ("x-request-id", "abc-123x"),
        ("x-frame-options", "SAMEORIGIN"),
        ("x-xss-protection", "0"),
        ("x-content-type-options", "nosniff"),
        ("x-permitted-cross-domain-policies", "none"),
        ("referrer-policy", "strict-origin-when-cross-origin"),
    ] {
        assert_eq!(reply.header(name), Some(value), "{name}");
    }
    assert_eq!(
        reply.header("content-length"),
        Some(reply.body.len().to_string().as_str())
    );
    let etag = reply.header("etag").unwrap();
    assert!(etag.starts_with("W/\"") && etag.len() == 36, "{etag}");
    let runtime: f64 = reply.header("x-runtime").unwrap().parse().unwrap();
    assert!((0.0..10.0).contains(&runtime));
    assert!(
        reply.header("set-cookie").is_none(),
        "no cookie for a header token"
    );

    // No request id of its own: a fresh uuid.
    let reply = agent.get(&format!("account-id={ACCOUNT_101}"));
    assert_eq!(reply.header("x-request-id").unwrap().len(), 36);
}

#[test]
fn etag_if_none_match_and_head() {
    let agent = with_sample();
    let token = token_for(5001);
    let target = format!("{ENDPOINT}?account-id={ACCOUNT_101}");
    let get = agent.request("GET", &target, &[("Authorization", &token)]);
    let etag = get.header("etag").unwrap().to_owned();

    for inm in [
        etag.clone(),
        etag.trim_start_matches("W/").to_owned(),
        format!("\"zzz\", {etag}"),
        "*".into(),
    ] {
        let cached = agent.request(
            "GET",
            &target,
            &[("Authorization", &token), ("If-None-Match", &inm)],
        );
        assert_eq!(cached.status, 304, "{inm}");
        assert!(cached.body.is_empty());
        assert_eq!(cached.header("etag"), Some(etag.as_str()));
    }
    let stale = agent.request(
        "GET",
        &target,
        &[("Authorization", &token), ("If-None-Match", "W/\"zzz\"")],
    );
    assert_eq!(stale.status, 200);

    let head = agent.request("HEAD", &target, &[("Authorization", &token)]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), get.header("content-length"));
    assert_eq!(head.header("etag"), Some(etag.as_str()));

    let head = agent.request(
        "HEAD",
        &format!("{ENDPOINT}?account-id=bad"),
        &[("Authorization", &token)],
    );
    assert_eq!(head.status, 400);
    assert_eq!(
        head.header("content-length"),
        Some(r#"{"error":"invalid value account-id"}"#.len().to_string().as_str())
    );
    let head = agent.request("HEAD", &target, &[]);
    assert_eq!(
        (head.status, head.header("content-length")),
        (401, Some("0"))
    );

    // The switch's next snapshot changes the body, so the old ETag no longer matches.
    agent.feed(SAMPLE_SNAPSHOT_2);
    let changed = agent.request(
        "GET",
        &target,
        &[("Authorization", &token), ("If-None-Match", &etag)],
    );
    assert_eq!(changed.status, 200);
    assert_ne!(changed.header("etag"), Some(etag.as_str()));
}

#[test]
fn bad_parameters_get_the_specs_400_bodies() {
    let agent = with_sample();
    for (query, error) in [
        ("", "missing required param(s) account-id"),
        ("src-name-in-eq=x", "missing required param(s) account-id"),
        ("account-id=", "invalid value account-id"),
        (
            &format!("account-id={}", ACCOUNT_101.replace('-', "")),
            "invalid value account-id",
        ),
        (
            "account-id=00000000-0000-0000-0000-000000000000",
            "invalid value account-id",
        ),
        (
            &format!("account-id={ACCOUNT_103}"),
            "invalid value account-id",
        ),
        (
            &format!("account-id[]={ACCOUNT_101}"),
            "param account-id can't be an array",
        ),
        (
            &format!("account-id={ACCOUNT_101}&auth-orig-port=abc"),
            "invalid value auth-orig-port",
        ),
        (
            &format!("account-id={ACCOUNT_101}&auth-orig-port=99999999999"),
            "invalid value auth-orig-port",
        ),
        (
            &format!("account-id={ACCOUNT_101}&auth-orig-transport-protocol-id=200"),
            "invalid value auth-orig-transport-protocol-id",
        ),
        (
            &format!("account-id={ACCOUNT_101}&dst-prefix-in-eq[k]=1"),
            "param dst-prefix-in-eq can't be an array",
        ),
        (
            &format!("auth-orig-port=x&account-id={ACCOUNT_101}"),
            "invalid value auth-orig-port",
        ),
        (
            "account-id=bad&auth-orig-port=x",
            "invalid value account-id",
        ),
    ] {
        let reply = agent.get(query);
        assert_eq!(reply.status, 400, "{query}");
        assert_eq!(reply.json(), json!({"error": error}), "{query}");
        assert_eq!(
            reply.header("content-type"),
            Some("application/json; charset=utf-8")
        );
    }
    // An access limited to account 101 cannot name 102.
    let limited = token_for(6001);
    let reply = agent.request(
        "GET",
        &format!("{ENDPOINT}?account-id={ACCOUNT_102}"),
        &[("Authorization", &limited)],
    );
    assert_eq!(
        (reply.status, reply.json()),
        (400, json!({"error": "invalid value account-id"}))
    );
    let reply = agent.request(
        "GET",
        &format!("{ENDPOINT}?account-id={ACCOUNT_101}"),
        &[("Authorization", &limited)],
    );
    assert_eq!(reply.status, 200);
    // Unknown parameters are ignored; the uuid is compared without case.
    let reply = agent.get(&format!(
        "account-id={}&page=2&sort[]=x",
        ACCOUNT_101.to_uppercase()
    ));
    assert_eq!(reply.rows(), expected_for(101, |_| true));
}

#[test]
fn authentication_failures_are_empty_401s() {
    let agent = with_sample();
    let target = format!("{ENDPOINT}?account-id={ACCOUNT_101}");
    let now = unix_now();
    let none_alg = {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.",
            b64(r#"{"alg":"none"}"#),
            b64(r#"{"aud":["customer-v1"],"sub":5001}"#)
        )
    };
    let hs512 = {
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512);
        jsonwebtoken::encode(
            &header,
            &json!({"aud": ["customer-v1"], "sub": 5001}),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("no token", vec![]),
        (
            "garbage",
            vec![("Authorization", "Bearer not.a.jwt".into())],
        ),
        ("alg none", vec![("Authorization", none_alg)]),
        ("alg HS512", vec![("Authorization", hs512)]),
        (
            "other secret",
            vec![(
                "Authorization",
                sign_with(&json!({"aud": ["customer-v1"], "sub": 5001}), b"other"),
            )],
        ),
        (
            "no aud",
            vec![("Authorization", sign(&json!({"sub": 5001})))],
        ),
        (
            "wrong aud",
            vec![(
                "Authorization",
                sign(&json!({"aud": ["admin"], "sub": 5001})),
            )],
        ),
        (
            "expired",
            vec![(
                "Authorization",
                sign(&json!({"aud": ["customer-v1"], "sub": 5001, "exp": now - 10})),
            )],
        ),
        ("unknown sub", vec![("Authorization", token_for(9999))]),
        (
            "dynamic, unknown customer",
            vec![(
                "Authorization",
                sign(&json!({"aud": ["customer-v1"], "sub": "D", "cfg": {"customer_id": 7}})),
            )],
        ),
        (
            "dynamic, extra key",
            vec![(
                "Authorization",
                sign(
                    &json!({"aud": ["customer-v1"], "sub": "D", "cfg": {"customer_id": 1001, "x": 1}}),
                ),
            )],
        ),
        (
            "dynamic, unknown profile",
            vec![(
                "Authorization",
                sign(
                    &json!({"aud": ["customer-v1"], "sub": "D", "cfg": {"customer_id": 1001, "customer_portal_access_profile_id": 9}}),
                ),
            )],
        ),
        // A present but invalid header does not fall back to a valid cookie.
        (
            "bad header, good cookie",
            vec![
                ("Authorization", "Bearer junk".into()),
                (
                    "Cookie",
                    format!("_yeti_customer_v1_session={}", token_for(5001)),
                ),
            ],
        ),
    ];
    for (name, headers) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let reply = agent.request("GET", &target, &headers);
        assert_eq!(reply.status, 401, "{name}");
        assert!(reply.body.is_empty(), "{name}: {}", reply.text());
        assert_eq!(reply.header("content-length"), Some("0"), "{name}");
    }
    // Auth comes before parameter checks.
    let reply = agent.request("GET", ENDPOINT, &[]);
    assert_eq!(reply.status, 401);
}

#[test]
fn accepted_token_forms() {
    let agent = with_sample();
    let target = format!("{ENDPOINT}?account-id={ACCOUNT_101}");
    let expected = expected_for(101, |_| true);
    let dynamic = sign(
        &json!({"aud": "customer-v1", "sub": "D", "exp": unix_now() + 600,
        "cfg": {"customer_id": 1001, "account_ids": [101], "allowed_ips": ["127.0.0.1/32"]}}),
    );
    for headers in [
        vec![("Authorization", token_for(5001))],
        vec![("Authorization", format!("Bearer {}", token_for(5001)))],
        vec![(
            "Authorization",
            sign(&json!({"aud": ["x", "customer-v1"], "sub": "5001"})),
        )],
        vec![("Authorization", dynamic.clone())],
        vec![
            ("Authorization", "  ".into()),
            (
                "Cookie",
                format!("a=b; _yeti_customer_v1_session={}", token_for(6001)),
            ),
        ],
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let reply = agent.request("GET", &target, &headers);
        assert_eq!(reply.rows(), expected, "{headers:?}");
    }
    // The dynamic token's account list binds.
    let reply = agent.request(
        "GET",
        &format!("{ENDPOINT}?account-id={ACCOUNT_102}"),
        &[("Authorization", &dynamic)],
    );
    assert_eq!(reply.status, 400);
}

#[test]
fn a_cookie_token_is_refreshed() {
    let agent = TestAgent::start_with(|c| c.api.token_lifetime = 600);
    agent.feed(SAMPLE_SNAPSHOT);
    let cookie = format!("_yeti_customer_v1_session={}", token_for(6001));
    let reply = agent.request(
        "GET",
        &format!("{ENDPOINT}?account-id={ACCOUNT_101}"),
        &[("Cookie", &cookie)],
    );
    assert_eq!(reply.status, 200);
    let set = reply.header("set-cookie").expect("refreshed cookie");
    let (token, attributes) = set
        .strip_prefix("_yeti_customer_v1_session=")
        .unwrap()
        .split_once("; ")
        .unwrap();
    assert!(
        attributes.starts_with("path=/; expires=")
            && attributes.ends_with(" GMT; HttpOnly; SameSite=Lax"),
        "{set}"
    );
    assert!(
        token.starts_with("eyJhbGciOiJIUzI1NiJ9."),
        "header is {{\"alg\":\"HS256\"}}: {token}"
    );
    // The fresh token works, for the same context.
    let again = agent.request(
        "GET",
        &format!("{ENDPOINT}?account-id={ACCOUNT_102}"),
        &[("Authorization", token)],
    );
    assert_eq!(again.status, 400, "6001 may only see account 101");
    let again = agent.request(
        "GET",
        &format!("{ENDPOINT}?account-id={ACCOUNT_101}"),
        &[("Authorization", token)],
    );
    assert_eq!(again.status, 200);

    // Other cookies may carry any bytes; the session cookie is still found.
    let mixed = format!("lang=Fran\u{e7}ais; {cookie}; theme=dark");
    let reply = agent.request(
        "GET",
        &format!("{ENDPOINT}?account-id={ACCOUNT_101}"),
        &[("Cookie", &mixed)],
    );
    assert_eq!(reply.status, 200);
    // Past authentication every answer refreshes the session, a 400 too (as the central
    // API's after-action does); a 401 never does.
    let reply = agent.request(
        "GET",
        &format!("{ENDPOINT}?account-id=x"),
        &[("Cookie", &cookie)],
    );
    assert_eq!(reply.status, 400);
    assert!(reply.header("set-cookie").is_some());
    let forged = format!("_yeti_customer_v1_session={}", token_for(9999));
    let reply = agent.request(
        "GET",
        &format!("{ENDPOINT}?account-id={ACCOUNT_101}"),
        &[("Cookie", &forged)],
    );
    assert_eq!(reply.status, 401);
    assert!(reply.header("set-cookie").is_none());
}

#[test]
fn an_unreadable_secret_file_still_starts_and_refuses_every_token() {
    let agent = TestAgent::start_with(|c| {
        c.api.jwt_secret = None;
        c.api.jwt_secret_file = Some("/nonexistent/jwt_secret".into());
    });
    agent.feed(SAMPLE_SNAPSHOT);
    assert_eq!(agent.get(&format!("account-id={ACCOUNT_101}")).status, 401);
}

#[test]
fn no_secret_means_every_token_is_refused() {
    let agent = TestAgent::start_with(|c| c.api.jwt_secret = None);
    agent.feed(SAMPLE_SNAPSHOT);
    let reply = agent.get(&format!("account-id={ACCOUNT_101}"));
    assert_eq!(reply.status, 401);
}

#[test]
fn typed_filters() {
    let agent = with_sample();
    // Account 102: calls on ports 5060 and 5061, ringing and answered, one with the old
    // protocol key.
    let get = |query: &str| agent.get(&format!("account-id={ACCOUNT_102}&{query}"));
    let port = |r: &Value| match &r["auth_orig_port"] {
        Value::String(s) => s.parse::<i64>().unwrap(),
        v => v.as_i64().unwrap(),
    };
    let proto = |r: &Value| {
        r["auth_orig_transport_protocol_id"]
            .as_i64()
            .or(r["auth_orig_protocol_id"].as_i64())
            .unwrap()
    };
    assert_eq!(
        get("auth-orig-port=5061").rows(),
        expected_for(102, |r| port(r) == 5061)
    );
    assert_eq!(
        get("auth-orig-port=%2B0005061").rows(),
        expected_for(102, |r| port(r) == 5061)
    );
    assert_eq!(
        get("auth-orig-transport-protocol-id=2").rows(),
        expected_for(102, |r| proto(r) == 2)
    );
    assert_eq!(
        get("auth-orig-ip=2001%3Adb8%3A%3A1").rows(),
        expected_for(102, |r| r["auth_orig_ip"] == "2001:db8::1")
    );
    assert!(get("auth-orig-ip=2001").rows().is_empty());
    let connected = expected_for(102, |r| !r["connect_time"].is_null());
    let ringing = expected_for(102, |r| r["connect_time"].is_null());
    assert!(!connected.is_empty() && !ringing.is_empty());
    for value in ["", "0", "f", "F", "false", "FALSE", "off", "OFF"] {
        assert_eq!(
            get(&format!("connect-time-null={value}")).rows(),
            connected,
            "{value}"
        );
    }
    for value in ["1", "true", "False", "yes", "abc"] {
        assert_eq!(
            get(&format!("connect-time-null={value}")).rows(),
            ringing,
            "{value}"
        );
    }
    // Filters are ANDed; the last value of a repeated name wins.
    assert_eq!(
        get("connect-time-null=1&connect-time-null=0&auth-orig-port=1&auth-orig-port=5061").rows(),
        expected_for(102, |r| !r["connect_time"].is_null() && port(r) == 5061)
    );
}

/// Every string filter, with needles full of metacharacters, case and UTF-8, checked
/// against SPEC 1.2's rules computed here on the input.
#[test]
fn string_filters_match_bytes_as_specified() {
    let agent = with_sample();
    let columns = [
        "src_name_in",
        "src_prefix_in",
        "dst_prefix_in",
        "src_prefix_routing",
        "dst_prefix_routing",
    ];
    let needles = [
        "",
        "A",
        "a",
        "Al",
        "al",
        "ALICE",
        "%",
        "100%",
        "_",
        "bob_",
        "*",
        "x*y",
        "?",
        "q?z",
        "[",
        "[tag]",
        "\\",
        "back\\",
        "\\slash",
        "Ä",
        "ä",
        "ÄÖ",
        "Ü",
        "ë",
        "Zo",
        "zoë",
        "ZOË",
        "'",
        " ",
        "  spaced  ",
        "spaced ",
        "380",
        "38050",
        "44",
        "4420",
        "9",
        "12",
        "1",
        "MiXeD",
        "mixed",
        "XeD",
        "%_",
        "\u{0}",
        // The sample's own names: "a_b", "john doe", "O'Brien", "Олександр" and "Zoë"
        // (sent as \uXXXX escapes), "test".
        "a_b",
        "a_",
        "_b",
        "john doe",
        "n d",
        "O'Brien",
        "О",
        "о",
        "Ол",
        "олександр",
        "ОЛЕКСАНДР",
        "др",
        "Zoë",
        "oë",
        "TEST",
        "3805",
    ];
    let mut checked = 0;
    for account in [101i64, 102, 103, 104] {
        let (uuid, token) = match account {
            101 => (ACCOUNT_101, token_for(5001)),
            102 => (ACCOUNT_102, token_for(5001)),
            103 => (ACCOUNT_103, token_for(5002)),
            _ => (ACCOUNT_104, token_for(5002)),
        };
        for column in columns {
            let param = column.replace('_', "-");
            for needle in needles {
                let encoded: String = needle.bytes().map(|b| format!("%{b:02X}")).collect();
                for (op, rule) in [
                    ("eq", (|v: &str, n: &str| v == n) as fn(&str, &str) -> bool),
                    ("starts-with", |v, n| v.as_bytes().starts_with(n.as_bytes())),
                    ("ends-with", |v, n| v.as_bytes().ends_with(n.as_bytes())),
                    ("contains", |v, n| {
                        let (v, n) = (
                            v.as_bytes().to_ascii_lowercase(),
                            n.as_bytes().to_ascii_lowercase(),
                        );
                        n.is_empty() || v.windows(n.len()).any(|w| w == n.as_slice())
                    }),
                ] {
                    let target = format!("{ENDPOINT}?account-id={uuid}&{param}-{op}={encoded}");
                    let reply = agent.request("GET", &target, &[("Authorization", &token)]);
                    let want =
                        expected_for(account, |r| rule(r[column].as_str().unwrap_or(""), needle));
                    assert_eq!(
                        reply.rows(),
                        want,
                        "{param}-{op}={needle:?} on account {account}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 4 * 5 * 59 * 4);
}

#[test]
fn contains_folds_ascii_only_and_bytes_are_bytes() {
    let agent = with_sample();
    let token_1002 = token_for(5002);
    let get = |q: &str| {
        agent.request(
            "GET",
            &format!("{ENDPOINT}?account-id={ACCOUNT_103}&{q}"),
            &[("Authorization", &token_1002)],
        )
    };
    // "Zoë" and "Олександр" are on account 103, sent as \u00eb and \u041e...: only the
    // exact UTF-8 bytes match them.
    assert!(SAMPLE_SNAPSHOT.contains(r#""src_name_in":"Zo\u00eb""#));
    assert_eq!(get("src-name-in-contains=%C3%AB").rows().len(), 1);
    assert_eq!(
        get("src-name-in-contains=%C3%8B").rows().len(),
        0,
        "Ë does not fold to ë"
    );
    assert_eq!(
        get("src-name-in-contains=%D0%BE").rows().len(),
        0,
        "о does not fold to О"
    );
    // A byte prefix may split a character: "О" is D0 9E.
    assert_eq!(get("src-name-in-starts-with=%D0").rows().len(), 1);
    assert_eq!(
        get("src-name-in-ends-with=%AB").rows().len(),
        1,
        "ë ends with 0xAB"
    );
    assert_eq!(get("src-name-in-eq=%D0").rows().len(), 0);
    // "a_b" folds on ASCII.
    assert_eq!(get("src-name-in-contains=A_B").rows().len(), 1);
    assert_eq!(get("src-name-in-eq=A_B").rows().len(), 0);
}
