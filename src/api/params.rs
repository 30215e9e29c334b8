//! The endpoint's query string, decoded and checked as SPEC 1.2 says, into the filters of
//! a [`CallQuery`](crate::store::CallQuery).
//!
//! Decoding ([`form_pairs`], shared with the feed) is `application/x-www-form-urlencoded`
//! to *bytes*, not to text: a filter compares bytes, so `%FF` is a byte like any other and
//! never turns into U+FFFD. Names follow Rack's rule for brackets (`name[]`, `name[k]` make
//! an array or a hash), because the central API is a Rails application and its answers
//! are the reference.

use std::sync::LazyLock;

use crate::auth::AuthContext;
use crate::directory::Directory;
use crate::http::form_pairs;
use crate::store::{Filter, TextColumn, TextMatch};

/// A 400 answer: the SPEC's exact `error` text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamError {
    MissingAccountId,
    Array(&'static str),
    Invalid(&'static str),
}

impl ParamError {
    /// The SPEC's text.
    pub fn message(&self) -> String {
        match self {
            ParamError::MissingAccountId => "missing required param(s) account-id".to_string(),
            ParamError::Array(name) => format!("param {name} can't be an array"),
            ParamError::Invalid(name) => format!("invalid value {name}"),
        }
    }

    /// The JSON body of the 400 answer.
    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.message() }).to_string()
    }
}

/// What a known parameter filters on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Param {
    AccountId,
    AuthOrigIp,
    AuthOrigPort,
    AuthOrigTransportProtocolId,
    ConnectTimeNull,
    Text(TextColumn, TextMatch),
}

const FIXED_PARAMS: [(&str, Param); 5] = [
    ("account-id", Param::AccountId),
    ("auth-orig-ip", Param::AuthOrigIp),
    ("auth-orig-port", Param::AuthOrigPort),
    (
        "auth-orig-transport-protocol-id",
        Param::AuthOrigTransportProtocolId,
    ),
    ("connect-time-null", Param::ConnectTimeNull),
];

/// What a string filter's parameter name ends with, after its column's.
fn match_suffix(how: TextMatch) -> &'static str {
    match how {
        TextMatch::Equals => "eq",
        TextMatch::StartsWith => "starts-with",
        TextMatch::EndsWith => "ends-with",
        TextMatch::Contains => "contains",
    }
}

/// The 20 string filters: every column by every match, `<column>-<match>`, the column's
/// name dashed (`src-name-in-eq`, `dst-prefix-routing-starts-with`, ...).
static TEXT_PARAMS: LazyLock<Vec<(String, Param)>> = LazyLock::new(|| {
    let name = |column: TextColumn, how| {
        format!("{}-{}", column.name().replace('_', "-"), match_suffix(how))
    };
    TextColumn::ALL
        .into_iter()
        .flat_map(|column| {
            (TextMatch::ALL.into_iter())
                .map(move |how| (name(column, how), Param::Text(column, how)))
        })
        .collect()
});

/// Every parameter the endpoint knows, with what it filters on.
fn params() -> impl Iterator<Item = (&'static str, Param)> {
    let text = TEXT_PARAMS
        .iter()
        .map(|(name, param)| (name.as_str(), *param));
    FIXED_PARAMS.into_iter().chain(text)
}

/// The names of every parameter the endpoint knows (for the OpenAPI document's check).
pub fn names() -> impl Iterator<Item = &'static str> {
    params().map(|(name, _)| name)
}

/// The known parameter called `name`, with its name as a static string for messages.
fn known(name: &[u8]) -> Option<(&'static str, Param)> {
    params().find(|(n, _)| n.as_bytes() == name)
}

/// The last value given for a known parameter: a scalar, or an array/hash.
#[derive(Debug)]
enum Given {
    Scalar(Vec<u8>),
    Array,
}

