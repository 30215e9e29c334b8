//! Reading the store for live streams (SPEC 7): the rows a stream selects, each with the
//! identity its opaque `call` id is made from, within the part of the store a change
//! touched.
//!
//! A stream selects exactly what the endpoint would answer: a customer's stream is built
//! by the same [`build_from`] as the customer query (the one place filters become SQL), the
//! node's by the scrape's conditions. A change names where it happened (a node, a call);
//! the stream reads only there, so an event costs a stream one index lookup, not its
//! whole answer. Every part of one change is read in one transaction: one state of the
//! store, committed before the change was published.

use rusqlite::Connection;

use super::answer::{ROW_KEYS, write_row, write_scrape_row_open};
use super::query::{Bound, CallQuery, ORDER_CALLS, build_from};
use super::read::Readers;

/// A customer's rows, then the identity of each.
const STREAM_CUSTOMER_CALLS: &str = concat!(
    "SELECT ",
    answer_columns!(),
    ", c.node_id, c.local_tag",
    customer_calls_from!()
);
/// Every current call of the node, as the scrape shows it.
const STREAM_NODE_CALLS: &str = concat!(
    "SELECT c.node_id, c.local_tag, c.customer_id, c.customer_acc_id, ",
    answer_columns!(),
    " FROM nodes AS n CROSS JOIN calls AS c ON c.node_id = n.node_id
  WHERE n.expires_at_ms > ?"
);
const ORDER_NODE_CALLS: &str = " ORDER BY n.node_id, c.local_tag";
/// The key the opaque call ids are made with (see `schema.sql`).
const STREAM_KEY: &str = "SELECT key FROM stream_key";

/// What a stream shows: a customer's answer, or the node's scrape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// A customer query (its `now_ms` is replaced by each read's).
    Customer(CallQuery),
    Node,
}

/// Where, among what a stream selects, a read looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Within<'a> {
    Everything,
    Node(i64),
    Call(i64, &'a str),
}

/// One row a stream reads: its JSON object without the closing brace (the stream adds its
/// `call` first), the call's identity, and the store's key for call ids.
pub struct StreamRow<'a> {
    pub key: &'a [u8],
    pub node_id: i64,
    pub local_tag: &'a [u8],
    pub json: &'a [u8],
}

impl Readers {
    /// Reads, in one transaction at `now_ms`, the rows `selection` selects within each of
    /// `parts` (in the endpoint's order within each), handing each to `row`. Returns the
    /// store's call id key, read in that transaction.
    pub fn stream_rows(
        &self,
        selection: &Selection,
        now_ms: i64,
        parts: &[Within<'_>],
        mut row: impl FnMut(StreamRow<'_>),
    ) -> rusqlite::Result<Vec<u8>> {
        self.with_connection(|conn| {
            let tx = conn.unchecked_transaction()?;
            let key: Vec<u8> = tx.prepare_cached(STREAM_KEY)?.query_row([], |r| r.get(0))?;
            let mut out = Vec::with_capacity(2048);
            for part in parts {
                read_part(&tx, selection, now_ms, *part, &key, &mut out, &mut row)?;
            }
            Ok(key)
        })
    }
}

/// The rows of one part.
fn read_part(
    conn: &Connection,
    selection: &Selection,
    now_ms: i64,
    part: Within<'_>,
    key: &[u8],
    out: &mut Vec<u8>,
    row: &mut impl FnMut(StreamRow<'_>),
) -> rusqlite::Result<()> {
    let (mut sql, mut values, order) = match selection {
        Selection::Customer(query) => {
            let query = CallQuery {
                now_ms,
                ..query.clone()
            };
            let (sql, values) = build_from(STREAM_CUSTOMER_CALLS, &query);
            (sql, values, ORDER_CALLS)
        }
        Selection::Node => (
            String::from(STREAM_NODE_CALLS),
            vec![Bound::Int(now_ms)],
            ORDER_NODE_CALLS,
        ),
    };
    match part {
        Within::Everything => {}
        Within::Node(node) => {
            sql += " AND c.node_id = ?";
            values.push(Bound::Int(node));
        }
        Within::Call(node, tag) => {
            sql += " AND c.node_id = ? AND c.local_tag = ?";
            values.push(Bound::Int(node));
            values.push(Bound::Text(tag.as_bytes().to_vec()));
        }
    }
    sql += order;
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(values.iter()))?;
    while let Some(r) = rows.next()? {
        out.clear();
        let (node_id, local_tag) = match selection {
            Selection::Customer(_) => {
                write_row(out, r, &ROW_KEYS, 0)?;
                (r.get(ROW_KEYS.len())?, r.get_ref(ROW_KEYS.len() + 1)?)
            }
            Selection::Node => {
                write_scrape_row_open(out, r)?;
                (r.get(0)?, r.get_ref(1)?)
            }
        };
        row(StreamRow {
            key,
            node_id,
            local_tag: local_tag.as_bytes()?,
            json: out,
        });
    }
    Ok(())
}
