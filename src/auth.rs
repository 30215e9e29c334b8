//! Customer authentication (SPEC 1.1): a JWT in the `Authorization` header or the session
//! cookie, resolved against the directory into an [`AuthContext`].
//!
//! `jsonwebtoken` checks what cryptography decides: the token's form, `alg` = HS256 and the
//! signature. The claims that carry yeti's own rules (`aud`, `exp`, `sub`, `cfg`) are checked
//! here, by hand, because each has a precise meaning the generic validator does not share
//! (an absent `aud` must fail; `exp` must be strictly in the future, with no leeway).
//! Every failure is the same 401 to the client, which learns nothing about why; the
//! reason ([`Unauthorized`]) is logged (rate-limited) and counted for the operator.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::HeaderMap;
use hyper::header::{AUTHORIZATION, COOKIE};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::directory::Directory;

/// The session cookie the customer portal sets.
pub const SESSION_COOKIE: &str = "_yeti_customer_v1_session";
/// The audience a customer token must name.
pub const AUDIENCE: &str = "customer-v1";
/// The `sub` of a dynamic token, whose context is in its `cfg` claim.
const DYNAMIC_SUBJECT: &str = "D";
/// The keys a dynamic token's `cfg` may have.
const DYNAMIC_CFG_KEYS: [&str; 6] = [
    "customer_id",
    "account_ids",
    "allowed_ips",
    "allow_outgoing_numberlists_ids",
    "customer_portal_access_profile_id",
    "provision_gateway_id",
];
/// The portal access profile of a dynamic token that names none.
const DEFAULT_PORTAL_PROFILE: i64 = 1;

/// Why a request is answered 401 (with an empty body, whatever the reason). The reason
/// is for the operator (a log line and a metric), never for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unauthorized {
    /// No `Authorization` header and no session cookie.
    NoToken,
    /// Not a JWT, or one whose claims are of the wrong shape.
    Malformed,
    /// Signed with another secret (or another algorithm).
    BadSignature,
    /// An `aud` without `customer-v1`.
    WrongAudience,
    Expired,
    /// A `sub` that is no API access of the directory.
    UnknownAccess,
    /// A dynamic token whose customer or portal profile the directory does not know.
    UnknownCustomer,
    /// The agent has no secret configured: every token is refused.
    NoSecret,
}

impl Unauthorized {
    /// Every reason, for the metric's series.
    pub const ALL: [Unauthorized; 8] = [
        Unauthorized::NoToken,
        Unauthorized::Malformed,
        Unauthorized::BadSignature,
        Unauthorized::WrongAudience,
        Unauthorized::Expired,
        Unauthorized::UnknownAccess,
        Unauthorized::UnknownCustomer,
        Unauthorized::NoSecret,
    ];

    /// The reason's name in logs and in the metric's `reason` label.
    pub fn reason(self) -> &'static str {
        match self {
            Unauthorized::NoToken => "no_token",
            Unauthorized::Malformed => "malformed",
            Unauthorized::BadSignature => "bad_signature",
            Unauthorized::WrongAudience => "wrong_audience",
            Unauthorized::Expired => "expired",
            Unauthorized::UnknownAccess => "unknown_access",
            Unauthorized::UnknownCustomer => "unknown_customer",
            Unauthorized::NoSecret => "no_secret",
        }
    }
}

/// Who is asking: a customer, and the accounts its token may see (empty: all of them).
#[derive(Debug, Clone, PartialEq)]
pub struct AuthContext {
    pub customer_id: i64,
    pub account_ids: Vec<i64>,
    /// The `sub` claim as the token had it, and `cfg` for a dynamic token: what a
    /// refreshed cookie token carries again.
    sub: Value,
    cfg: Option<Value>,
}

/// A successful authentication, and whether the token came from the cookie (which is then
/// refreshed).
#[derive(Debug, Clone, PartialEq)]
pub struct Authenticated {
    pub context: AuthContext,
    pub from_cookie: bool,
    /// When the token expires (its `exp`), if it does: a live stream ends then.
    pub expires: Option<SystemTime>,
}

/// The configured secret and token lifetime.
pub struct Authenticator {
    keys: Option<(DecodingKey, EncodingKey)>,
    validation: Validation,
    token_lifetime: Duration,
}