/// Splits a decoded name as Rack does at the top level: the part before the first `[`
/// (from the second byte on) is the key; anything after it but a lone `[` makes the value
/// an array or a hash.
fn split_brackets(name: &[u8]) -> (&[u8], bool) {
    match name.iter().skip(1).position(|&b| b == b'[') {
        None => (name, false),
        Some(i) if &name[i + 1..] == b"[" => (name, false),
        Some(i) => (&name[..i + 1], true),
    }
}

/// The known parameters of a query string, in the order of their first appearance, each
/// with its last value.
fn collect(query: &[u8]) -> Vec<(&'static str, Param, Given)> {
    let mut found: Vec<(&'static str, Param, Given)> = Vec::new();
    for (name, value) in form_pairs(query) {
        let (key, nested) = split_brackets(&name);
        let Some((static_name, param)) = known(key) else {
            continue;
        };
        let given = if nested {
            Given::Array
        } else {
            Given::Scalar(value)
        };
        match found.iter_mut().find(|(n, _, _)| *n == static_name) {
            Some(entry) => entry.2 = given,
            None => found.push((static_name, param, given)),
        }
    }
    found
}

/// An integer: optional sign, then base-10 digits (leading zeros allowed), nothing else.
fn integer<T: TryFrom<i64>>(value: &[u8]) -> Option<T> {
    let digits = value
        .strip_prefix(b"-")
        .or_else(|| value.strip_prefix(b"+"))
        .unwrap_or(value);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let number: i64 = std::str::from_utf8(value).ok()?.parse().ok()?;
    T::try_from(number).ok()
}

/// The `connect-time-null` truth table: these values mean "connected calls only".
fn means_false(value: &[u8]) -> bool {
    matches!(
        value,
        b"" | b"0" | b"f" | b"F" | b"false" | b"FALSE" | b"off" | b"OFF"
    )
}

/// What a filter parameter (any but `account-id`) means, given its one value.
fn to_filter(name: &'static str, param: Param, value: Vec<u8>) -> Result<Filter, ParamError> {
    let invalid = ParamError::Invalid(name);
    Ok(match param {
        Param::AccountId => return Err(invalid),
        Param::AuthOrigIp => Filter::AuthOrigIp(value),
        Param::AuthOrigPort => Filter::AuthOrigPort(integer(&value).ok_or(invalid)?),
        Param::AuthOrigTransportProtocolId => {
            Filter::AuthOrigTransportProtocolId(integer(&value).ok_or(invalid)?)
        }
        Param::ConnectTimeNull => Filter::ConnectTimeNull(!means_false(&value)),
        Param::Text(column, how) => Filter::Text {
            column,
            how,
            needle: value,
        },
    })
}

/// The names of the endpoint's filter parameters: all but `account-id`.
pub fn filter_names() -> impl Iterator<Item = &'static str> {
    names().filter(|n| *n != "account-id")
}

/// The filter parameter `name` with `value`, read as the endpoint reads it (so the local
/// `calls` command's flags mean what the query string's parameters mean); `None` when
/// `name` is not one of [`filter_names`].
pub fn filter(name: &str, value: Vec<u8>) -> Option<Result<Filter, ParamError>> {
    let (name, param) = known(name.as_bytes()).filter(|(_, p)| *p != Param::AccountId)?;
    Some(to_filter(name, param, value))
}

