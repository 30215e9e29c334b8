//! The endpoint's query string (SPEC 1.2): `http::form_pairs` and `api::params::parse`
//! for every API access of the sample directory. The input is the raw query string, the
//! bytes after `?` exactly as a client sent them.
//!
//! Checked beyond "never panics": tenant isolation (an accepted `account-id` is always an
//! account the token may see), that the outcome does not depend on the token beyond that,
//! and that every 400 body is the JSON the SPEC prescribes.

#![no_main]

mod common;

use active_calls_agent::api::params::{self, ParamError};
use active_calls_agent::http;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|query: &[u8]| {
    // form_pairs: one pair per non-empty `&`-separated piece, each component no longer
    // decoded than it was encoded.
    let pieces: Vec<&[u8]> = query
        .split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .collect();
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = http::form_pairs(query).collect();
    assert_eq!(pairs.len(), pieces.len(), "one pair per piece");
    for ((name, value), piece) in pairs.iter().zip(&pieces) {
        assert!(
            name.len() + value.len() <= piece.len(),
            "decoding never grows"
        );
    }

    let directory = common::directory();
    let mut outcomes = Vec::new();
    for (context, customer, visible) in common::contexts() {
        let outcome = params::parse(query, context, directory);
        match &outcome {
            Ok((account, _filters)) => {
                // Tenant isolation: never an account of another customer, nor one the
                // token does not list.
                assert!(
                    visible.contains(account),
                    "customer {customer} given account {account}, may see {visible:?}"
                );
                let owner = common::ACCOUNTS
                    .iter()
                    .find(|a| a.1 == *account)
                    .map(|a| a.2);
                assert_eq!(owner, Some(*customer));
            }
            Err(error) => {
                let body: serde_json::Value =
                    serde_json::from_str(&error.body()).expect("a 400 body is JSON");
                let text = body["error"].as_str().expect("an error text");
                assert!(
                    text == "missing required param(s) account-id"
                        || (text.starts_with("param ") && text.ends_with(" can't be an array"))
                        || text.starts_with("invalid value "),
                    "{text}"
                );
            }
        }
        outcomes.push(outcome);
    }
    // Only the account decides between tokens: errors other than about account-id, and
    // the filters of an accepted query, are the same for every token that sees it.
    for pair in outcomes.windows(2) {
        if let (Ok((_, a)), Ok((_, b))) = (&pair[0], &pair[1]) {
            assert_eq!(a, b, "the same filters whoever asks");
        }
        if let (Err(a), Err(b)) = (&pair[0], &pair[1])
            && *a != ParamError::Invalid("account-id")
            && *b != ParamError::Invalid("account-id")
        {
            assert_eq!(a, b, "the same error whoever asks");
        }
    }
});
