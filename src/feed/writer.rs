//! The writer thread: the one owner of the store's write connection.
//!
//! Every change to the store goes through here, one [`Job`] at a time: a snapshot file to
//! (re)read, a snapshot streaming in over HTTP, and, between jobs, the expiry of nodes gone
//! silent. One writer means no write ever waits for a lock, and the order in which
//! snapshots arrive is the order in which they apply. Queued requests to re-read the file
//! collapse into one: the file has one current content, however many events announced it.
//!
//! The writer runs at the priority of the API's threads, not below: a 5-second period of
//! a 100k-call node costs it ~10% of a core, which is all the customers can lose to it,
//! while a niced writer starved under a flood of queries (measured at nice 10: periods
//! took up to 3.9 s to apply and queries still lost 21% of their throughput, against 2 s
//! and 5% at equal priority), and the switch's next snapshot arrived before the last was in.
//!
//! With the relay on, each snapshot's rows are copied into the relay's spool as they are
//! read, and the copy is handed over only once the snapshot committed: the relay sees
//! exactly the snapshots the store took, in the same order, and the writer never waits
//! for it (handing over is a rename). The writer knows the relay only as a [`Forward`].

use std::collections::VecDeque;
use std::io::BufRead;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{oneshot, watch};

use crate::feed::{
    ApplyReport, Forward, InsertLine, SnapshotError, Tee, apply_file, apply_snapshot_teed,
};
use crate::metrics::Metrics;
use crate::store::{Origin, Writer};

/// How often the writer looks for nodes gone silent.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);

/// After this long without a snapshot the writer gives its page cache back: a switch
/// posting every few seconds keeps it warm, an idle agent stays small.
const RELEASE_AFTER: Duration = Duration::from_secs(10);

/// What the feed has done so far: tests, the demo and the metrics read it; nobody has to
/// sleep to know whether a snapshot went in.
#[derive(Debug, Clone, Default)]
pub struct FeedStatus {
    /// How many times the writer looked at the snapshot file (at start, and per change).
    pub file_checks: u64,
    pub applied: u64,
    pub rejected: u64,
    pub last_report: Option<ApplyReport>,
    pub last_error: Option<String>,
}

/// The answer to a streamed snapshot.
pub type StreamResult = Result<ApplyReport, SnapshotError>;

/// Work for the writer thread.
pub enum Job {
    /// The snapshot file has (or may have) a new content.
    ApplyFile,
    /// A snapshot read from `input` as it arrives (the socket source).
    ApplyStream {
        input: Box<dyn BufRead + Send>,
        insert_line: InsertLine,
        received_at: SystemTime,
        reply: oneshot::Sender<StreamResult>,
    },
    /// Finish, checkpoint the store, and end the thread.
    Stop,
}

/// A way to hand jobs to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct WriterHandle {
    jobs: mpsc::Sender<Job>,
}

impl WriterHandle {
    pub fn send(&self, job: Job) -> bool {
        self.jobs.send(job).is_ok()
    }
}

/// The running writer thread.
pub struct WriterThread {
    pub handle: WriterHandle,
    pub status: watch::Receiver<FeedStatus>,
    thread: Option<JoinHandle<()>>,
}

