//! The filter language of the customer query (SPEC 1.2) and the SQL it becomes: the
//! columns and matches a request may name, the query and listing they make, and the one
//! place ([`add_filters`]) where a filter becomes a condition with its value bound.
//!
//! Kept apart from the reads so that adding a filter is one file: a variant here, its
//! condition in `add_filters`, and its parameter in `api::params`. Each string filter is
//! an index range within the account (SPEC 5), so every query stays a range scan.

use rusqlite::ToSql;
use rusqlite::types::{ToSqlOutput, ValueRef};

/// What a customer query reads: one account of one customer, of the nodes not stale at
/// the third value bound. Its filters follow ([`add_filters`]).
macro_rules! customer_calls_from {
    () => {
        " FROM calls AS c CROSS JOIN nodes AS n ON n.node_id = c.node_id
  WHERE c.customer_acc_id = ? AND c.customer_id = ? AND n.expires_at_ms > ?"
    };
}

/// The five string columns a customer can filter on (SPEC 1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextColumn {
    SrcNameIn,
    SrcPrefixIn,
    DstPrefixIn,
    SrcPrefixRouting,
    DstPrefixRouting,
}

impl TextColumn {
    pub const ALL: [TextColumn; 5] = [
        TextColumn::SrcNameIn,
        TextColumn::SrcPrefixIn,
        TextColumn::DstPrefixIn,
        TextColumn::SrcPrefixRouting,
        TextColumn::DstPrefixRouting,
    ];

    /// The column's name in `schema.sql` (its reversed twin adds `_rev`).
    pub fn name(self) -> &'static str {
        match self {
            TextColumn::SrcNameIn => "src_name_in",
            TextColumn::SrcPrefixIn => "src_prefix_in",
            TextColumn::DstPrefixIn => "dst_prefix_in",
            TextColumn::SrcPrefixRouting => "src_prefix_routing",
            TextColumn::DstPrefixRouting => "dst_prefix_routing",
        }
    }
}

/// How a string filter matches its needle (always bytes, never patterns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextMatch {
    Equals,
    StartsWith,
    EndsWith,
    /// ASCII-case-insensitive substring.
    Contains,
}

impl TextMatch {
    pub const ALL: [TextMatch; 4] = [
        TextMatch::Equals,
        TextMatch::StartsWith,
        TextMatch::EndsWith,
        TextMatch::Contains,
    ];
}

/// One condition of a customer query; all are ANDed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    Text {
        column: TextColumn,
        how: TextMatch,
        needle: Vec<u8>,
    },
    AuthOrigIp(Vec<u8>),
    AuthOrigPort(i32),
    AuthOrigTransportProtocolId(i8),
    /// `true`: only calls not yet connected.
    ConnectTimeNull(bool),
}

/// A customer's query: one account of one customer, and its filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallQuery {
    pub customer_id: i64,
    pub account_id: i64,
    pub filters: Vec<Filter>,
    /// The instant (unix ms) the answer is for: calls of nodes expired by then are stale.
    pub now_ms: i64,
}

const SELECT_CALLS: &str = concat!("SELECT ", answer_columns!(), customer_calls_from!());
pub(super) const ORDER_CALLS: &str = " ORDER BY c.start_time DESC, c.local_tag, c.node_id";

/// Which calls a local listing (`active-calls-agent calls`) shows: every node, customer
/// and account unless one is given, and a customer query's filters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallListing {
    pub node_id: Option<i64>,
    pub customer_id: Option<i64>,
    pub account_id: Option<i64>,
    pub filters: Vec<Filter>,
    /// As in [`CallQuery`]; `i64::MIN` shows stale nodes' calls too.
    pub now_ms: i64,
}

/// What a listing's counts are per.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountBy {
    Node,
    Customer,
    Account,
}

impl CountBy {
    /// The identity column counted per, as a scrape row names it.
    pub fn column(self) -> &'static str {
        match self {
            CountBy::Node => "node_id",
            CountBy::Customer => "customer_id",
            CountBy::Account => "customer_acc_id",
        }
    }

    fn select(self) -> &'static str {
        match self {
            CountBy::Node => COUNT_BY_NODE,
            CountBy::Customer => COUNT_BY_CUSTOMER,
            CountBy::Account => COUNT_BY_ACCOUNT,
        }
    }
}

/// What a listing reads: every call of a node not stale at ?1; [`build_listing`] adds
/// its conditions, and [`ORDER_CALLS`] or its grouping.
macro_rules! listed_from {
    () => {
        " FROM calls AS c CROSS JOIN nodes AS n ON n.node_id = c.node_id
  WHERE n.expires_at_ms > ?"
    };
}
/// A listing's calls: a scrape's row (identity columns, then [`answer_columns`]).
const LISTED_CALLS: &str = concat!(
    "SELECT c.node_id, c.local_tag, c.customer_id, c.customer_acc_id, ",
    answer_columns!(),
    listed_from!()
);
/// A listing's counts, per identity column.
const COUNT_BY_NODE: &str = concat!("SELECT c.node_id, count(*)", listed_from!());
const COUNT_BY_CUSTOMER: &str = concat!("SELECT c.customer_id, count(*)", listed_from!());
const COUNT_BY_ACCOUNT: &str = concat!("SELECT c.customer_acc_id, count(*)", listed_from!());

