//! One line of a snapshot: `feed::parse_line`, `feed::line_key` and `feed::strip_insert`
//! on the same bytes (a line of a JSONEachRow body, or its first line with the query).
//!
//! Checked beyond "never panics": a parsed row owns the same values as the borrowed one;
//! a line key's timestamp is a real date-time; the key ignores surrounding whitespace; a
//! stripped INSERT query leaves a suffix of the input.

#![no_main]

use active_calls_agent::clock;
use active_calls_agent::feed::{self, Line};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    let parsed = feed::parse_line(line);
    match &parsed {
        Ok(Line::Row(row)) => {
            let owned = (**row).clone().into_owned();
            assert_eq!(&owned, &**row);
            assert!(!row.local_tag.is_empty(), "a row always has its call's tag");
            if let Some(t) = &row.snapshot_timestamp {
                assert!(clock::is_datetime(t), "snapshot_timestamp {t:?}");
            }
        }
        Ok(Line::Nothing) => assert!(line.trim_ascii().is_empty()),
        Ok(Line::Skipped { .. }) | Err(_) => {}
    }

    let key = feed::line_key(line);
    if let Some(key) = key {
        if let Some(t) = key.snapshot_timestamp {
            assert!(clock::is_datetime(t), "line key timestamp {t:?}");
        }
        // A key exists only for an object; the line around it does not matter.
        let mut padded = b" \t".to_vec();
        padded.extend_from_slice(line);
        padded.extend_from_slice(b"\r\n");
        assert_eq!(feed::line_key(&padded), Some(key));
        assert!(!matches!(parsed, Ok(Line::Nothing)));
    }

    if let Some((table, rest)) = feed::strip_insert(line) {
        assert!(!table.is_empty());
        assert!(
            line.ends_with(rest),
            "the data after the query is the input's tail"
        );
        // The data after the query parses like any line.
        let _ = feed::parse_line(rest);
        let _ = feed::line_key(rest);
    }
});
