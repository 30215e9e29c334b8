//! Watching the two files the agent follows, the snapshot file and the directory file.
//!
//! Both want the same thing: "call me once the file has a new complete content". With
//! inotify that is a close after writing (`IN_CLOSE_WRITE`) or a rename over it
//! (`IN_MOVED_TO`); a plain modify event is not, since the writer may be half-way through.
//! The parent directory is watched, not the file, so a file replaced by rename (or created
//! later) is still seen; a folder that goes away is watched again once it is back (its
//! files then read anew). Events are coalesced: a burst within [`QUIET`] costs one call.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

/// How long relevant events must stop before the callbacks run.
pub const QUIET: Duration = Duration::from_millis(20);
/// The longest a burst of relevant events delays the callbacks.
pub const MAX_DELAY: Duration = Duration::from_millis(200);

/// What the kernel is asked to report, and nothing more. The store usually lives in a
/// watched folder (the default and the packaged layouts put it beside the snapshot or the
/// directory file), and every page SQLite writes to its WAL would be an `IN_MODIFY` event
/// there: the `notify` crate always asks for those (and `IN_OPEN`), and reading them cost
/// the agent a third of a CPU-second per 100k-call snapshot. Asked only for these, the
/// database's writes never wake the watcher.
const EVENTS: WatchMask = WatchMask::CLOSE_WRITE
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DELETE);

/// A file to follow and what to do when it has a new content.
pub struct Target {
    pub path: PathBuf,
    pub on_change: Box<dyn Fn() + Send>,
}

/// Keeps the watch alive; dropping it stops watching (within [`POLL`]).
pub struct FileWatcher {
    stopping: Arc<AtomicBool>,
}

impl Drop for FileWatcher {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
    }
}

/// How long the reading thread waits for events before it looks whether it is to stop, or
/// whether a watched folder that went away is back.
const POLL: Duration = Duration::from_secs(1);

/// What one event says about a file of a watched folder.
enum Change {
    /// A complete new content: closed after writing, or renamed into place.
    Written(PathBuf),
    Removed(PathBuf),
    /// Any file may have changed: the kernel's queue overflowed, or a folder is watched
    /// again after it was gone.
    Unknown,
}

/// A watched folder, by its canonical path (two spellings of one folder are one watch).
struct Folder {
    dir: PathBuf,
    /// `None` while the folder is gone (deleted, unmounted): looked for at every [`POLL`].
    wd: Option<WatchDescriptor>,
}

/// Starts following `targets`; their directories are created if missing. Every callback
/// also runs once at start, on the same thread as the later ones, so a file is never read
/// twice at once.
pub fn watch(targets: Vec<Target>) -> anyhow::Result<FileWatcher> {
    let mut inotify = Inotify::init().context("starting inotify")?;
    let mut folders: Vec<Folder> = Vec::new();
    let mut watched = Vec::new();
    for target in targets {
        let path = std::path::absolute(&target.path)?;
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            anyhow::bail!("{} is not a file's path", path.display());
        };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir =
            std::fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
        if !folders.iter().any(|f| f.dir == dir) {
            let wd = inotify
                .watches()
                .add(&dir, EVENTS)
                .with_context(|| format!("watching {}", dir.display()))?;
            folders.push(Folder {
                dir: dir.clone(),
                wd: Some(wd),
            });
        }
        watched.push(Target {
            path: dir.join(name),
            on_change: target.on_change,
        });
    }
    let stopping = Arc::new(AtomicBool::new(false));
    let (events_tx, events_rx) = mpsc::channel::<Change>();
    std::thread::Builder::new().name("inotify".into()).spawn({
        let stopping = stopping.clone();
        move || read_events(&mut inotify, &mut folders, &stopping, &events_tx)
    })?;
    std::thread::Builder::new()
        .name("file-watch".into())
        .spawn(move || dispatch(events_rx, watched))?;
    Ok(FileWatcher { stopping })
}

/// Reads the kernel's events until the watch is dropped, and passes on what they say.
fn read_events(
    inotify: &mut Inotify,
    folders: &mut [Folder],
    stopping: &AtomicBool,
    changes: &mpsc::Sender<Change>,
) {
    use std::os::fd::AsRawFd;
    let mut buffer = vec![0u8; 64 * 1024];
    while !stopping.load(Ordering::Acquire) {
        for folder in folders.iter_mut().filter(|f| f.wd.is_none()) {
            if let Ok(wd) = inotify.watches().add(&folder.dir, EVENTS) {
                tracing::info!(dir = %folder.dir.display(), "watched folder back: reading its files");
                folder.wd = Some(wd);
                if changes.send(Change::Unknown).is_err() {
                    return;
                }
            }
        }
        let mut ready = libc::pollfd {
            fd: inotify.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes the one pollfd it is given, which lives on this
        // stack frame for the whole call; the fd is the inotify instance this thread owns.
        let polled = unsafe { libc::poll(&mut ready, 1, POLL.as_millis() as libc::c_int) };
        if polled <= 0 {
            continue; // the timeout, or a signal
        }
        let events = match inotify.read_events(&mut buffer) {
            Ok(events) => events,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) =>
            {
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "file watch failed: changes to the snapshot and directory files are no longer seen");
                return;
            }
        };
        for event in events {
            let folder = folders
                .iter_mut()
                .find(|f| f.wd.as_ref() == Some(&event.wd));
            let change = if event.mask.contains(EventMask::Q_OVERFLOW) {
                Some(Change::Unknown)
            } else if event.mask.contains(EventMask::IGNORED) {
                // The kernel dropped the watch: the folder is gone.
                if let Some(folder) = folder {
                    tracing::warn!(dir = %folder.dir.display(), "watched folder gone: its files are read again once it is back");
                    folder.wd = None;
                }
                None
            } else {
                let file = folder
                    .zip(event.name)
                    .map(|(f, name)| f.dir.join(OsString::from(name)));
                if event
                    .mask
                    .intersects(EventMask::CLOSE_WRITE | EventMask::MOVED_TO)
                {
                    file.map(Change::Written)
                } else if event.mask.contains(EventMask::DELETE) {
                    file.map(Change::Removed)
                } else {
                    None
                }
            };
            if let Some(change) = change
                && changes.send(change).is_err()
            {
                return;
            }
        }
    }
}

