//! The directory: accounts, API accesses, customers and portal access profiles (SPEC 3).
//!
//! It is a JSON file exported from the central database, so the agent never talks to
//! PostgreSQL. It is small and read on every request, so it lives in memory as lookup
//! maps, behind a [`SwapCell`] that a reload replaces whole: a request sees the old
//! directory or the new one, and a bad file never replaces a good one.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::{Context, bail};
use serde::Deserialize;

/// An account as the endpoint needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub id: i64,
    pub contractor_id: i64,
}

/// A static API access: the `sub` of a customer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiAccess {
    pub customer_id: i64,
    pub account_ids: Vec<i64>,
}

/// The loaded directory, indexed for the lookups a request makes.
#[derive(Debug, Default)]
pub struct Directory {
    accounts_by_uuid: HashMap<u128, Account>,
    api_accesses: HashMap<i64, ApiAccess>,
    customers: HashSet<i64>,
    /// `None`: the file has no profile list, so any profile id is accepted.
    portal_profiles: Option<HashSet<i64>>,
}

/// The file's top level. `accounts` and `api_accesses` are required: a file without them
/// (wrapped in another object, camelCase keys, `{}`) would parse as a directory of nobody
/// and turn every customer away, so it is refused like invalid JSON. The other keys are
/// kept by name only, to say what the file has instead.
#[derive(Deserialize)]
struct DirectoryFile {
    accounts: Option<Vec<AccountRecord>>,
    api_accesses: Option<Vec<ApiAccessRecord>>,
    customers: Option<Vec<IdRecord>>,
    customer_portal_access_profiles: Option<Vec<IdRecord>>,
    #[serde(flatten)]
    other: std::collections::BTreeMap<String, serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct AccountRecord {
    id: i64,
    uuid: String,
    contractor_id: i64,
}

#[derive(Deserialize)]
struct ApiAccessRecord {
    id: i64,
    customer_id: i64,
    #[serde(default)]
    account_ids: Option<Vec<i64>>,
}

#[derive(Deserialize)]
struct IdRecord {
    id: i64,
}

impl Directory {
    /// Reads and validates a directory file; any error rejects the whole file.
    pub fn load(path: &Path) -> anyhow::Result<Directory> {
        let text =
            std::fs::read(path).with_context(|| format!("reading directory {}", path.display()))?;
        Directory::parse(&text).with_context(|| format!("in directory {}", path.display()))
    }

    /// Parses the JSON text of a directory file.
    pub fn parse(text: &[u8]) -> anyhow::Result<Directory> {
        let file: DirectoryFile = serde_json::from_slice(text)?;
        let missing: Vec<&str> = [
            ("\"accounts\"", file.accounts.is_none()),
            ("\"api_accesses\"", file.api_accesses.is_none()),
        ]
        .into_iter()
        .filter_map(|(key, gone)| gone.then_some(key))
        .collect();
        let (Some(accounts), Some(api_accesses)) = (file.accounts, file.api_accesses) else {
            let found: Vec<String> = file.other.keys().map(|k| format!("{k:?}")).collect();
            bail!(
                "no {} list at the top level (the file has {}): a directory needs both \
                 \"accounts\" and \"api_accesses\" arrays, even empty ones",
                missing.join(" and no "),
                if found.is_empty() {
                    "no other key".to_string()
                } else {
                    found.join(", ")
                }
            );
        };
        let mut directory = Directory::default();
        for account in accounts {
            let Some(uuid) = parse_uuid(account.uuid.as_bytes()) else {
                bail!(
                    "account {}: uuid {:?} is not a uuid",
                    account.id,
                    account.uuid
                );
            };
            let record = Account {
                id: account.id,
                contractor_id: account.contractor_id,
            };
            if directory.accounts_by_uuid.insert(uuid, record).is_some() {
                bail!("account uuid {} is listed twice", account.uuid);
            }
        }
        for access in api_accesses {
            let record = ApiAccess {
                customer_id: access.customer_id,
                account_ids: access.account_ids.unwrap_or_default(),
            };
            if directory.api_accesses.insert(access.id, record).is_some() {
                bail!("api access {} is listed twice", access.id);
            }
        }
        directory.customers = match file.customers {
            Some(list) => list.into_iter().map(|c| c.id).collect(),
            None => {
                let contractors = directory.accounts_by_uuid.values().map(|a| a.contractor_id);
                let owners = directory.api_accesses.values().map(|a| a.customer_id);
                contractors.chain(owners).collect()
            }
        };
        directory.portal_profiles = file
            .customer_portal_access_profiles
            .map(|list| list.into_iter().map(|p| p.id).collect());
        Ok(directory)
    }

