//! Copying the WAL back into the database file, off the writer's thread.
//!
//! A checkpoint of a 100k-call store after a second of call events copies thousands of
//! scattered pages and syncs the file: hundreds of milliseconds. Run by the writer, every
//! event that came meanwhile waited for it, and so did every stream. SQLite lets a
//! passive checkpoint run beside the writer (it copies only what is committed, and never
//! takes the write lock), so a thread of its own does it, on a connection it opens for each
//! (the store may have been replaced since the last), while the writer goes on committing.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use rusqlite::OpenFlags;

use super::write::copy_back;

/// The checkpointing thread; stopped (and joined) when dropped.
pub struct Checkpointer {
    nudge: Option<mpsc::SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread for the store at `path`.
    pub fn start(path: &Path) -> std::io::Result<Checkpointer> {
        let (nudge, nudged) = mpsc::sync_channel(1);
        let path: PathBuf = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || {
                for () in nudged {
                    if let Err(e) = checkpoint(&path) {
                        tracing::warn!(error = %e, "checkpointing the WAL failed");
                    }
                }
            })?;
        Ok(Checkpointer {
            nudge: Some(nudge),
            thread: Some(thread),
        })
    }

    /// Asks for a checkpoint (one already asked for and not begun covers this one too).
    pub fn nudge(&self) {
        if let Some(nudge) = &self.nudge {
            let _ = nudge.try_send(());
        }
    }
}

/// One copy back; a store busy with its writer or a reader is tried again next time.
fn checkpoint(path: &Path) -> rusqlite::Result<()> {
    let conn = super::open(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    match copy_back(&conn, path) {
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::DatabaseBusy =>
        {
            Ok(())
        }
        other => other,
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.nudge = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