#[derive(Serialize)]
struct Claims<'a> {
    aud: [&'a str; 1],
    sub: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    cfg: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
}

impl Authenticator {
    /// `secret` = `None`: every token is refused.
    pub fn new(secret: Option<&[u8]>, token_lifetime: Duration) -> Authenticator {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        Authenticator {
            keys: secret.map(|s| (DecodingKey::from_secret(s), EncodingKey::from_secret(s))),
            validation,
            token_lifetime,
        }
    }

    /// Whether a secret is configured at all.
    pub fn has_secret(&self) -> bool {
        self.keys.is_some()
    }

    /// Authenticates a request from its headers (SPEC 1.1).
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        directory: &Directory,
    ) -> Result<Authenticated, Unauthorized> {
        // Headers are bytes: a stray non-ASCII byte elsewhere must not hide the token.
        let (token, from_cookie) = match headers.get(AUTHORIZATION) {
            Some(value) if !value.as_bytes().trim_ascii().is_empty() => {
                let last_word = value
                    .as_bytes()
                    .split(u8::is_ascii_whitespace)
                    .rfind(|word| !word.is_empty())
                    .ok_or(Unauthorized::NoToken)?;
                let token = std::str::from_utf8(last_word).map_err(|_| Unauthorized::Malformed)?;
                (token.to_owned(), false)
            }
            // Absent or blank: the session cookie, if any.
            _ => (session_cookie(headers).ok_or(Unauthorized::NoToken)?, true),
        };
        let (context, expires) = self.verify_until(&token, directory, SystemTime::now())?;
        Ok(Authenticated {
            context,
            from_cookie,
            expires,
        })
    }

    /// Checks one token at time `now` and resolves it against the directory.
    pub fn verify(
        &self,
        token: &str,
        directory: &Directory,
        now: SystemTime,
    ) -> Result<AuthContext, Unauthorized> {
        self.verify_until(token, directory, now)
            .map(|(context, _)| context)
    }

    /// [`verify`](Self::verify), and when the token expires, if it does.
    fn verify_until(
        &self,
        token: &str,
        directory: &Directory,
        now: SystemTime,
    ) -> Result<(AuthContext, Option<SystemTime>), Unauthorized> {
        let (decoding, _) = self.keys.as_ref().ok_or(Unauthorized::NoSecret)?;
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, decoding, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature
                | jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => Unauthorized::BadSignature,
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => Unauthorized::Expired,
                _ => Unauthorized::Malformed,
            })?
            .claims;
        let audience_ok = match claims.get("aud") {
            Some(Value::String(aud)) => aud == AUDIENCE,
            Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(AUDIENCE)),
            _ => false,
        };
        if !audience_ok {
            return Err(Unauthorized::WrongAudience);
        }
        let mut expires = None;
        if let Some(exp) = claims.get("exp") {
            let now = now
                .duration_since(UNIX_EPOCH)
                .map_err(|_| Unauthorized::Expired)?;
            let exp = exp.as_f64().ok_or(Unauthorized::Malformed)?;
            if exp <= now.as_secs_f64() {
                return Err(Unauthorized::Expired);
            }
            expires = Duration::try_from_secs_f64(exp)
                .ok()
                .and_then(|exp| UNIX_EPOCH.checked_add(exp));
        }
        let sub = claims.get("sub").ok_or(Unauthorized::Malformed)?;
        if sub.as_str() == Some(DYNAMIC_SUBJECT) {
            let cfg = claims.get("cfg").ok_or(Unauthorized::Malformed)?;
            return dynamic_context(sub, cfg, directory).map(|context| (context, expires));
        }
        let access_id = integer(sub).ok_or(Unauthorized::Malformed)?;
        let access = directory
            .api_access(access_id)
            .ok_or(Unauthorized::UnknownAccess)?;
        let context = AuthContext {
            customer_id: access.customer_id,
            account_ids: access.account_ids.clone(),
            sub: sub.clone(),
            cfg: None,
        };
        Ok((context, expires))
    }

    /// A freshly signed token for the same context: header `{"alg":"HS256"}`, `exp` only
    /// when the configured lifetime is not 0.
    pub fn sign(&self, context: &AuthContext, now: SystemTime) -> Option<String> {
        let (_, encoding) = self.keys.as_ref()?;
        let mut header = Header::new(Algorithm::HS256);
        header.typ = None;
        let claims = Claims {
            aud: [AUDIENCE],
            sub: &context.sub,
            cfg: context.cfg.as_ref(),
            exp: self
                .expires_at(now)
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
        };
        match jsonwebtoken::encode(&header, &claims, encoding) {
            Ok(token) => Some(token),
            Err(e) => {
                tracing::error!(error = %e, "signing a refreshed session token failed");
                None
            }
        }
    }

    /// A token for the static API access `access_id` (for operators' tools and the demo).
    pub fn issue_for_access(&self, access_id: i64, now: SystemTime) -> Option<String> {
        let context = AuthContext {
            customer_id: 0,
            account_ids: Vec::new(),
            sub: Value::from(access_id),
            cfg: None,
        };
        self.sign(&context, now)
    }

    /// The `Set-Cookie` value that refreshes the session cookie for `context`.
    pub fn refreshed_cookie(&self, context: &AuthContext, now: SystemTime) -> Option<String> {
        let token = self.sign(context, now)?;
        Some(match self.expires_at(now) {
            Some(expires) => format!(
                "{SESSION_COOKIE}={token}; path=/; expires={}; HttpOnly; SameSite=Lax",
                httpdate::fmt_http_date(expires)
            ),
            None => format!("{SESSION_COOKIE}={token}; path=/; HttpOnly; SameSite=Lax"),
        })
    }

    fn expires_at(&self, now: SystemTime) -> Option<SystemTime> {
        // The configuration caps the lifetime (see `config::MAX_TOKEN_LIFETIME`), so the
        // sum cannot overflow; were it to, no expiry beats a panic.
        (!self.token_lifetime.is_zero())
            .then(|| now.checked_add(self.token_lifetime))
            .flatten()
    }
}

