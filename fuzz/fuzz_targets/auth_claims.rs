//! The token path past the signature: the fuzzer writes the JWT's claims (and optionally
//! its header), the target signs them with the authenticator's secret (HS256), and the
//! token goes through `Authenticator::authenticate` in the `Authorization` header or the
//! session cookie. This reaches the claim rules of SPEC 1.1 (`aud`, `exp`, `sub`, `cfg`),
//! which a mutated token never does: its signature fails first.
//!
//! Input: one mode byte, then the claims JSON. Mode bit 0: send the token in the cookie
//! (else `Authorization: Bearer`); bit 1: the input after the mode byte is
//! `<header JSON>\n<claims JSON>` (else the header is `{"alg":"HS256","typ":"JWT"}`).
//! The seeds use the mode bytes `0`..`3` (0x30..0x33).
//!
//! Checked beyond "never panics", against the claims as plain JSON: an accepted token has
//! `aud` customer-v1 and, if any, a future `exp`; a static token's context is its API
//! access's, a dynamic one's names its `cfg.customer_id`, a customer of the directory; the
//! refreshed cookie carries the same context.

#![no_main]

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use active_calls_agent::auth::SESSION_COOKIE;
use hyper::HeaderMap;
use hyper::header::{AUTHORIZATION, COOKIE, HeaderValue};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fn integer(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let (header, claims): (&[u8], &[u8]) = if mode & 2 != 0 {
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => return,
        }
    } else {
        (br#"{"alg":"HS256","typ":"JWT"}"#, rest)
    };
    let token = common::sign_raw(header, claims, common::SECRET);
    let mut headers = HeaderMap::new();
    let value = if mode & 1 != 0 {
        format!("{SESSION_COOKIE}={token}")
    } else {
        format!("Bearer {token}")
    };
    let value = HeaderValue::from_str(&value).expect("base64url is a header value");
    headers.insert(if mode & 1 != 0 { COOKIE } else { AUTHORIZATION }, value);

    let auth = common::authenticator();
    let directory = common::directory();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let Ok(authenticated) = auth.authenticate(&headers, directory) else {
        return;
    };
    let context = &authenticated.context;
    assert_eq!(authenticated.from_cookie, mode & 1 != 0);

    // The reference: the claims as plain JSON.
    let claims: Map<String, Value> =
        serde_json::from_slice(claims).expect("accepted claims are a JSON object");
    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => aud == "customer-v1",
        Some(Value::Array(list)) => list.iter().any(|a| a == "customer-v1"),
        _ => false,
    };
    assert!(audience_ok, "accepted with aud {:?}", claims.get("aud"));
    if let Some(exp) = claims.get("exp") {
        let exp = exp.as_f64().expect("accepted exp is a number");
        assert!(exp > now, "accepted an expired token: exp {exp}, now {now}");
    }
    let sub = claims.get("sub").expect("accepted without sub");
    if sub == "D" {
        let cfg = claims
            .get("cfg")
            .and_then(Value::as_object)
            .expect("a dynamic cfg");
        assert_eq!(
            cfg.get("customer_id").and_then(integer),
            Some(context.customer_id)
        );
    } else {
        let access = directory
            .api_access(integer(sub).expect("a static sub is an integer"))
            .expect("a static token's access is in the directory");
        assert_eq!(access.customer_id, context.customer_id);
        assert_eq!(access.account_ids, context.account_ids);
    }
    assert!(directory.has_customer(context.customer_id));

    common::assert_refreshed_cookie_keeps(context);
});
