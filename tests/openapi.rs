//! The published OpenAPI document (`openapi.json`) and the server agree: the agent serves
//! the document as kept in the repository, it names exactly the parameters the server
//! knows, and real answers of every documented status match their documented schema.
//! (`scripts/openapi-check` adds schemathesis' generated requests against a running agent.)

mod common;

use common::*;
use serde_json::{Map, Value};

const DOCUMENT: &str = include_str!("../openapi.json");

fn document() -> Value {
    serde_json::from_str(DOCUMENT).expect("openapi.json is JSON")
}

fn operation(doc: &Value) -> &Value {
    &doc["paths"][ENDPOINT]["get"]
}

/// Follows a `$ref` within the document.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let pointer = reference.trim_start_matches('#');
            doc.pointer(pointer)
                .unwrap_or_else(|| panic!("dangling {reference}"))
        }
        None => schema,
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Checks `value` against the part of JSON Schema the document uses: `type` (one or a
/// list), `required`, `properties`, `additionalProperties: false`, `items`, `minimum`.
fn validate(doc: &Value, schema: &Value, value: &Value, at: &str) {
    let schema = resolve(doc, schema);
    let actual = type_name(value);
    let allowed: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![actual],
    };
    assert!(
        allowed.contains(&actual),
        "{at}: {actual} is not {allowed:?}"
    );
    if let (Some(min), Some(n)) = (schema["minimum"].as_i64(), value.as_i64()) {
        assert!(n >= min, "{at}: {n} < {min}");
    }
    if let Value::Object(object) = value {
        let properties = schema["properties"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        for required in schema["required"].as_array().into_iter().flatten() {
            let key = required.as_str().unwrap();
            assert!(object.contains_key(key), "{at}: no {key}");
        }
        for (key, item) in object {
            match properties.get(key) {
                Some(property) => validate(doc, property, item, &format!("{at}.{key}")),
                None => assert!(
                    schema["additionalProperties"] != Value::Bool(false),
                    "{at}: undocumented key {key}"
                ),
            }
        }
    }
    if let Value::Array(items) = value {
        for (i, item) in items.iter().enumerate() {
            validate(doc, &schema["items"], item, &format!("{at}[{i}]"));
        }
    }
}

/// Checks a real answer against the documented response for its status.
fn conforms(doc: &Value, reply: &Reply) {
    let status = reply.status.to_string();
    let response = operation(doc)["responses"]
        .get(&status)
        .unwrap_or_else(|| panic!("status {status} is not documented"));
    match response["content"]
        .as_object()
        .and_then(|c| c.values().next())
    {
        Some(media) => {
            let body: Value = reply.json();
            validate(doc, &media["schema"], &body, "body");
        }
        None => assert!(reply.body.is_empty(), "{status} documents no body"),
    }
    for header in response["headers"]
        .as_object()
        .into_iter()
        .flat_map(Map::keys)
    {
        assert!(
            reply.header(header).is_some(),
            "{status} lacks its documented {header}"
        );
    }
}

#[test]
fn the_agent_serves_the_document_as_kept() {
    let agent = TestAgent::start();
    let reply = agent.request("GET", "/api/rest/customer/v1/openapi.json", &[]);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, DOCUMENT.as_bytes());
    assert_eq!(document()["openapi"], "3.1.0");
}

#[test]
fn the_document_names_exactly_the_parameters_the_server_knows() {
    let doc = document();
    let mut documented: Vec<String> = operation(&doc)["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["in"] == "query")
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    let mut known: Vec<String> = active_calls_agent::api::params::names()
        .map(str::to_owned)
        .collect();
    documented.sort();
    known.sort();
    assert_eq!(documented, known);
    // Both methods document the same parameters.
    assert_eq!(
        doc["paths"][ENDPOINT]["head"]["parameters"],
        operation(&doc)["parameters"]
    );
}

#[test]
fn every_documented_answer_matches_its_schema() {
    let agent = TestAgent::start();
    agent.feed(SAMPLE_SNAPSHOT);
    let doc = document();
    let token = token_for(5001);
    let auth = [("Authorization", token.as_str())];
    let target = format!("{ENDPOINT}?account-id={ACCOUNT_101}");

    let ok = agent.request("GET", &target, &auth);
    assert_eq!(ok.status, 200);
    assert!(!ok.rows().is_empty(), "a real row to check");
    conforms(&doc, &ok);
    // The rows' keys come in the documented order.
    let keys = doc["components"]["schemas"]["Call"]["required"]
        .as_array()
        .unwrap();
    let first_row = ok.text();
    let positions: Vec<usize> = keys
        .iter()
        .map(|k| {
            first_row
                .find(&format!("\"{}\":", k.as_str().unwrap()))
                .unwrap()
        })
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");

    let etag = ok.header("etag").unwrap().to_owned();
    let not_modified = agent.request(
        "GET",
        &target,
        &[("Authorization", &token), ("If-None-Match", &etag)],
    );
    assert_eq!(not_modified.status, 304);
    conforms(&doc, &not_modified);

    for query in [
        "",
        "account-id=nope",
        "account-id[]=x",
        &format!("account-id={ACCOUNT_101}&auth-orig-port=x"),
    ] {
        let reply = agent.request("GET", &format!("{ENDPOINT}?{query}"), &auth);
        assert_eq!(reply.status, 400, "{query}");
        conforms(&doc, &reply);
    }
    let unauthorized = agent.request("GET", &target, &[]);
    assert_eq!(unauthorized.status, 401);
    conforms(&doc, &unauthorized);
}
