//! A call's row as the store writes it: the values `INSERT_CALL` and `UPDATE_CALL_VALUES`
//! (in `write`) bind, and the two hashes that tell the writer whether a row (or only its
//! indexed values) changed since it was stored. Snapshots and call events write
//! a row through here alike, so a call is stored the same whoever wrote it.

use rusqlite::params;

use super::query::Blob;
use crate::call::CallRow;

/// What a call's row is written with, by `INSERT_CALL` and `UPDATE_CALL_VALUES` alike.
pub(super) struct CallValues<'r, 'a> {
    row: &'r CallRow<'a>,
    own_timestamp: Option<&'r str>,
    pub(super) row_hash: i64,
    pub(super) key_hash: i64,
    line_key: Option<i64>,
    /// `calls.event_ms`: `None` for a snapshot's row.
    event_ms: Option<i64>,
}

impl CallValues<'_, '_> {
    /// The values of `row` as it is stored, with its own `snapshot_timestamp` if it has one.
    pub(super) fn of<'r, 'a>(
        row: &'r CallRow<'a>,
        own_timestamp: Option<&'r str>,
        line_key: Option<i64>,
        event_ms: Option<i64>,
    ) -> CallValues<'r, 'a> {
        let (key_hash, row_hash) = row_hashes(row, own_timestamp);
        CallValues {
            row,
            own_timestamp,
            row_hash,
            key_hash,
            line_key,
            event_ms,
        }
    }

    pub(super) fn write(
        &self,
        tx: &rusqlite::Transaction<'_>,
        sql: &str,
        call_id: i64,
    ) -> rusqlite::Result<()> {
        let row = self.row;
        let rev = |s: &str| Blob(s.bytes().rev().collect());
        tx.prepare_cached(sql)?.execute(params![
            call_id,
            row.node_id,
            row.local_tag,
            row.customer_id,
            row.customer_acc_id,
            self.own_timestamp,
            row.start_time,
            row.connect_time,
            row.destination_prefix,
            row.destination_initial_interval,
            row.destination_initial_rate,
            row.destination_next_interval,
            row.destination_next_rate,
            row.destination_fee,
            row.src_name_in,
            row.src_prefix_in,
            row.dst_prefix_in,
            row.src_prefix_routing,
            row.dst_prefix_routing,
            row.from_domain,
            row.to_domain,
            row.ruri_domain,
            row.diversion_in,
            row.pai_in,
            row.ppi_in,
            row.privacy_in,
            row.rpid_in,
            row.rpid_privacy_in,
            row.auth_orig_transport_protocol_id,
            row.auth_orig_ip,
            row.auth_orig_port,
            rev(&row.src_name_in),
            rev(&row.src_prefix_in),
            rev(&row.dst_prefix_in),
            rev(&row.src_prefix_routing),
            rev(&row.dst_prefix_routing),
            self.row_hash,
            self.key_hash,
            self.line_key,
            self.event_ms,
        ])?;
        Ok(())
    }
}

/// FNV-1a over the stored values of a call: stable across runs and releases (unlike
/// std's hasher), so hashes stored by one run compare with the next run's. The first hash
/// covers the indexed values, the second everything.
fn row_hashes(row: &CallRow<'_>, own_timestamp: Option<&str>) -> (i64, i64) {
    let mut h = Fnv::default();
    h.int(row.customer_acc_id);
    for s in [
        &row.src_name_in,
        &row.src_prefix_in,
        &row.dst_prefix_in,
        &row.src_prefix_routing,
        &row.dst_prefix_routing,
    ] {
        h.str(s);
    }
    let key_hash = h.0 as i64;
    h.int(row.customer_id);
    h.opt(own_timestamp);
    h.str(&row.start_time);
    h.opt(row.connect_time.as_deref());
    h.str(&row.destination_prefix);
    h.int(row.destination_initial_interval);
    h.str(&row.destination_initial_rate);
    h.int(row.destination_next_interval);
    h.str(&row.destination_next_rate);
    h.str(&row.destination_fee);
    for s in [&row.from_domain, &row.to_domain, &row.ruri_domain] {
        h.str(s);
    }
    for s in [
        &row.diversion_in,
        &row.pai_in,
        &row.ppi_in,
        &row.privacy_in,
        &row.rpid_in,
        &row.rpid_privacy_in,
    ] {
        h.opt(s.as_deref());
    }
    h.int(row.auth_orig_transport_protocol_id);
    h.str(&row.auth_orig_ip);
    h.int(row.auth_orig_port);
    (key_hash, h.0 as i64)
}

struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    /// Length-prefixed, so ("ab","c") and ("a","bc") differ.
    fn str(&mut self, s: &str) {
        self.bytes(&(s.len() as u64).to_le_bytes());
        self.bytes(s.as_bytes());
    }
    fn opt(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                self.bytes(&[1]);
                self.str(s);
            }
            None => self.bytes(&[0]),
        }
    }
    fn int(&mut self, i: i64) {
        self.bytes(&i.to_le_bytes());
    }
}