fn dynamic_context(
    sub: &Value,
    cfg: &Value,
    directory: &Directory,
) -> Result<AuthContext, Unauthorized> {
    let fields = cfg.as_object().ok_or(Unauthorized::Malformed)?;
    if fields
        .keys()
        .any(|k| !DYNAMIC_CFG_KEYS.contains(&k.as_str()))
    {
        return Err(Unauthorized::Malformed);
    }
    let present = |key: &str| fields.get(key).filter(|v| !v.is_null());
    let customer_id = present("customer_id")
        .and_then(integer)
        .ok_or(Unauthorized::Malformed)?;
    let account_ids = match present("account_ids") {
        None => Vec::new(),
        Some(Value::Array(ids)) => ids
            .iter()
            .map(integer)
            .collect::<Option<_>>()
            .ok_or(Unauthorized::Malformed)?,
        Some(_) => return Err(Unauthorized::Malformed),
    };
    let profile = match present("customer_portal_access_profile_id") {
        None => DEFAULT_PORTAL_PROFILE,
        Some(id) => integer(id).ok_or(Unauthorized::Malformed)?,
    };
    if !directory.has_customer(customer_id) || !directory.has_portal_profile(profile) {
        return Err(Unauthorized::UnknownCustomer);
    }
    Ok(AuthContext {
        customer_id,
        account_ids,
        sub: sub.clone(),
        cfg: Some(cfg.clone()),
    })
}

/// An integer, or an integer in a string.
fn integer(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// The value of the session cookie, from the `Cookie` headers (the first one named so
/// wins, as in Rack).
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    let value = headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|h| h.as_bytes().split(|&b| b == b';'))
        .filter_map(|pair| {
            let eq = pair.iter().position(|&b| b == b'=')?;
            Some((pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii()))
        })
        .find(|(name, _)| *name == SESSION_COOKIE.as_bytes())?
        .1;
    let value = std::str::from_utf8(value).ok()?.trim_matches('"');
    (!value.is_empty()).then(|| value.to_owned())
}

/// The bearer tokens that may scrape every call of the node (SPEC 6), from
/// `upstream.scrape_tokens_file`: one per line; blank lines and `#` comments are skipped.
#[derive(Default)]
pub struct ScrapeTokens(Vec<Vec<u8>>);

/// Never the tokens themselves, should one ever be logged.
impl std::fmt::Debug for ScrapeTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ScrapeTokens({} tokens)", self.0.len())
    }
}

