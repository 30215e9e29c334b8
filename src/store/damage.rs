//! A store SQLite cannot read, and a store that cannot be written (issue 20).
//!
//! The store holds nothing the switch does not send again within a period, so a damaged
//! one is not worth an operator's night: it is moved aside (kept for a post-mortem, the
//! last [`KEEP_SET_ASIDE`] of them) and created anew, and the node is answered again from
//! the next snapshot. Until then it is not ready, and says why.
//!
//! Damage is whatever SQLite calls it (`SQLITE_CORRUPT`, `SQLITE_NOTADB`), found wherever
//! it shows: at start (opening, then `quick_check`), by the writer, or by a reader. Only
//! the writer replaces files: a reader reports what it saw with the *generation* of the
//! store its connection was opened on, so a report about a store already replaced
//! replaces nothing. [`StoreHealth`] is what the writer, the readers and `/readyz` share.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use rusqlite::{ErrorCode, OpenFlags};

use super::nodes::Periods;
use super::{Check, Writer, damage_of, open, with_suffix};

/// How many damaged stores are kept beside the live one.
pub const KEEP_SET_ASIDE: usize = 3;

/// Whether SQLite says the database cannot be read as one: its files are damaged, are
/// not a database, or do not belong together.
pub fn is_damage(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

/// [`is_damage`], for an error with context (the first SQLite error in its chain).
pub fn is_damage_in(error: &anyhow::Error) -> bool {
    error
        .chain()
        .find_map(|cause| cause.downcast_ref::<rusqlite::Error>())
        .is_some_and(is_damage)
}

/// What became of a damaged store.
#[derive(Debug, Clone)]
pub struct SetAside {
    /// Where the database file went (its `-wal` and `-shm` beside it, same name).
    pub to: PathBuf,
    /// SQLite's words.
    pub why: String,
}

/// Moves `path` and its `-wal` and `-shm` to `<name>.corrupt-<UTC time>` (the same
/// suffixes after it, so the set still opens as a database), and removes all but the
/// newest [`KEEP_SET_ASIDE`] such sets. No connection may be open on it in this process
/// but read-only ones (a read-only connection never deletes the WAL as it closes).
pub fn set_aside(path: &Path, why: String) -> std::io::Result<SetAside> {
    let stamp = chrono_stamp(std::time::SystemTime::now());
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Two in one second: a counter after the time, above any that second has (one pruned
    // must not have its name taken by a newer one, which would then sort first).
    let base = format!("{name}.corrupt-{stamp}");
    let taken = sets_aside(path, &name)
        .iter()
        .filter_map(|set| match set.strip_prefix(&base)? {
            "" => Some(1),
            counter => counter.strip_prefix('.')?.parse::<u32>().ok(),
        })
        .max();
    let to = path.with_file_name(match taken {
        None => base,
        Some(n) => format!("{base}.{:03}", n + 1),
    });
    for suffix in ["", "-wal", "-shm"] {
        let from = with_suffix(path, suffix);
        match std::fs::rename(&from, with_suffix(&to, suffix)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    prune(path, &name);
    Ok(SetAside { to, why })
}

/// The names of the sets of `<name>.corrupt-*` beside `path`, oldest first (their names
/// sort by time).
fn sets_aside(path: &Path, name: &str) -> Vec<String> {
    let prefix = format!("{name}.corrupt-");
    let Ok(entries) = std::fs::read_dir(folder_of(path)) else {
        return Vec::new();
    };
    let mut sets: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.starts_with(&prefix) && !f.ends_with("-wal") && !f.ends_with("-shm"))
        .collect();
    sets.sort();
    sets
}

fn folder_of(path: &Path) -> PathBuf {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(folder) => folder.to_path_buf(),
        None => PathBuf::from("."),
    }
}

/// Removes the oldest sets beyond [`KEEP_SET_ASIDE`].
fn prune(path: &Path, name: &str) {
    let sets = sets_aside(path, name);
    let excess = sets.len().saturating_sub(KEEP_SET_ASIDE);
    for set in &sets[..excess] {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(folder_of(path).join(format!("{set}{suffix}")));
        }
    }
}

/// `20261207T041500Z`: sorts as it reads.
fn chrono_stamp(time: std::time::SystemTime) -> String {
    let text = crate::clock::format_datetime(crate::clock::unix_millis(time).div_euclid(1000));
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    format!(
        "{}T{}Z",
        &digits[..8.min(digits.len())],
        &digits[8.min(digits.len())..]
    )
}

impl Writer {
    /// Opens the store at `path` as [`open`](Self::open) does, and checks that SQLite can
    /// read all of it; a store it cannot read is set aside and created anew (what it
    /// held, the next snapshot brings again).
    pub fn open_or_replace(path: &Path) -> anyhow::Result<(Writer, Option<SetAside>)> {
        use anyhow::Context;
        // The damaged store's connection closes only once its files have moved: closing
        // last where it was, it would copy its WAL into it and delete the WAL, which is
        // part of what is set aside (SQLite skips both for a file that has moved).
        let (damaged, why) = match Writer::open(path) {
            Ok(writer) => match damage_of(&writer.conn, Check::Quick)? {
                None => return Ok((writer, None)),
                Some(words) => (Some(writer), words),
            },
            Err(e) if is_damage_in(&e) => (None, e.root_cause().to_string()),
            Err(e) => return Err(e),
        };
        let aside = set_aside(path, why)
            .with_context(|| format!("setting aside the damaged store {}", path.display()))?;
        drop(damaged);
        Ok((Writer::open(path)?, Some(aside)))
    }

    /// SQLite's first complaint about the store, from an `integrity_check` (a reader met
    /// damage: an index that disagrees with its table is damage too), read through a
    /// connection of its own: the writer's page cache may still hold pages as they were
    /// before the file was damaged.
    pub fn damage(&self) -> rusqlite::Result<Option<String>> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        damage_of(&open(&self.path, flags)?, Check::Thorough)
    }

    /// Sets the store SQLite cannot read aside (`why`: its words) and carries on with a
    /// new one, with the same settings. The old connection closes once its files have
    /// moved (see [`open_or_replace`](Self::open_or_replace)); if they cannot be moved or
    /// the new store cannot be made, the writer keeps the one it has.
    pub fn replace_damaged(&mut self, why: String) -> anyhow::Result<SetAside> {
        use anyhow::Context;
        let aside = set_aside(&self.path, why)
            .with_context(|| format!("setting aside the damaged store {}", self.path.display()))?;
        let fresh = Writer::open(&self.path)?;
        self.conn = fresh.conn;
        self.stored = None;
        self.periods = Periods::default();
        // The fresh store has its indexes: none are owed to it.
        self.pending_indexes = None;
        Ok(aside)
    }
}

