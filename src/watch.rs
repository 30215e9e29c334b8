//! Watching the two files the agent follows, the snapshot file and the directory file.
//!
//! Both want the same thing: "call me once the file has a new complete content". With
//! inotify that is a close after writing (`IN_CLOSE_WRITE`) or a rename over it
//! (`IN_MOVED_TO`); a plain modify event is not, since the writer may be half-way through.
//! The parent directory is watched, not the file, so a file replaced by rename (or created
//! later) is still seen. Events are coalesced: a burst within [`QUIET`] costs one call.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};

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

/// Keeps the watch alive; dropping it stops watching.
pub struct FileWatcher {
    watches: Watches,
    descriptors: Vec<WatchDescriptor>,
    stopping: Arc<AtomicBool>,
}

impl Drop for FileWatcher {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        // Removing a watch queues an IN_IGNORED event: it wakes the reading thread, which
        // then sees that it is to stop.
        for wd in self.descriptors.drain(..) {
            let _ = self.watches.remove(wd);
        }
    }
}

/// What one event says about a file of a watched folder.
enum Change {
    /// A complete new content: closed after writing, or renamed into place.
    Written(PathBuf),
    Removed(PathBuf),
    /// The kernel's queue overflowed: any file may have changed.
    Unknown,
}

/// Starts following `targets`; their directories are created if missing. Every callback
/// also runs once at start, on the same thread as the later ones, so a file is never read
/// twice at once.
pub fn watch(targets: Vec<Target>) -> anyhow::Result<FileWatcher> {
    let targets: Vec<Target> = targets
        .into_iter()
        .map(|t| {
            Ok(Target {
                path: std::path::absolute(&t.path)?,
                on_change: t.on_change,
            })
        })
        .collect::<std::io::Result<_>>()?;
    let mut inotify = Inotify::init().context("starting inotify")?;
    let mut watches = inotify.watches();
    let mut dirs: HashMap<WatchDescriptor, PathBuf> = HashMap::new();
    for target in &targets {
        let dir = target.path.parent().unwrap_or(Path::new("/")).to_path_buf();
        if !dirs.values().any(|d| *d == dir) {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let wd = watches
                .add(&dir, EVENTS)
                .with_context(|| format!("watching {}", dir.display()))?;
            dirs.insert(wd, dir);
        }
    }
    let descriptors = dirs.keys().cloned().collect();
    let stopping = Arc::new(AtomicBool::new(false));
    let (events_tx, events_rx) = mpsc::channel::<Change>();
    std::thread::Builder::new().name("inotify".into()).spawn({
        let stopping = stopping.clone();
        move || read_events(&mut inotify, &dirs, &stopping, &events_tx)
    })?;
    std::thread::Builder::new()
        .name("file-watch".into())
        .spawn(move || dispatch(events_rx, targets))?;
    Ok(FileWatcher {
        watches,
        descriptors,
        stopping,
    })
}

/// Reads the kernel's events until the watch is dropped, and passes on what they say.
fn read_events(
    inotify: &mut Inotify,
    dirs: &HashMap<WatchDescriptor, PathBuf>,
    stopping: &AtomicBool,
    changes: &mpsc::Sender<Change>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    while !stopping.load(Ordering::Acquire) {
        let events = match inotify.read_events_blocking(&mut buffer) {
            Ok(events) => events,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "file watch failed: changes to the snapshot and directory files are no longer seen");
                return;
            }
        };
        for event in events {
            let file = |name: Option<&std::ffi::OsStr>| {
                let dir = dirs.get(&event.wd)?;
                Some(dir.join(OsString::from(name?)))
            };
            let change = if event.mask.contains(EventMask::Q_OVERFLOW) {
                Some(Change::Unknown)
            } else if event
                .mask
                .intersects(EventMask::CLOSE_WRITE | EventMask::MOVED_TO)
            {
                file(event.name).map(Change::Written)
            } else if event.mask.contains(EventMask::DELETE) {
                file(event.name).map(Change::Removed)
            } else {
                None
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
