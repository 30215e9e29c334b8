//! The token path from raw request headers: `auth::Authenticator::authenticate` over the
//! `Authorization` and `Cookie` headers, and `Authenticator::verify` on each header's bytes.
//!
//! Input: one header per `\n`-separated line; a line starting with `A` is an
//! `Authorization` value (the rest of the line), any other line a `Cookie` value (the rest
//! of the line). An input with a line that is not a valid header value is skipped, as
//! hyper would never hand it over.
//!
//! Checked beyond "never panics": whatever authenticates is a customer of the directory,
//! through the header when one is given (not blank), else through the cookie; and the
//! refreshed session cookie authenticates again as the same context.

#![no_main]

mod common;

use std::time::SystemTime;

use hyper::HeaderMap;
use hyper::header::{AUTHORIZATION, COOKIE, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let mut headers = HeaderMap::new();
    for line in input.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let (kind, value) = line.split_at(1);
        let Ok(value) = HeaderValue::from_bytes(value) else {
            return;
        };
        let name = if kind == b"A" { AUTHORIZATION } else { COOKIE };
        headers.append(name, value);
    }
    let auth = common::authenticator();
    let directory = common::directory();

    let result = auth.authenticate(&headers, directory);
    if let Ok(authenticated) = &result {
        let context = &authenticated.context;
        assert!(
            directory.has_customer(context.customer_id),
            "customer {} is not in the directory",
            context.customer_id
        );
        let header_given = headers
            .get(AUTHORIZATION)
            .is_some_and(|v| !v.as_bytes().trim_ascii().is_empty());
        assert_eq!(authenticated.from_cookie, !header_given);
        common::assert_refreshed_cookie_keeps(context);
    }

    // Each value as a bare token.
    for value in headers.values() {
        if let Ok(token) = std::str::from_utf8(value.as_bytes()) {
            if let Ok(context) = auth.verify(token, directory, SystemTime::now()) {
                assert!(directory.has_customer(context.customer_id));
            }
        }
    }
});
