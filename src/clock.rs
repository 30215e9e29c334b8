//! Time as the agent writes it: the UTC `YYYY-MM-DD hh:mm:ss` text the switch sends and
//! the API answers with, and unix milliseconds, the store's and the metrics' instants.
//!
//! The feed checks and converts times, the store stamps each snapshot, the API and the
//! metrics measure ages: all four need the same few functions, so they live in a
//! module below all of them, which imports none of them.

use std::time::{SystemTime, UNIX_EPOCH};

/// Checks the exact `YYYY-MM-DD hh:mm:ss` form and a real calendar date.
pub fn is_datetime(text: &str) -> bool {
    let b = text.as_bytes();
    if b.len() != 19 || b[10] != b' ' || b[13] != b':' || b[16] != b':' {
        return false;
    }
    let (Some(hour), Some(minute), Some(second)) =
        (number(&b[11..13]), number(&b[14..16]), number(&b[17..19]))
    else {
        return false;
    };
    is_date(&text[..10]) && hour < 24 && minute < 60 && second < 60
}

/// Checks the exact `YYYY-MM-DD` form of a real calendar date.
pub fn is_date(text: &str) -> bool {
    let b = text.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let (Some(year), Some(month), Some(day)) =
        (number(&b[0..4]), number(&b[5..7]), number(&b[8..10]))
    else {
        return false;
    };
    (1..=12).contains(&month) && day >= 1 && day <= days_in_month(year, month)
}

/// The value of a run of ASCII digits.
fn number(digits: &[u8]) -> Option<u32> {
    digits.iter().try_fold(0u32, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
    })
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Formats unix seconds as `YYYY-MM-DD hh:mm:ss` UTC (days to civil date after
/// H. Hinnant's public-domain algorithm).
pub fn format_datetime(unix_seconds: i64) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Milliseconds since the unix epoch.
pub fn unix_millis(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// The unix seconds now.
pub fn unix_now() -> i64 {
    unix_millis(SystemTime::now()).div_euclid(1000)
}

/// The unix seconds of a `YYYY-MM-DD hh:mm:ss` UTC text ([`is_datetime`] form), the inverse
/// of [`format_datetime`]: how a snapshot's date is compared with an event's instant.
pub fn parse_datetime(text: &str) -> Option<i64> {
    if !is_datetime(text) {
        return None;
    }
    let b = text.as_bytes();
    let field = |range: std::ops::Range<usize>| number(&b[range]).map(i64::from);
    let (year, month, day) = (field(0..4)?, field(5..7)?, field(8..10)?);
    let (hour, minute, second) = (field(11..13)?, field(14..16)?, field(17..19)?);
    // Days from civil (H. Hinnant), with March as the first month of a year.
    let year = year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let doy = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetimes_round_trip() {
        assert_eq!(format_datetime(0), "1970-01-01 00:00:00");
        assert_eq!(format_datetime(951_782_400), "2000-02-29 00:00:00");
        assert!(is_datetime("2024-02-29 23:59:59"));
        assert!(!is_datetime("2023-02-29 00:00:00"));
        assert!(!is_datetime("2023-01-01T00:00:00"));
        assert!(!is_datetime("2023-01-01 24:00:00"));
        assert!(is_date("2024-02-29") && !is_date("2023-02-29") && !is_date("2023-1-01"));
        assert!(!is_datetime("2023-01-01 00:00:0\u{e9}"));
        for seconds in [0, 951_782_400, 1_764_081_005, 4_102_444_799, -86_401] {
            assert_eq!(parse_datetime(&format_datetime(seconds)), Some(seconds));
        }
        assert_eq!(parse_datetime("2025-11-25 14:30:05"), Some(1_764_081_005));
        assert_eq!(parse_datetime("2025-02-30 00:00:00"), None);
    }
}