impl ScrapeTokens {
    /// Reads the file; no file configured means no token.
    pub fn load(path: Option<&std::path::Path>) -> anyhow::Result<ScrapeTokens> {
        use anyhow::Context;
        let Some(path) = path else {
            return Ok(ScrapeTokens::default());
        };
        let text = std::fs::read(path)
            .with_context(|| format!("reading upstream.scrape_tokens_file {}", path.display()))?;
        Ok(ScrapeTokens::parse(&text))
    }

    fn parse(text: &[u8]) -> ScrapeTokens {
        let tokens = text
            .split(|&b| b == b'\n')
            .map(<[u8]>::trim_ascii)
            .filter(|line| !line.is_empty() && !line.starts_with(b"#"))
            .map(<[u8]>::to_vec)
            .collect();
        ScrapeTokens(tokens)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The length of the shortest token (0 when there is none).
    pub fn shortest(&self) -> usize {
        self.0.iter().map(Vec::len).min().unwrap_or(0)
    }

    /// Whether the request's `Authorization: Bearer <token>` names one of the tokens. Every
    /// token is compared, each in time independent of where it differs: the answer's
    /// timing tells nothing about how much of a guess was right.
    pub fn admit(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers
            .get(AUTHORIZATION)
            .map(|v| v.as_bytes().trim_ascii())
        else {
            return false;
        };
        let Some(space) = value.iter().position(u8::is_ascii_whitespace) else {
            return false;
        };
        let (scheme, presented) = value.split_at(space);
        if !scheme.eq_ignore_ascii_case(b"bearer") {
            return false;
        }
        let presented = presented.trim_ascii();
        self.0.iter().fold(false, |found, token| {
            found | constant_time_eq(token, presented)
        })
    }
}

/// Compares two byte strings in time that depends on their length only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_tokens_are_whole_lines_compared_whole() {
        let tokens = ScrapeTokens::parse(b"# aggregators\n\n  tok-one \r\ntok-two\n");
        assert_eq!(tokens.len(), 2);
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(AUTHORIZATION, value.parse().unwrap());
            tokens.admit(&headers)
        };
        assert!(with("Bearer tok-one"));
        assert!(with("bearer  tok-two"));
        assert!(with("Bearer\ttok-one"));
        assert_eq!(format!("{tokens:?}"), "ScrapeTokens(2 tokens)");
        assert!(!with("Bearer tok-on"));
        assert!(!with("Bearer tok-one2"));
        assert!(!with("tok-one"));
        assert!(!with("Bearer # aggregators"));
        assert!(!with("Bearer "));
        assert!(!tokens.admit(&HeaderMap::new()));
        assert!(!ScrapeTokens::default().admit(&HeaderMap::new()));
    }
    use serde_json::json;

    const SECRET: &[u8] = b"test-secret";

    fn directory() -> Directory {
        Directory::parse(
            br#"{"accounts": [], "api_accesses": [{"id": 40, "customer_id": 5, "account_ids": [7]}],
                "customers": [{"id": 5}], "customer_portal_access_profiles": [{"id": 1}, {"id": 3}]}"#,
        )
        .unwrap()
    }

    fn token(claims: Value) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.typ = None;
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(SECRET)).unwrap()
    }

    fn verify(claims: Value) -> Result<AuthContext, Unauthorized> {
        let auth = Authenticator::new(Some(SECRET), Duration::ZERO);
        auth.verify(&token(claims), &directory(), SystemTime::now())
    }

    fn far_future() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600
    }

    #[test]
    fn static_tokens_resolve_through_the_directory() {
        for sub in [json!(40), json!("40")] {
            let ctx = verify(json!({"aud": ["customer-v1"], "sub": sub})).unwrap();
            assert_eq!((ctx.customer_id, ctx.account_ids.clone()), (5, vec![7]));
        }
        let ctx = verify(json!({"aud": "customer-v1", "sub": 40, "exp": far_future()})).unwrap();
        assert_eq!(ctx.customer_id, 5);
    }

    #[test]
    fn claims_that_fail() {
        let past = 1_000_000;
        use Unauthorized::*;
        for (claims, why) in [
            (json!({"sub": 40}), WrongAudience),
            (json!({"aud": "admin", "sub": 40}), WrongAudience),
            (json!({"aud": ["admin"], "sub": 40}), WrongAudience),
            (json!({"aud": 1, "sub": 40}), WrongAudience),
            (json!({"aud": ["customer-v1"], "sub": 41}), UnknownAccess),
            (json!({"aud": ["customer-v1"], "sub": 40.5}), Malformed),
            (json!({"aud": ["customer-v1"], "sub": "forty"}), Malformed),
            (json!({"aud": ["customer-v1"]}), Malformed),
            (
                json!({"aud": ["customer-v1"], "sub": 40, "exp": past}),
                Expired,
            ),
            (
                json!({"aud": ["customer-v1"], "sub": 40, "exp": "never"}),
                Malformed,
            ),
        ] {
            assert_eq!(verify(claims.clone()), Err(why), "{claims}");
        }
    }

    #[test]
    fn dynamic_tokens() {
        let ok = verify(json!({"aud": ["customer-v1"], "sub": "D",
            "cfg": {"customer_id": 5, "account_ids": [1, 2], "allowed_ips": ["0.0.0.0/0"],
                    "customer_portal_access_profile_id": 3, "provision_gateway_id": null}}))
        .unwrap();
        assert_eq!((ok.customer_id, ok.account_ids), (5, vec![1, 2]));
        let minimal =
            verify(json!({"aud": ["customer-v1"], "sub": "D", "cfg": {"customer_id": 5}})).unwrap();
        assert!(minimal.account_ids.is_empty());
        use Unauthorized::*;
        for (cfg, why) in [
            (json!({}), Malformed),
            (json!({"customer_id": 6}), UnknownCustomer),
            (
                json!({"customer_id": 5, "customer_portal_access_profile_id": 2}),
                UnknownCustomer,
            ),
            (json!({"customer_id": 5, "admin": true}), Malformed),
            (json!({"customer_id": 5, "account_ids": "1"}), Malformed),
            (json!([5]), Malformed),
        ] {
            let claims = json!({"aud": ["customer-v1"], "sub": "D", "cfg": cfg});
            assert_eq!(verify(claims.clone()), Err(why), "{claims}");
        }
    }

    #[test]
    fn no_secret_refuses_everything() {
        let auth = Authenticator::new(None, Duration::ZERO);
        let t = token(json!({"aud": ["customer-v1"], "sub": 40}));
        assert_eq!(
            auth.verify(&t, &directory(), SystemTime::now()),
            Err(Unauthorized::NoSecret)
        );
    }

    #[test]
    fn refreshed_tokens_carry_the_same_context() {
        let auth = Authenticator::new(Some(SECRET), Duration::from_secs(600));
        let original = json!({"aud": ["customer-v1"], "sub": "D", "cfg": {"customer_id": 5}});
        let ctx = auth
            .verify(&token(original), &directory(), SystemTime::now())
            .unwrap();
        let cookie = auth.refreshed_cookie(&ctx, SystemTime::now()).unwrap();
        assert!(
            cookie.starts_with("_yeti_customer_v1_session=eyJhbGciOiJIUzI1NiJ9."),
            "{cookie}"
        );
        assert!(
            cookie.contains("; path=/; expires=")
                && cookie.ends_with(" GMT; HttpOnly; SameSite=Lax")
        );
        let fresh = auth.sign(&ctx, SystemTime::now()).unwrap();
        assert_eq!(
            auth.verify(&fresh, &directory(), SystemTime::now())
                .unwrap(),
            ctx
        );

        let forever = Authenticator::new(Some(SECRET), Duration::ZERO);
        let cookie = forever.refreshed_cookie(&ctx, SystemTime::now()).unwrap();
        assert!(!cookie.contains("expires="), "{cookie}");
        let fresh = forever.sign(&ctx, SystemTime::now()).unwrap();
        let claims = jsonwebtoken::decode::<Map<String, Value>>(
            &fresh,
            &DecodingKey::from_secret(SECRET),
            &forever.validation,
        )
        .unwrap()
        .claims;
        assert_eq!(
            Value::Object(claims),
            json!({"aud": ["customer-v1"], "sub": "D", "cfg": {"customer_id": 5}})
        );
    }
}