/// Runs the callbacks of the targets that events name, once per burst: a relevant event
/// waits until [`QUIET`] passes without another relevant one, or [`MAX_DELAY`] after the
/// first. Events on other files in the same folders (the database's own WAL, a log) never
/// delay a callback.
fn dispatch(events: mpsc::Receiver<Change>, targets: Vec<Target>) {
    // The first read of every file, once the watch is in place: a write from now on
    // cannot fall between reading and watching.
    let mut changed = vec![true; targets.len()];
    for (target, changed) in targets.iter().zip(changed.iter_mut()) {
        (target.on_change)();
        *changed = false;
    }
    let mut first_relevant: Option<Instant> = None;
    let mut last_relevant = Instant::now();
    loop {
        let event = match first_relevant {
            None => events
                .recv()
                .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            Some(first) => {
                let deadline = (last_relevant + QUIET).min(first + MAX_DELAY);
                events.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            }
        };
        match event {
            Ok(event) => {
                for (i, target) in targets.iter().enumerate() {
                    match new_content(&event, &target.path) {
                        Some(true) => {
                            changed[i] = true;
                            last_relevant = Instant::now();
                            first_relevant.get_or_insert(last_relevant);
                        }
                        Some(false) => tracing::warn!(
                            path = %target.path.display(),
                            "watched file removed; nothing changes until it is written again"
                        ),
                        None => {}
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                for (target, changed) in targets.iter().zip(changed.iter_mut()) {
                    if std::mem::take(changed) {
                        (target.on_change)();
                    }
                }
                first_relevant = None;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// `Some(true)`: `path` has a complete new content (or may have); `Some(false)`: it was
/// removed; `None`: the event does not concern it.
fn new_content(change: &Change, path: &Path) -> Option<bool> {
    match change {
        Change::Written(file) => (file == path).then_some(true),
        Change::Removed(file) => (file == path).then_some(false),
        Change::Unknown => Some(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target whose callback reports on a channel: the channel ends when the watcher's
    /// threads have ended and dropped the callback.
    fn target(path: &Path) -> (Target, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel();
        let target = Target {
            path: path.to_path_buf(),
            on_change: Box::new(move || {
                let _ = tx.send(());
            }),
        };
        (target, rx)
    }

    /// Waits (at most 10 s) for the next call.
    fn called(rx: &mpsc::Receiver<()>) -> bool {
        rx.recv_timeout(Duration::from_secs(10)).is_ok()
    }

    /// Writes `path` as a well-behaved writer does: a temporary file, then a rename.
    fn replace(path: &Path) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, "x").unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn two_spellings_of_one_folder_are_one_watch() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let a = dir.path().join("a.json");
        let b = dir.path().join("sub/../b.json");
        let (ta, ra) = target(&a);
        let (tb, rb) = target(&b);
        let _watcher = watch(vec![ta, tb]).unwrap();
        assert!(called(&ra) && called(&rb), "the first read of each");
        replace(&a);
        assert!(called(&ra));
        std::fs::write(&b, "y").unwrap();
        assert!(called(&rb));
    }

    #[test]
    fn a_folder_deleted_and_made_again_is_watched_again() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("feed");
        let file = dir.join("snapshot.jsonl");
        let (t, rx) = target(&file);
        let _watcher = watch(vec![t]).unwrap();
        assert!(called(&rx));
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        // Seen again: at once when the folder is back (its files may be new), and then
        // for each new content.
        assert!(called(&rx));
        while rx.try_recv().is_ok() {}
        replace(&file);
        assert!(called(&rx));
    }

    #[test]
    fn dropping_the_watcher_ends_its_threads_even_when_the_folder_is_gone() {
        for remove_first in [false, true] {
            let base = tempfile::tempdir().unwrap();
            let dir = base.path().join("feed");
            let (t, rx) = target(&dir.join("snapshot.jsonl"));
            let watcher = watch(vec![t]).unwrap();
            assert!(called(&rx));
            if remove_first {
                std::fs::remove_dir_all(&dir).unwrap();
            }
            drop(watcher);
            // The callback (and its sender) goes with the threads.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        panic!("the watch's threads still run (folder removed: {remove_first})")
                    }
                    Ok(()) => {}
                }
            }
        }
    }
}