    /// The account with this uuid (any case), if the directory has it.
    pub fn account_by_uuid(&self, uuid: &[u8]) -> Option<Account> {
        self.accounts_by_uuid.get(&parse_uuid(uuid)?).copied()
    }

    pub fn api_access(&self, id: i64) -> Option<&ApiAccess> {
        self.api_accesses.get(&id)
    }

    pub fn has_customer(&self, id: i64) -> bool {
        self.customers.contains(&id)
    }

    pub fn has_portal_profile(&self, id: i64) -> bool {
        self.portal_profiles
            .as_ref()
            .is_none_or(|p| p.contains(&id))
    }

    /// How many accounts it holds (for the reload log line).
    pub fn account_count(&self) -> usize {
        self.accounts_by_uuid.len()
    }

    pub fn api_access_count(&self) -> usize {
        self.api_accesses.len()
    }

    /// Whether taking this directory in place of `running` would drop every account
    /// `running` has: an export gone wrong as often as an intent, so it is said aloud.
    pub fn drops_every_account_of(&self, running: &Directory) -> bool {
        !running.accounts_by_uuid.is_empty()
            && running
                .accounts_by_uuid
                .keys()
                .all(|uuid| !self.accounts_by_uuid.contains_key(uuid))
    }
}

/// Parses the canonical 8-4-4-4-12 hex form, any case; nothing else is a uuid here
/// (no braces, no urn prefix, no simple form), as SPEC 1.2 says.
pub fn parse_uuid(text: &[u8]) -> Option<u128> {
    if text.len() != 36 {
        return None;
    }
    let mut value: u128 = 0;
    for (i, &byte) in text.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if byte != b'-' {
                return None;
            }
            continue;
        }
        let digit = (byte as char).to_digit(16)?;
        value = (value << 4) | u128::from(digit);
    }
    Some(value)
}

/// A value replaced whole while readers keep using the version they took.
#[derive(Debug, Default)]
pub struct SwapCell<T>(RwLock<Arc<T>>);

impl<T> SwapCell<T> {
    pub fn new(value: T) -> Self {
        SwapCell(RwLock::new(Arc::new(value)))
    }

    pub fn load(&self) -> Arc<T> {
        // A poisoned lock only means a writer panicked between two whole values.
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn store(&self, value: T) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
      "accounts": [{"id": 25, "uuid": "06b61b60-e7d9-11f0-932e-0a63caf27539", "contractor_id": 5, "name": "x"}],
      "api_accesses": [{"id": 40, "customer_id": 5, "account_ids": []}],
      "extra": true
    }"#;

    #[test]
    fn lookups_ignore_uuid_case_and_unknown_keys() {
        let dir = Directory::parse(SAMPLE.as_bytes()).unwrap();
        let account = dir
            .account_by_uuid(b"06B61B60-E7D9-11F0-932E-0A63CAF27539")
            .unwrap();
        assert_eq!(
            account,
            Account {
                id: 25,
                contractor_id: 5
            }
        );
        assert_eq!(dir.api_access(40).unwrap().customer_id, 5);
        assert!(dir.api_access(41).is_none());
    }