/// A value bound to a statement: bytes as TEXT (which may be invalid UTF-8, as a
/// `%FF` in a query string is) or as BLOB, or an integer.
pub(super) enum Bound {
    Int(i64),
    Text(Vec<u8>),
    Blob(Vec<u8>),
}

impl ToSql for Bound {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Bound::Int(i) => ValueRef::Integer(*i),
            Bound::Text(t) => ValueRef::Text(t),
            Bound::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

/// Bytes bound as a BLOB (the reversed columns, which need not be UTF-8).
pub(super) struct Blob(pub Vec<u8>);

impl ToSql for Blob {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(ValueRef::Blob(&self.0)))
    }
}

/// The smallest byte string greater than every string that starts with `prefix`, or `None`
/// when there is none (the prefix is empty or all `0xFF`).
fn prefix_upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut upper = prefix.to_vec();
    while let Some(last) = upper.pop() {
        if last < 0xFF {
            upper.push(last + 1);
            return Some(upper);
        }
    }
    None
}

/// The SQL text and bound values of a query.
pub(super) fn build(query: &CallQuery) -> (String, Vec<Bound>) {
    let (mut sql, values) = build_from(SELECT_CALLS, query);
    sql += ORDER_CALLS;
    (sql, values)
}

/// `select` (which ends with [`customer_calls_from`]) with the conditions of `query`, not
/// yet ordered: the one place a customer's filters become SQL, for answers and streams.
pub(super) fn build_from(select: &str, query: &CallQuery) -> (String, Vec<Bound>) {
    let mut sql = String::from(select);
    let mut values = vec![
        Bound::Int(query.account_id),
        Bound::Int(query.customer_id),
        Bound::Int(query.now_ms),
    ];
    add_filters(&query.filters, &mut sql, &mut values);
    (sql, values)
}

/// The statement of a [`CallListing`]: [`LISTED_CALLS`] (or its counts, with `by`) with
/// the same conditions, in the same words, as a customer query's.
pub(super) fn build_listing(listing: &CallListing, by: Option<CountBy>) -> (String, Vec<Bound>) {
    let mut sql = String::from(match by {
        None => LISTED_CALLS,
        Some(by) => by.select(),
    });
    let mut values = vec![Bound::Int(listing.now_ms)];
    for (condition, value) in [
        (" AND c.node_id = ?", listing.node_id),
        (" AND c.customer_id = ?", listing.customer_id),
        (" AND c.customer_acc_id = ?", listing.account_id),
    ] {
        if let Some(value) = value {
            sql += condition;
            values.push(Bound::Int(value));
        }
    }
    add_filters(&listing.filters, &mut sql, &mut values);
    sql += match by {
        None => ORDER_CALLS,
        // The busiest first.
        Some(_) => " GROUP BY 1 ORDER BY 2 DESC, 1",
    };
    (sql, values)
}

/// Appends the conditions of `filters` (SPEC 1.2), each value bound.
fn add_filters(filters: &[Filter], sql: &mut String, values: &mut Vec<Bound>) {
    for filter in filters {
        match filter {
            Filter::Text {
                column,
                how,
                needle,
            } => {
                let name = column.name();
                match how {
                    TextMatch::Equals => {
                        *sql += &format!(" AND c.{name} = ?");
                        values.push(Bound::Text(needle.clone()));
                    }
                    TextMatch::StartsWith => {
                        *sql += &format!(" AND c.{name} >= ?");
                        values.push(Bound::Text(needle.clone()));
                        if let Some(upper) = prefix_upper_bound(needle) {
                            *sql += &format!(" AND c.{name} < ?");
                            values.push(Bound::Text(upper));
                        }
                    }
                    TextMatch::EndsWith => {
                        let reversed: Vec<u8> = needle.iter().rev().copied().collect();
                        *sql += &format!(" AND c.{name}_rev >= ?");
                        if let Some(upper) = prefix_upper_bound(&reversed) {
                            *sql += &format!(" AND c.{name}_rev < ?");
                            values.push(Bound::Blob(reversed));
                            values.push(Bound::Blob(upper));
                        } else {
                            values.push(Bound::Blob(reversed));
                        }
                    }
                    TextMatch::Contains => {
                        // SQLite's own lower() folds ASCII only, exactly the rule wanted;
                        // as BLOBs, instr() compares bytes, not characters.
                        *sql += &format!(" AND instr(CAST(lower(c.{name}) AS BLOB), ?) > 0");
                        values.push(Bound::Blob(needle.to_ascii_lowercase()));
                    }
                }
            }
            Filter::AuthOrigIp(ip) => {
                *sql += " AND c.auth_orig_ip = ?";
                values.push(Bound::Text(ip.clone()));
            }
            Filter::AuthOrigPort(port) => {
                *sql += " AND c.auth_orig_port = ?";
                values.push(Bound::Int(i64::from(*port)));
            }
            Filter::AuthOrigTransportProtocolId(id) => {
                *sql += " AND c.auth_orig_transport_protocol_id = ?";
                values.push(Bound::Int(i64::from(*id)));
            }
            Filter::ConnectTimeNull(true) => *sql += " AND c.connect_time IS NULL",
            Filter::ConnectTimeNull(false) => *sql += " AND c.connect_time IS NOT NULL",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upper_bounds_cover_exactly_the_prefix() {
        assert_eq!(prefix_upper_bound(b"abc"), Some(b"abd".to_vec()));
        assert_eq!(prefix_upper_bound(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_upper_bound(b"\xff\xff"), None);
        assert_eq!(prefix_upper_bound(b""), None);
    }
}
