//! What the fuzz targets share: the sample directory of the integration tests, an
//! authenticator with a fixed secret, and the customers' contexts.

#![allow(dead_code)]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use active_calls_agent::auth::{AuthContext, Authenticator};
use active_calls_agent::directory::Directory;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey};

/// The secret the targets verify with (and the seed tokens are signed with).
pub const SECRET: &[u8] = b"fuzz-secret";

/// The directory of the integration tests: customers 1001 (accounts 101, 102) and 1002
/// (accounts 103, 104); API accesses 5001/5002 see all of their customer's accounts,
/// 6001/6002 only 101/103.
pub const DIRECTORY_JSON: &[u8] = include_bytes!("../../../tests/fixtures/directory.json");

/// Each account of the sample directory: (uuid, id, customer).
pub const ACCOUNTS: [(&str, i64, i64); 4] = [
    ("21636369-8b52-1b4a-97b7-50923ceb3ffd", 101, 1001),
    ("795b929e-9a9a-10fd-aa7b-5bf55eb561a4", 102, 1001),
    ("9b08923d-10c6-1fd9-94b2-b8fda02f34a6", 103, 1002),
    ("781f9c58-d664-1fa9-a8a8-529f035efa25", 104, 1002),
];

/// The session cookie refreshed for `context` authenticates, from the cookie, as the
/// same context.
pub fn assert_refreshed_cookie_keeps(context: &AuthContext) {
    let (auth, directory) = (authenticator(), directory());
    let cookie = auth
        .refreshed_cookie(context, SystemTime::now())
        .expect("a refreshed cookie");
    let pair = cookie.split(';').next().expect("name=value");
    let mut again = hyper::HeaderMap::new();
    let value = hyper::header::HeaderValue::from_str(pair).expect("a header value");
    again.insert(hyper::header::COOKIE, value);
    let refreshed = auth
        .authenticate(&again, directory)
        .expect("the refreshed cookie");
    assert_eq!(&refreshed.context, context);
    assert!(refreshed.from_cookie);
}

pub fn directory() -> &'static Directory {
    static DIRECTORY: OnceLock<Directory> = OnceLock::new();
    DIRECTORY.get_or_init(|| Directory::parse(DIRECTORY_JSON).expect("the sample directory"))
}

pub fn authenticator() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| Authenticator::new(Some(SECRET), Duration::from_secs(3600)))
}

/// The context of a static token of API access `access_id`, as a real request gets it.
pub fn context_of(access_id: i64) -> AuthContext {
    let token = authenticator()
        .issue_for_access(access_id, SystemTime::now())
        .expect("signing");
    authenticator()
        .verify(&token, directory(), SystemTime::now())
        .expect("a token of the sample directory")
}

/// Contexts of the four API accesses: (context, customer, the accounts it may see).
pub fn contexts() -> &'static [(AuthContext, i64, Vec<i64>)] {
    static CONTEXTS: OnceLock<Vec<(AuthContext, i64, Vec<i64>)>> = OnceLock::new();
    CONTEXTS.get_or_init(|| {
        vec![
            (context_of(5001), 1001, vec![101, 102]),
            (context_of(6001), 1001, vec![101]),
            (context_of(5002), 1002, vec![103, 104]),
            (context_of(6002), 1002, vec![103]),
        ]
    })
}

/// A compact JWS of `header` and `payload` (raw bytes, base64url-encoded as they are),
/// signed with HS256 and `secret`.
pub fn sign_raw(header: &[u8], payload: &[u8], secret: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let message = format!("{}.{}", b64.encode(header), b64.encode(payload));
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(secret),
        Algorithm::HS256,
    )
    .expect("HMAC signing");
    format!("{message}.{signature}")
}