    #[test]
    fn customers_default_to_those_named_and_profiles_to_any() {
        let dir = Directory::parse(SAMPLE.as_bytes()).unwrap();
        assert!(dir.has_customer(5));
        assert!(!dir.has_customer(6));
        assert!(dir.has_portal_profile(12345));
    }

    #[test]
    fn explicit_lists_bind() {
        let text = r#"{"accounts": [], "api_accesses": [{"id": 1, "customer_id": 7}],
            "customers": [{"id": 8}], "customer_portal_access_profiles": [{"id": 1}]}"#;
        let dir = Directory::parse(text.as_bytes()).unwrap();
        assert!(!dir.has_customer(7));
        assert!(dir.has_customer(8));
        assert!(dir.has_portal_profile(1));
        assert!(!dir.has_portal_profile(2));
        assert_eq!(dir.api_access(1).unwrap().account_ids, Vec::<i64>::new());
    }

    #[test]
    fn bad_files_are_rejected_whole() {
        for bad in [
            "not json",
            r#"{"accounts": [{"id": 1, "uuid": "nope", "contractor_id": 1}]}"#,
            r#"{"accounts": [{"id": "1", "uuid": "06b61b60-e7d9-11f0-932e-0a63caf27539", "contractor_id": 1}]}"#,
            r#"{"accounts": [], "api_accesses": [{"id": 1, "customer_id": 1}, {"id": 1, "customer_id": 2}]}"#,
            r#"{"accounts": {}, "api_accesses": []}"#,
        ] {
            assert!(Directory::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_file_without_both_lists_is_refused_naming_what_it_has() {
        let wrapped = format!(r#"{{"directory": {SAMPLE}}}"#);
        for (text, says) in [
            (
                wrapped.as_str(),
                r#"no "accounts" and no "api_accesses" list at the top level (the file has "directory")"#,
            ),
            (
                r#"{"Accounts": [], "apiAccesses": []}"#,
                r#"(the file has "Accounts", "apiAccesses")"#,
            ),
            ("{}", "(the file has no other key)"),
            (
                r#"{"accounts": null, "api_accesses": []}"#,
                r#"no "accounts" list"#,
            ),
            (r#"{"accounts": []}"#, r#"no "api_accesses" list"#),
        ] {
            let error = format!("{:#}", Directory::parse(text.as_bytes()).unwrap_err());
            assert!(error.contains(says), "{text}: {error}");
        }
        let empty = Directory::parse(br#"{"accounts": [], "api_accesses": []}"#).unwrap();
        assert_eq!(empty.account_count(), 0);
    }

    #[test]
    fn dropping_every_running_account_is_noticed() {
        let running = Directory::parse(SAMPLE.as_bytes()).unwrap();
        let other = r#"{"accounts": [{"id": 26, "uuid": "16b61b60-e7d9-11f0-932e-0a63caf27539", "contractor_id": 5}], "api_accesses": []}"#;
        let other = Directory::parse(other.as_bytes()).unwrap();
        let empty = Directory::default();
        assert!(other.drops_every_account_of(&running));
        assert!(empty.drops_every_account_of(&running));
        assert!(!running.drops_every_account_of(&running));
        assert!(!running.drops_every_account_of(&empty));
    }

    #[test]
    fn only_the_canonical_uuid_form_parses() {
        assert!(parse_uuid(b"06b61b60-e7d9-11f0-932e-0a63caf27539").is_some());
        assert!(parse_uuid(b"06b61b60e7d911f0932e0a63caf27539").is_none());
        assert!(parse_uuid(b"{06b61b60-e7d9-11f0-932e-0a63caf2753}").is_none());
        assert!(parse_uuid(b"06b61b60-e7d9-11f0-932e-0a63caf2753g").is_none());
        assert!(parse_uuid(b"+6b61b60-e7d9-11f0-932e-0a63caf27539").is_none());
    }
}
