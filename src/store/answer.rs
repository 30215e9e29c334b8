//! How a row read from the store becomes JSON: the customer answer's 26 keys in SPEC 1.3's
//! order, the scrape's row (identity first), and strings escaped as the central API
//! (Rails) escapes them. Every reader writes rows through here, so an answer, a scrape, a
//! listing and a stream show a call with the same bytes.

use std::io::Write as _;

use rusqlite::types::ValueRef;

/// The 26 output columns of SPEC 1.3, in its order (`c`: calls, `n`: its node).
macro_rules! answer_columns {
    () => {
        "COALESCE(c.snapshot_timestamp, n.snapshot_timestamp), c.start_time,
    c.connect_time, c.destination_prefix, c.destination_initial_interval, c.destination_initial_rate,
    c.destination_next_interval, c.destination_next_rate, c.destination_fee,
    c.src_name_in, c.src_prefix_in, c.dst_prefix_in, c.src_prefix_routing, c.dst_prefix_routing,
    c.from_domain, c.to_domain, c.ruri_domain,
    c.diversion_in, c.pai_in, c.ppi_in, c.privacy_in, c.rpid_in, c.rpid_privacy_in,
    c.auth_orig_transport_protocol_id, c.auth_orig_ip, c.auth_orig_port"
    };
}

/// The JSON keys of the 26 answer columns (`answer_columns!`), each with what precedes it
/// in a row object.
pub(super) const ROW_KEYS: [&str; 26] = [
    "{\"snapshot_timestamp\":",
    ",\"start_time\":",
    ",\"connect_time\":",
    ",\"destination_prefix\":",
    ",\"destination_initial_interval\":",
    ",\"destination_initial_rate\":",
    ",\"destination_next_interval\":",
    ",\"destination_next_rate\":",
    ",\"destination_fee\":",
    ",\"src_name_in\":",
    ",\"src_prefix_in\":",
    ",\"dst_prefix_in\":",
    ",\"src_prefix_routing\":",
    ",\"dst_prefix_routing\":",
    ",\"from_domain\":",
    ",\"to_domain\":",
    ",\"ruri_domain\":",
    ",\"diversion_in\":",
    ",\"pai_in\":",
    ",\"ppi_in\":",
    ",\"privacy_in\":",
    ",\"rpid_in\":",
    ",\"rpid_privacy_in\":",
    ",\"auth_orig_transport_protocol_id\":",
    ",\"auth_orig_ip\":",
    ",\"auth_orig_port\":",
];

/// The JSON keys of the scrape's statement up to its first answer column; the rest of
/// [`ROW_KEYS`] follow.
const SCRAPE_KEYS: [&str; 5] = [
    "{\"node_id\":",
    ",\"local_tag\":",
    ",\"customer_id\":",
    ",\"customer_acc_id\":",
    ",\"snapshot_timestamp\":",
];

/// Writes a row of a scrape or a listing as a JSON object.
pub(super) fn write_scrape_row(out: &mut Vec<u8>, row: &rusqlite::Row<'_>) -> rusqlite::Result<()> {
    write_scrape_row_open(out, row)?;
    out.push(b'}');
    Ok(())
}

/// [`write_scrape_row`] without the closing brace, for a stream to add its `call`.
pub(super) fn write_scrape_row_open(
    out: &mut Vec<u8>,
    row: &rusqlite::Row<'_>,
) -> rusqlite::Result<()> {
    write_row(out, row, &SCRAPE_KEYS, 0)?;
    write_row(out, row, &ROW_KEYS[1..], SCRAPE_KEYS.len())
}

/// Writes columns `first..` of `row`, each after its key from `keys`.
pub(super) fn write_row(
    out: &mut Vec<u8>,
    row: &rusqlite::Row<'_>,
    keys: &[&str],
    first: usize,
) -> rusqlite::Result<()> {
    for (i, key) in keys.iter().enumerate() {
        out.extend_from_slice(key.as_bytes());
        write_json_value(out, row.get_ref(first + i)?);
    }
    Ok(())
}

fn write_json_value(out: &mut Vec<u8>, value: ValueRef<'_>) {
    match value {
        ValueRef::Null => out.extend_from_slice(b"null"),
        ValueRef::Integer(i) => {
            let _ = write!(out, "{i}");
        }
        ValueRef::Real(f) => {
            let _ = write!(out, "{f}");
        }
        ValueRef::Text(t) | ValueRef::Blob(t) => write_json_string(out, t),
    }
}

/// Writes a JSON string the way the central API (Rails) does: besides the mandatory
/// escapes, `<`, `>`, `&`, U+2028 and U+2029 are escaped as `\uXXXX`.
pub fn write_json_string(out: &mut Vec<u8>, text: &[u8]) {
    /// Bytes that may need an escape: the ASCII ones to escape, and 0xE2, which starts
    /// U+2028 and U+2029. Every other byte is copied as it is, in runs.
    fn special(b: u8) -> bool {
        b < 0x20 || matches!(b, b'"' | b'\\' | b'<' | b'>' | b'&' | 0xE2)
    }
    out.push(b'"');
    let mut copied = 0;
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        if !special(b) {
            i += 1;
            continue;
        }
        out.extend_from_slice(&text[copied..i]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0xE2 if text.get(i + 1) == Some(&0x80)
                && matches!(text.get(i + 2), Some(0xA8 | 0xA9)) =>
            {
                let last = if text[i + 2] == 0xA8 {
                    b"\\u2028"
                } else {
                    b"\\u2029"
                };
                out.extend_from_slice(last);
                i += 2;
            }
            0xE2 => out.push(b),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xF)]);
            }
        }
        i += 1;
        copied = i;
    }
    out.extend_from_slice(&text[copied..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_escape_like_rails() {
        let mut out = Vec::new();
        write_json_string(&mut out, "a\"b\\c\n<sip:1@x>&\u{1}\u{2028}Zoë".as_bytes());
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            r#""a\"b\\c\n\u003csip:1@x\u003e\u0026\u0001\u2028Zoë""#
        );
        let parsed: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed, "a\"b\\c\n<sip:1@x>&\u{1}\u{2028}Zoë");
    }
}
