//! Watching the two files the agent follows, the snapshot file and the directory file.
//!
//! Both want the same thing: "call me once the file has a new complete content". With
//! inotify that is a close after writing (`IN_CLOSE_WRITE`) or a rename over it
//! (`IN_MOVED_TO`); a plain modify event is not, since the writer may be half-way through.
//! The parent directory is watched, not the file, so a file replaced by rename (or created
//! later) is still seen. Events are coalesced: a burst within [`QUIET`] costs one call.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};

/// How long relevant events must stop before the callbacks run.
pub const QUIET: Duration = Duration::from_millis(20);
/// The longest a burst of relevant events delays the callbacks.
pub const MAX_DELAY: Duration = Duration::from_millis(200);

/// A file to follow and what to do when it has a new content.
pub struct Target {
    pub path: PathBuf,
    pub on_change: Box<dyn Fn() + Send>,
}

/// Keeps the watch alive; dropping it stops watching.
pub struct FileWatcher {
    _watcher: RecommendedWatcher,
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
    let (events_tx, events_rx) = mpsc::channel::<Event>();
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<Event>| match event {
            Ok(event) => {
                let _ = events_tx.send(event);
            }
            Err(e) => tracing::warn!(error = %e, "file watch error"),
        })?;
    let mut dirs = HashSet::new();
    for target in &targets {
        let dir = target.path.parent().unwrap_or(Path::new("/")).to_path_buf();
        if dirs.insert(dir.clone()) {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            watcher
                .watch(&dir, RecursiveMode::NonRecursive)
                .with_context(|| format!("watching {}", dir.display()))?;
        }
    }
    std::thread::Builder::new()
        .name("file-watch".into())
        .spawn(move || dispatch(events_rx, targets))?;
    Ok(FileWatcher { _watcher: watcher })
}

/// Runs the callbacks of the targets that events name, once per burst: a relevant event
/// waits until [`QUIET`] passes without another relevant one, or [`MAX_DELAY`] after the
/// first. Events on other files in the same folders (the database's own WAL, a log) never
/// delay a callback.
fn dispatch(events: mpsc::Receiver<Event>, targets: Vec<Target>) {
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

/// `Some(true)`: `path` has a complete new content; `Some(false)`: it was removed;
/// `None`: the event does not concern it, or the content may be incomplete.
fn new_content(event: &Event, path: &Path) -> Option<bool> {
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
            event.paths.iter().any(|p| p == path).then_some(true)
        }
        // A rename within the watched directory: paths are [from, to].
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
            (event.paths.get(1).map(PathBuf::as_path) == Some(path)).then_some(true)
        }
        EventKind::Remove(_) => event.paths.iter().any(|p| p == path).then_some(false),
        _ => None,
    }
}