/// What the writer, the readers and `/readyz` know of the store's health.
#[derive(Default)]
pub struct StoreHealth {
    /// Bumped each time the store is created anew: a connection opened before belongs
    /// to a store that is gone.
    generation: AtomicU64,
    /// Set when the store was replaced, until the next snapshot applies.
    replaced: Mutex<Option<String>>,
    /// Set while writes to the store fail for a reason outside the input (a full disk).
    write_failure: Mutex<Option<String>>,
    /// Set while posted bodies cannot be received into their files (a full disk).
    spill_failure: Mutex<Option<String>>,
    /// How a reader tells the writer what it found (set once the writer runs).
    report: OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
    /// A report is on its way to the writer: the readers that meet the same damage
    /// meanwhile send none.
    reported: AtomicBool,
}

impl StoreHealth {
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The store was created anew (after `set_aside`).
    pub fn replaced(&self, what: String) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        *lock(&self.replaced) = Some(what);
    }

    /// A snapshot applied: the store answers for its nodes again.
    pub fn snapshot_applied(&self) {
        lock(&self.replaced).take();
    }

    /// The outcome of a write to the store: `Some(why)` while it refuses writes. Whether
    /// writes were failing before.
    pub fn set_write_failure(&self, failure: Option<String>) -> bool {
        std::mem::replace(&mut *lock(&self.write_failure), failure).is_some()
    }

    /// The outcome of receiving a posted body into its file: `Some(why)` while it fails.
    pub fn set_spill_failure(&self, failure: Option<String>) {
        *lock(&self.spill_failure) = failure;
    }

    /// Why the store does not answer as it should (one line each), for `/readyz`.
    pub fn problems(&self) -> Vec<String> {
        [&self.replaced, &self.write_failure, &self.spill_failure]
            .into_iter()
            .filter_map(|problem| lock(problem).clone())
            .collect()
    }

    /// Sets how readers report damage (to the writer).
    pub fn on_damage(&self, report: impl Fn(u64) + Send + Sync + 'static) {
        let _ = self.report.set(Box::new(report));
    }

    /// A reader found the store of `generation` damaged: the writer is told, unless it
    /// has been already and has not looked yet.
    pub fn report_damage(&self, generation: u64) {
        if let Some(report) = self.report.get()
            && !self.reported.swap(true, Ordering::AcqRel)
        {
            report(generation);
        }
    }

    /// The writer has looked at the last report: the next one is sent.
    pub fn damage_looked_at(&self) {
        self.reported.store(false, Ordering::Release);
    }
}

impl std::fmt::Debug for StoreHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreHealth")
            .field("generation", &self.generation())
            .field("problems", &self.problems())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_aside_the_three_files_and_keeps_the_newest_three() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calls.db");
        for i in 0..5 {
            for suffix in ["", "-wal", "-shm"] {
                std::fs::write(with_suffix(&path, suffix), format!("{i}")).unwrap();
            }
            let aside = set_aside(&path, "damaged".into()).unwrap();
            assert_eq!(std::fs::read_to_string(&aside.to).unwrap(), format!("{i}"));
            assert_eq!(
                std::fs::read_to_string(with_suffix(&aside.to, "-wal")).unwrap(),
                format!("{i}")
            );
            assert!(!path.exists());
        }
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left.len(), 9, "{left:?}");
        // The newest three: the last one written holds "4".
        let contents: Vec<String> = left
            .iter()
            .filter(|f| !f.ends_with("-wal") && !f.ends_with("-shm"))
            .map(|f| std::fs::read_to_string(dir.path().join(f)).unwrap())
            .collect();
        assert_eq!(contents, ["2", "3", "4"], "{left:?}");
        assert!(left[0].starts_with("calls.db.corrupt-2"), "{left:?}");
    }
}
