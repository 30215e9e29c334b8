//! The snapshot file as a source (SPEC 2.2, 2.3): when a file read counts as received,
//! and what the log says of a file whose modification time would hide or show its calls
//! unexpectedly.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::{ApplyReport, Arrivals, InsertLine, SnapshotError, Tee, apply_snapshot_teed};
use crate::store::{Origin, Writer};

/// How a snapshot file came to be read, which says when it counts as received (SPEC 2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRead {
    /// At start: it was received when it was written (its modification time; one in the
    /// future counts as now), so a restart does not make old calls fresh again.
    AtStart,
    /// Because it just changed: received now, whatever time the writer gave it.
    Changed,
}

/// Applies the snapshot file at `path`, copying its rows into `tee` and applying
/// `arrivals` with it.
pub fn apply_file(
    writer: &mut Writer,
    path: &Path,
    read: FileRead,
    tee: Option<&mut dyn Tee>,
    arrivals: Option<&mut Arrivals<'_>>,
) -> Result<ApplyReport, SnapshotError> {
    let file = File::open(path)?;
    let now = SystemTime::now();
    let modified = file.metadata()?.modified()?;
    let received_at = match read {
        FileRead::AtStart => modified.min(now),
        FileRead::Changed => now,
    };
    let report = apply_snapshot_teed(
        writer,
        BufReader::with_capacity(256 * 1024, file),
        InsertLine::Optional,
        Origin::File,
        received_at,
        tee,
        arrivals,
    )?;
    say_file_time(writer, path, read, modified, now, &report);
    Ok(report)
}

/// Says in the log when a snapshot file's modification time is in the future, or older
/// than its nodes may stay silent, and what that made of its calls (SPEC 2.2): a file
/// copied with its time kept (`cp -p`, `rsync -t`) would otherwise vanish unexplained.
fn say_file_time(
    writer: &Writer,
    path: &Path,
    read: FileRead,
    modified: SystemTime,
    now: SystemTime,
    report: &ApplyReport,
) {
    let path = path.display();
    if let Ok(ahead) = modified.duration_since(now)
        && ahead > Duration::from_secs(1)
    {
        tracing::warn!(%path, ahead_s = ahead.as_secs(), "the snapshot file's modification time is in the future (is the clock right?); it counts as received now");
        return;
    }
    let age_s = now.duration_since(modified).unwrap_or_default().as_secs();
    match read {
        FileRead::AtStart => {
            let now_ms = crate::clock::unix_millis(now);
            let expired: Vec<i64> = (report.nodes.iter().copied())
                .filter(|&node| writer.expired_by(node, now_ms).unwrap_or(false))
                .collect();
            if !expired.is_empty() {
                tracing::warn!(%path, age_s, nodes = ?expired, "the snapshot file read at start was last written longer ago than these nodes may stay silent (stale_after): it counts as received then, so their calls are not shown until their next snapshot or call event");
            }
        }
        FileRead::Changed => {
            let limit_ms = (report.nodes.iter())
                .filter_map(|&node| writer.silence_limit_ms(node).ok())
                .min();
            if let Some(limit_ms) = limit_ms
                && age_s.saturating_mul(1000) > limit_ms as u64
            {
                tracing::info!(%path, age_s, limit_s = limit_ms / 1000, nodes = ?report.nodes, "the snapshot file's modification time is older than its nodes may stay silent (copied with its time kept?); it just changed, so it counts as received now and its calls are shown");
            }
        }
    }
}