impl WriterThread {
    /// Starts the thread; `watch_path` is the snapshot file, if the file source is on,
    /// and `relay` where applied snapshots go on (the relay's spool), if the relay is on.
    /// `running` is set while the thread runs, and cleared as it ends, however it ends.
    pub fn spawn(
        writer: Writer,
        watch_path: Option<PathBuf>,
        stale_after: Option<Duration>,
        metrics: Arc<Metrics>,
        running: Arc<AtomicBool>,
        relay: Option<Box<dyn Forward>>,
    ) -> std::io::Result<WriterThread> {
        let (jobs_tx, jobs_rx) = mpsc::channel();
        let (status_tx, status) = watch::channel(FeedStatus::default());
        let worker = Worker {
            writer,
            watch_path,
            stale_after,
            status: status_tx,
            metrics,
            applied_file: None,
            relay,
        };
        running.store(true, Ordering::Release);
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                let _running = ClearOnDrop(running);
                worker.run(jobs_rx)
            })?;
        Ok(WriterThread {
            handle: WriterHandle { jobs: jobs_tx },
            status,
            thread: Some(thread),
        })
    }

    /// Lets the current job finish, checkpoints, and joins the thread.
    pub fn stop(&mut self) {
        self.handle.send(Job::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Clears its flag when dropped: at the end of the thread, or while a panic unwinds it.
struct ClearOnDrop(Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The identity of a file content: inode, modification time, length.
type FileStamp = (u64, SystemTime, u64);

struct Worker {
    writer: Writer,
    watch_path: Option<PathBuf>,
    stale_after: Option<Duration>,
    status: watch::Sender<FeedStatus>,
    metrics: Arc<Metrics>,
    /// The file content applied last: a late duplicate event for the same content is not
    /// worth a second pass over it.
    applied_file: Option<FileStamp>,
    relay: Option<Box<dyn Forward>>,
}

impl Worker {
    fn run(mut self, jobs: mpsc::Receiver<Job>) {
        let mut queue = VecDeque::new();
        let mut last_expiry = Instant::now();
        let mut last_write = Instant::now();
        let mut released = true;
        let mut copied_back = true;
        loop {
            if queue.is_empty() {
                match jobs.recv_timeout(EXPIRY_INTERVAL) {
                    Ok(job) => queue.push_back(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            queue.extend(jobs.try_iter());
            match queue.pop_front() {
                Some(Job::ApplyFile) => {
                    queue.retain(|job| !matches!(job, Job::ApplyFile));
                    self.check_file();
                    (last_write, released, copied_back) = (Instant::now(), false, false);
                }
                Some(Job::ApplyStream {
                    input,
                    insert_line,
                    received_at,
                    reply,
                }) => {
                    let result = self.apply(|writer, tee| {
                        apply_snapshot_teed(
                            writer,
                            input,
                            insert_line,
                            Origin::Socket,
                            received_at,
                            tee,
                        )
                    });
                    self.record(Origin::Socket, result.as_ref().map_err(|e| e.to_string()));
                    let _ = reply.send(result);
                    (last_write, released, copied_back) = (Instant::now(), false, false);
                }
                Some(Job::Stop) => break,
                None => {}
            }
            if queue.is_empty() && !copied_back {
                if let Err(e) = self.writer.copy_back() {
                    tracing::warn!(error = %e, "checkpointing the WAL failed");
                }
                copied_back = true;
            }
            if queue.is_empty() && !released && last_write.elapsed() >= RELEASE_AFTER {
                if let Err(e) = self.writer.release_memory() {
                    tracing::warn!(error = %e, "releasing the store's cache failed");
                }
                released = true;
            }
            if last_expiry.elapsed() >= EXPIRY_INTERVAL {
                self.expire();
                last_expiry = Instant::now();
            }
        }
        if let Err(e) = self.writer.checkpoint() {
            tracing::warn!(error = %e, "checkpointing the store at shutdown failed");
        }
    }

    /// Applies the snapshot file if its content is not the one applied last.
    fn check_file(&mut self) {
        let Some(path) = self.watch_path.clone() else {
            return;
        };
        match file_stamp(&path) {
            Ok(stamp) if Some(stamp) == self.applied_file => {}
            Ok(stamp) => {
                let result = self.apply(|writer, tee| apply_file(writer, &path, tee));
                self.record(Origin::File, result.as_ref().map_err(|e| e.to_string()));
                self.applied_file = Some(stamp);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::info!(path = %path.display(), "no snapshot file (yet)");
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read the snapshot file");
            }
        }
        self.status.send_modify(|s| s.file_checks += 1);
    }

    /// Applies a snapshot with `apply`, its rows copied for the relay when it is on: the
    /// copy is handed to the relay once the snapshot committed, and deleted otherwise.
    fn apply(
        &mut self,
        apply: impl FnOnce(&mut Writer, Option<&mut dyn Tee>) -> Result<ApplyReport, SnapshotError>,
    ) -> Result<ApplyReport, SnapshotError> {
        let mut copy = self.relay.as_ref().and_then(|relay| relay.begin());
        let result = apply(
            &mut self.writer,
            copy.as_deref_mut().map(|c| c as &mut dyn Tee),
        );
        if let (Ok(report), Some(copy)) = (&result, copy) {
            copy.commit(&report.nodes, report.repeat);
        }
        result
    }

    /// One log line and one status update per snapshot, applied or rejected.
    fn record(&self, origin: Origin, result: Result<&ApplyReport, String>) {
        let source = origin.as_str();
        match result {
            Ok(report) => {
                tracing::info!(
                    source,
                    nodes = ?report.nodes,
                    rows = report.rows,
                    skipped = report.skipped,
                    written = report.written,
                    removed = report.removed,
                    duration_ms = %format_args!("{:.1}", report.duration.as_secs_f64() * 1000.0),
                    "snapshot applied"
                );
                self.metrics
                    .snapshot(source, Ok((report.skipped, report.duration)));
                self.status.send_modify(|s| {
                    s.applied += 1;
                    s.last_report = Some(report.clone());
                });
            }
            Err(error) => {
                tracing::error!(source, %error, "snapshot rejected; previous state kept");
                self.metrics.snapshot(source, Err(()));
                self.status.send_modify(|s| {
                    s.rejected += 1;
                    s.last_error = Some(error);
                });
            }
        }
    }

    fn expire(&mut self) {
        let Some(stale_after) = self.stale_after else {
            return;
        };
        match self.writer.expire(SystemTime::now() - stale_after) {
            Ok(nodes) if !nodes.is_empty() => {
                tracing::info!(?nodes, "silent nodes expired: their calls are gone")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "expiring silent nodes failed"),
        }
    }
}

/// Sets the calling thread's niceness (only ever lowering its priority, which needs no
/// privilege).
pub(crate) fn set_niceness(niceness: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority only read and set scheduling attributes of the calling
    // thread; they take no pointers and have no memory effects.
    unsafe {
        let tid = libc::gettid();
        if libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, niceness) != 0 {
            tracing::debug!(niceness, "could not lower a thread's priority");
        }
    }
}

fn file_stamp(path: &Path) -> std::io::Result<FileStamp> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.ino(), meta.modified()?, meta.len()))
}