/// The account and filters of a query string, checked for `context` (SPEC 1.2, in its
/// order: missing `account-id` first, then each parameter in order of first appearance).
pub fn parse(
    query: &[u8],
    context: &AuthContext,
    directory: &Directory,
) -> Result<(i64, Vec<Filter>), ParamError> {
    let given = collect(query);
    if !given.iter().any(|(_, p, _)| *p == Param::AccountId) {
        return Err(ParamError::MissingAccountId);
    }
    let mut account = None;
    let mut filters = Vec::new();
    for (name, param, value) in given {
        let Given::Scalar(value) = value else {
            return Err(ParamError::Array(name));
        };
        if param == Param::AccountId {
            let found = directory
                .account_by_uuid(&value)
                .filter(|a| a.contractor_id == context.customer_id)
                .filter(|a| context.account_ids.is_empty() || context.account_ids.contains(&a.id));
            account = Some(found.ok_or(ParamError::Invalid(name))?.id);
        } else {
            filters.push(to_filter(name, param, value)?);
        }
    }
    // The loop above saw account-id (checked before it) and returned on any failure.
    let account = account.ok_or(ParamError::MissingAccountId)?;
    Ok((account, filters))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "06b61b60-e7d9-11f0-932e-0a63caf27539";
    const OTHER_CUSTOMERS: &str = "16b61b60-e7d9-11f0-932e-0a63caf27539";

    fn directory() -> Directory {
        Directory::parse(
            format!(
                r#"{{"accounts": [{{"id": 25, "uuid": "{UUID}", "contractor_id": 5}},
                                  {{"id": 26, "uuid": "{OTHER_CUSTOMERS}", "contractor_id": 6}}],
                   "api_accesses": [{{"id": 40, "customer_id": 5, "account_ids": []}},
                                    {{"id": 41, "customer_id": 5, "account_ids": [99]}}]}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    fn context(access: i64) -> AuthContext {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let token = encode(
            &Header::default(),
            &serde_json::json!({"aud": "customer-v1", "sub": access}),
            &EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        crate::auth::Authenticator::new(Some(b"k"), std::time::Duration::ZERO)
            .verify(&token, &directory(), std::time::SystemTime::now())
            .unwrap()
    }

    fn run(query: &str) -> Result<(i64, Vec<Filter>), String> {
        parse(query.as_bytes(), &context(40), &directory()).map_err(|e| e.body())
    }

    fn text(column: TextColumn, how: TextMatch, needle: &[u8]) -> Filter {
        Filter::Text {
            column,
            how,
            needle: needle.to_vec(),
        }
    }

    #[test]
    fn account_id_rules() {
        assert_eq!(run(&format!("account-id={UUID}")), Ok((25, vec![])));
        assert_eq!(
            run(&format!("account-id={}", UUID.to_uppercase())),
            Ok((25, vec![]))
        );
        let missing = r#"{"error":"missing required param(s) account-id"}"#;
        let invalid = r#"{"error":"invalid value account-id"}"#;
        assert_eq!(run("").unwrap_err(), missing);
        assert_eq!(run("auth-orig-port=x").unwrap_err(), missing);
        assert_eq!(run("account-id=").unwrap_err(), invalid);
        assert_eq!(run("account-id").unwrap_err(), invalid);
        assert_eq!(run("account-id=nope").unwrap_err(), invalid);
        assert_eq!(
            run(&format!("account-id={OTHER_CUSTOMERS}")).unwrap_err(),
            invalid
        );
        assert_eq!(
            run(&format!("account-id=%7B{UUID}%7D")).unwrap_err(),
            invalid
        );
        let restricted = parse(
            format!("account-id={UUID}").as_bytes(),
            &context(41),
            &directory(),
        );
        assert_eq!(restricted, Err(ParamError::Invalid("account-id")));
        assert_eq!(
            run(&format!("account-id[]={UUID}")).unwrap_err(),
            r#"{"error":"param account-id can't be an array"}"#
        );
        assert_eq!(
            run(&format!("account-id[k]={UUID}")).unwrap_err(),
            r#"{"error":"param account-id can't be an array"}"#
        );
    }

    #[test]
    fn errors_come_in_order_of_first_appearance_with_the_last_value() {
        let q = format!("auth-orig-port=x&account-id=bad&auth-orig-port=1&account-id={UUID}");
        assert_eq!(run(&q), Ok((25, vec![Filter::AuthOrigPort(1)])));
        let q = format!(
            "auth-orig-port=1&account-id={UUID}&auth-orig-port=x&auth-orig-transport-protocol-id=x"
        );
        assert_eq!(
            run(&q).unwrap_err(),
            r#"{"error":"invalid value auth-orig-port"}"#
        );
        let q = "connect-time-null[]=1&account-id=bad";
        assert_eq!(
            run(q).unwrap_err(),
            r#"{"error":"param connect-time-null can't be an array"}"#
        );
        let q = "account-id=bad&src-name-in-eq[]=1";
        assert_eq!(
            run(q).unwrap_err(),
            r#"{"error":"invalid value account-id"}"#
        );
    }

    #[test]
    fn integers() {
        let port = |v: &str| run(&format!("account-id={UUID}&auth-orig-port={v}"));
        assert_eq!(
            port("%2B0005060"),
            Ok((25, vec![Filter::AuthOrigPort(5060)]))
        );
        assert_eq!(
            port("-2147483648"),
            Ok((25, vec![Filter::AuthOrigPort(i32::MIN)]))
        );
        for bad in [
            "",
            "+5060",
            "2147483648",
            "%205060",
            "5060+",
            "50.0",
            "0x10",
            "+",
            "-",
            "1e3",
            "٣",
        ] {
            assert_eq!(
                port(bad).unwrap_err(),
                r#"{"error":"invalid value auth-orig-port"}"#,
                "{bad}"
            );
        }
        let proto = |v: &str| {
            run(&format!(
                "account-id={UUID}&auth-orig-transport-protocol-id={v}"
            ))
        };
        assert_eq!(
            proto("-128"),
            Ok((25, vec![Filter::AuthOrigTransportProtocolId(-128)]))
        );
        assert!(proto("128").is_err());
    }

    #[test]
    fn connect_time_null_truth_table() {
        for (value, is_null) in [
            ("", false),
            ("0", false),
            ("f", false),
            ("F", false),
            ("false", false),
            ("FALSE", false),
            ("off", false),
            ("OFF", false),
            ("False", true),
            ("yes", true),
            ("abc", true),
            ("1", true),
            ("true", true),
        ] {
            let q = format!("account-id={UUID}&connect-time-null={value}");
            assert_eq!(
                run(&q),
                Ok((25, vec![Filter::ConnectTimeNull(is_null)])),
                "{value}"
            );
        }
    }

    #[test]
    fn text_filters_decode_to_bytes() {
        let q = format!(
            "account-id={UUID}&src-name-in-eq=a+b%25_&dst-prefix-routing-ends-with=%FF&src-prefix-in-contains="
        );
        assert_eq!(
            run(&q),
            Ok((
                25,
                vec![
                    text(TextColumn::SrcNameIn, TextMatch::Equals, b"a b%_"),
                    text(TextColumn::DstPrefixRouting, TextMatch::EndsWith, b"\xff"),
                    text(TextColumn::SrcPrefixIn, TextMatch::Contains, b""),
                ]
            ))
        );
        // Encoded names are names too; unknown names are ignored, bracketed or not.
        let q = format!("account%2Did={UUID}&foo[]=1&bar=2&src-name-in-starts-with%5B=x");
        assert_eq!(run(&q), Ok((25, vec![])));
    }

    #[test]
    fn all_twenty_text_filters_are_known() {
        for column in TextColumn::ALL {
            for how in TextMatch::ALL {
                assert!(params().any(|(_, p)| p == Param::Text(column, how)));
            }
        }
        let names: std::collections::BTreeSet<_> = names().collect();
        assert_eq!(names.len(), 25, "{names:?}");
        assert!(names.contains("src-name-in-eq"));
        assert!(names.contains("src-prefix-routing-ends-with"));
        assert!(names.contains("dst-prefix-in-contains"));
        assert_eq!(
            known(b"dst-prefix-routing-starts-with").map(|k| k.0),
            Some("dst-prefix-routing-starts-with")
        );
        assert!(known(b"src-name-in").is_none());
    }
}
