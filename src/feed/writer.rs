//! The writer thread: the one owner of the store's write connection.
//!
//! Every change to the store goes through here, one [`Job`] at a time: a snapshot file to
//! (re)read, a snapshot streaming in over HTTP, call events, and, between jobs, the expiry
//! of nodes gone silent. One writer means no write ever waits for a lock, and the order in
//! which snapshots and events arrive is the order in which they apply. Queued requests to
//! re-read the file collapse into one: the file has one current content, however many
//! notifications announced it.
//!
//! Call events are answered before they apply (the switch waits for each answer), so they
//! wait here, in arrival order among the snapshots, and every run of them queued behind
//! each other applies as one transaction: a burst, or the events that came in while a large
//! snapshot applied, costs one commit. How many may wait is bounded
//! ([`WriterHandle::queue_event`]): past the bound the listener answers 503, and the
//! switch retries.
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
use std::ops::ControlFlow;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{oneshot, watch};

use crate::call::Event;
use crate::feed::{
    ApplyReport, Arrivals, FileRead, Forward, InsertLine, SnapshotError, Tee, apply_file,
    apply_snapshot_teed,
};
use crate::live;
use crate::metrics::Metrics;
use crate::store::{Checkpointer, EventChanges, Origin, StoreHealth, Writer, is_damage};

/// How often the writer looks for nodes gone silent.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);

/// After this long without a snapshot or an event the writer gives its page cache back: a
/// switch posting every few seconds keeps it warm, an idle agent stays small.
const RELEASE_AFTER: Duration = Duration::from_secs(10);

/// How often, at most, the WAL is copied back while only events are written: each copy
/// syncs the database file, too dear to do hundreds of times a second.
const COPY_BACK_EVERY: Duration = Duration::from_secs(1);

/// The most events one transaction applies (~15 ms of work): a queue emptied after a long
/// snapshot shows its oldest events first, a batch at a time, rather than all of them
/// only once the last is written.
const MAX_EVENT_BATCH: usize = 256;

/// How soon a snapshot file the store could not take (a full disk) is tried again, unless
/// the store takes a write before (which tries it at once); the wait doubles with each
/// failure, up to [`FILE_RETRY_MAX`].
const FILE_RETRY: Duration = Duration::from_secs(10);
const FILE_RETRY_MAX: Duration = Duration::from_secs(300);

/// How soon a store found sound after a reader's report of damage is checked again.
const DAMAGE_RECHECK: Duration = Duration::from_secs(60);
/// After the indexes owed to a first snapshot failed to build (a full disk), the writer
/// tries again between jobs no sooner than this.
const INDEX_RETRY: Duration = Duration::from_secs(10);

/// Call events that may wait for the writer, by default (`feed.max_queued_events`): a busy
/// node's events (600 call attempts a second, three events each) for the ~8 s a 100k-call
/// snapshot may take to apply on a loaded host, ~1 KB each.
pub const MAX_QUEUED_EVENTS: usize = 16_384;

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
    /// Call events committed (or, when a commit failed, dropped: `last_error` says so).
    pub events: u64,
    pub last_events: Option<EventChanges>,
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
    /// A call event, checked and answered already ([`WriterHandle::queue_event`]).
    Event(Box<Event>),
    /// A reader found the store of this generation damaged ([`StoreHealth`]).
    Damage(u64),
    /// Finish, checkpoint the store, and end the thread.
    Stop,
}

/// A way to hand jobs to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct WriterHandle {
    jobs: mpsc::Sender<Job>,
    /// Events queued and not yet applied, and how many may be.
    events: Arc<(std::sync::atomic::AtomicUsize, usize)>,
}

/// Why a call event was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum NotQueued {
    /// As many events as may wait are waiting.
    Full,
    /// The writer has stopped.
    Stopped,
}

impl WriterHandle {
    pub fn send(&self, job: Job) -> bool {
        self.jobs.send(job).is_ok()
    }

    /// Queues a call event behind whatever the writer has to do, unless the queue is full.
    pub fn queue_event(&self, event: Box<Event>) -> Result<(), NotQueued> {
        let (queued, max) = &*self.events;
        if queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < *max).then_some(n + 1)
            })
            .is_err()
        {
            return Err(NotQueued::Full);
        }
        if self.jobs.send(Job::Event(event)).is_err() {
            queued.fetch_sub(1, Ordering::AcqRel);
            return Err(NotQueued::Stopped);
        }
        Ok(())
    }
}

/// Where what the writer commits goes on, once committed.
pub struct Committed {
    /// The applied snapshots' rows: the relay's spool, if the relay is on.
    pub relay: Option<Box<dyn Forward>>,
    /// Where each commit changed the store: the live streams' feed.
    pub live: live::Feed,
}

/// The running writer thread.
pub struct WriterThread {
    pub handle: WriterHandle,
    pub status: watch::Receiver<FeedStatus>,
    thread: Option<JoinHandle<()>>,
}

impl WriterThread {
    /// Starts the thread; `watch_path` is the snapshot file, if the file source is on,
    /// and `committed` where each commit goes on. `running` is set while the thread
    /// runs, and cleared as it ends, however it ends. At most `max_queued_events` call
    /// events wait for it at once.
    pub fn spawn(
        writer: Writer,
        watch_path: Option<PathBuf>,
        max_queued_events: usize,
        metrics: Arc<Metrics>,
        running: Arc<AtomicBool>,
        health: Arc<StoreHealth>,
        committed: Committed,
    ) -> std::io::Result<WriterThread> {
        let (jobs_tx, jobs_rx) = mpsc::channel();
        let (status_tx, status) = watch::channel(FeedStatus::default());
        let events = Arc::new((std::sync::atomic::AtomicUsize::new(0), max_queued_events));
        let path = writer.path().to_owned();
        let worker = Worker {
            writer,
            watch_path,
            status: status_tx,
            metrics,
            applied_file: None,
            file_retry: None,
            relay: committed.relay,
            events: events.clone(),
            health,
            damage_checked: None,
            index_retry_at: None,
            live: committed.live,
            checkpointer: Some(Checkpointer::start(&path)?),
        };
        running.store(true, Ordering::Release);
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                let _running = ClearOnDrop(running);
                worker.run(jobs_rx)
            })?;
        Ok(WriterThread {
            handle: WriterHandle {
                jobs: jobs_tx,
                events,
            },
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
    status: watch::Sender<FeedStatus>,
    metrics: Arc<Metrics>,
    /// The file content applied last: a late duplicate event for the same content is not
    /// worth a second pass over it.
    applied_file: Option<FileStamp>,
    /// When to try the snapshot file again, after the store could not take it, and the
    /// wait before that try.
    file_retry: Option<(Instant, Duration)>,
    relay: Option<Box<dyn Forward>>,
    /// The queue's count, shared with the handles.
    events: Arc<(std::sync::atomic::AtomicUsize, usize)>,
    health: Arc<StoreHealth>,
    /// The store generation a reader's report of damage was last checked for, and when.
    damage_checked: Option<(u64, Instant)>,
    /// Not before this, the writer tries again the indexes it failed to build.
    index_retry_at: Option<Instant>,
    /// Where each commit's scope goes, for live streams: published after the commit.
    live: live::Feed,
    /// Copies the WAL back beside the writer (`None` once stopped, at the end).
    checkpointer: Option<Checkpointer>,
}

/// The writer loop's own clock: when it last emptied expired nodes, wrote, released its
/// cache and copied the WAL back.
struct Pace {
    last_expiry: Instant,
    last_write: Instant,
    released: bool,
    /// The WAL is copied back once the queue is empty: at once after a snapshot
    /// (`copy_now`), at most every COPY_BACK_EVERY after events alone.
    copy_due: bool,
    copy_now: bool,
    last_copy: Instant,
}

impl Pace {
    fn new() -> Pace {
        let now = Instant::now();
        Pace {
            last_expiry: now,
            last_write: now,
            released: true,
            copy_due: false,
            copy_now: false,
            last_copy: now,
        }
    }

    /// The writer wrote a snapshot (`snapshot`), or call events.
    fn wrote(&mut self, snapshot: bool) {
        (self.last_write, self.released, self.copy_due) = (Instant::now(), false, true);
        if snapshot {
            self.copy_now = true;
        }
    }
}

impl Worker {
    fn run(mut self, jobs: mpsc::Receiver<Job>) {
        // What expired while the agent was down goes before any job can see it.
        self.expire();
        let mut queue = VecDeque::new();
        let mut pace = Pace::new();
        loop {
            if queue.is_empty() {
                match jobs.recv_timeout(EXPIRY_INTERVAL) {
                    Ok(job) => queue.push_back(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            queue.extend(jobs.try_iter());
            if let Some(job) = queue.pop_front()
                && self.work(job, &mut queue, &jobs, &mut pace).is_break()
            {
                break;
            }
            self.build_pending_indexes();
            // What came in meanwhile (events queued behind a snapshot) goes first.
            queue.extend(jobs.try_iter());
            self.between_jobs(&mut queue, &jobs, &mut pace);
        }
        // Its last copy back ends before the writer's own, which empties the WAL.
        drop(self.checkpointer.take());
        if let Err(e) = self.writer.checkpoint() {
            tracing::warn!(error = %e, "checkpointing the store at shutdown failed");
        }
    }

    /// Does one job; `Break` once the writer is to stop.
    fn work(
        &mut self,
        job: Job,
        queue: &mut VecDeque<Job>,
        jobs: &mpsc::Receiver<Job>,
        pace: &mut Pace,
    ) -> ControlFlow<()> {
        match job {
            Job::ApplyFile => {
                queue.retain(|job| !matches!(job, Job::ApplyFile));
                self.check_file(&mut arriving(queue, jobs));
                pace.wrote(true);
            }
            Job::ApplyStream {
                input,
                insert_line,
                received_at,
                reply,
            } => {
                let result = self.apply(&mut arriving(queue, jobs), |writer, tee, arrivals| {
                    apply_snapshot_teed(
                        writer,
                        input,
                        insert_line,
                        Origin::Socket,
                        received_at,
                        tee,
                        Some(arrivals),
                    )
                });
                self.record(Origin::Socket, result.as_ref());
                let _ = reply.send(result);
                pace.wrote(true);
            }
            Job::Event(first) => {
                let mut batch = vec![*first];
                take_events(queue, jobs, &mut batch, MAX_EVENT_BATCH);
                self.apply_events(&batch);
                pace.wrote(false);
            }
            Job::Damage(generation) => self.damage_reported(generation),
            Job::Stop => {
                // The events answered already are applied before the writer ends.
                let left: Vec<Event> = queue
                    .drain(..)
                    .chain(jobs.try_iter())
                    .filter_map(|job| match job {
                        Job::Event(event) => Some(*event),
                        _ => None,
                    })
                    .collect();
                for batch in left.chunks(MAX_EVENT_BATCH) {
                    self.apply_events(batch);
                }
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    /// The indexes a first snapshot into an empty store was answered without, built now,
    /// after its answer and before the next job (`store::Writer::build_pending_indexes`).
    /// A failure counts as any failed write (damage replaces the store, a full disk makes
    /// the agent not ready), and is tried again no sooner than [`INDEX_RETRY`] here (the
    /// next snapshot or event tries it too, as it must).
    fn build_pending_indexes(&mut self) {
        if self.index_retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let started = Instant::now();
        match self.writer.build_pending_indexes() {
            Ok(built) => {
                self.index_retry_at = None;
                if built {
                    tracing::info!(
                        duration_ms = %format_args!("{:.1}", started.elapsed().as_secs_f64() * 1000.0),
                        "indexes built after the first snapshot"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "building the indexes failed");
                self.index_retry_at = Some(Instant::now() + INDEX_RETRY);
                self.store_failed(&e);
            }
        }
    }

    /// A reader met damage in store `generation`. Many readers may meet the same damage:
    /// one check, and none for a store replaced since, or checked sound within the minute.
    fn damage_reported(&mut self, generation: u64) {
        let recent = self
            .damage_checked
            .is_some_and(|(checked, at)| checked == generation && at.elapsed() < DAMAGE_RECHECK);
        if generation == self.health.generation() && !recent {
            self.damage_checked = Some((generation, Instant::now()));
            self.confirm_damage();
        }
        self.health.damage_looked_at();
    }

    /// What the writer does between jobs, when it is due: the WAL copied back, the cache
    /// released, expired nodes emptied, the snapshot file tried again.
    fn between_jobs(
        &mut self,
        queue: &mut VecDeque<Job>,
        jobs: &mpsc::Receiver<Job>,
        pace: &mut Pace,
    ) {
        // A WAL a reader made large is emptied once the reader leaves, writes or not.
        let wal_held = pace.last_copy.elapsed() >= COPY_BACK_EVERY && self.writer.wal_oversized();
        if queue.is_empty()
            && (wal_held
                || pace.copy_due && (pace.copy_now || pace.last_copy.elapsed() >= COPY_BACK_EVERY))
        {
            if let Some(checkpointer) = &self.checkpointer {
                checkpointer.nudge();
            }
            (pace.copy_due, pace.copy_now, pace.last_copy) = (false, false, Instant::now());
        }
        if queue.is_empty() && !pace.released && pace.last_write.elapsed() >= RELEASE_AFTER {
            if let Err(e) = self.writer.release_memory() {
                tracing::warn!(error = %e, "releasing the store's cache failed");
            }
            pace.released = true;
        }
        // Not while a snapshot waits: it may be the very one that keeps a node current
        // (a node's limit is two of its periods, and a long apply may hold it back).
        let snapshot_waits = queue
            .iter()
            .any(|job| matches!(job, Job::ApplyFile | Job::ApplyStream { .. }));
        if pace.last_expiry.elapsed() >= EXPIRY_INTERVAL && !snapshot_waits {
            self.expire();
            pace.last_expiry = Instant::now();
        }
        if queue.is_empty() && self.file_retry.is_some_and(|(at, _)| Instant::now() >= at) {
            self.check_file(&mut arriving(queue, jobs));
        }
    }

    /// Applies a run of call events in one transaction. A failed commit loses them (the
    /// switch had its answer already): logged, and the next snapshot heals what they said.
    fn apply_events(&mut self, batch: &[Event]) {
        if batch.is_empty() {
            return;
        }
        let result = self.writer.apply_events(batch);
        match result {
            Ok(changes) => {
                self.publish(std::iter::empty(), &changes);
                self.events_committed(batch, changes);
                self.write_succeeded();
            }
            Err(e) => {
                self.store_failed(&e);
                self.events.0.fetch_sub(batch.len(), Ordering::AcqRel);
                tracing::error!(error = %e, events = batch.len(), "applying call events failed; they are lost until the next snapshot");
                self.status.send_modify(|s| {
                    s.events += batch.len() as u64;
                    s.last_error = Some(format!("applying call events: {e}"));
                });
            }
        }
    }

    /// Tells live streams where a commit changed the store: `nodes` whole, and what
    /// `events` touched.
    fn publish(&self, nodes: impl Iterator<Item = i64>, events: &EventChanges) {
        let mut scope = live::Scope {
            nodes: nodes.chain(events.cleared.iter().copied()).collect(),
            ..live::Scope::default()
        };
        scope.calls = events.calls.clone();
        self.live.publish(scope);
    }

    /// Counts call events committed (on their own, or with a snapshot).
    fn events_committed(&mut self, batch: &[Event], changes: EventChanges) {
        self.events.0.fetch_sub(batch.len(), Ordering::AcqRel);
        for event in batch {
            self.metrics.event_visible(event.received.elapsed());
        }
        tracing::debug!(
            events = batch.len(),
            changed = changes.changed,
            nodes = ?changes.nodes,
            "call events applied"
        );
        self.status.send_modify(|s| {
            s.events += batch.len() as u64;
            s.last_events = Some(changes);
        });
    }

    /// Applies the snapshot file if its content is not the one applied last, with the
    /// events that come meanwhile from `arrived`.
    fn check_file(&mut self, arrived: &mut dyn FnMut(&mut Vec<Event>)) {
        let Some(path) = self.watch_path.clone() else {
            return;
        };
        match file_stamp(&path) {
            Ok(stamp) if Some(stamp) == self.applied_file => {}
            Ok(stamp) => {
                // The first look is the one at start.
                let read = if self.status.borrow().file_checks == 0 {
                    FileRead::AtStart
                } else {
                    FileRead::Changed
                };
                let result = self.apply(arrived, |writer, tee, arrivals| {
                    apply_file(writer, &path, read, tee, Some(arrivals))
                });
                self.record(Origin::File, result.as_ref());
                // A file the store could not take is tried again: its content is still
                // the newest the switch wrote. (After damage the store was replaced, and
                // the file is due at once.)
                match result {
                    Err(SnapshotError::Store(e)) if !is_damage(&e) => {
                        let wait = self
                            .file_retry
                            .map_or(FILE_RETRY, |(_, wait)| (wait * 2).min(FILE_RETRY_MAX));
                        tracing::info!(path = %path.display(), retry_in_s = wait.as_secs(), "the snapshot file will be applied again once the store takes writes");
                        self.file_retry = Some((Instant::now() + wait, wait));
                    }
                    Err(SnapshotError::Store(_)) => {}
                    _ => (self.applied_file, self.file_retry) = (Some(stamp), None),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::info!(path = %path.display(), "no snapshot file (yet)");
                self.file_retry = None;
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read the snapshot file");
                self.file_retry = None;
            }
        }
        self.status.send_modify(|s| s.file_checks += 1);
    }

    /// Applies a snapshot with `apply`, its rows copied for the relay when it is on (the
    /// copy is handed to the relay once the snapshot committed, and deleted otherwise), and
    /// the events `arrived` meanwhile in its transaction (applied on their own after it, if
    /// it did not commit).
    fn apply(
        &mut self,
        arrived: &mut dyn FnMut(&mut Vec<Event>),
        apply: impl FnOnce(
            &mut Writer,
            Option<&mut dyn Tee>,
            &mut Arrivals<'_>,
        ) -> Result<ApplyReport, SnapshotError>,
    ) -> Result<ApplyReport, SnapshotError> {
        let mut copy = self.relay.as_ref().and_then(|relay| relay.begin());
        let mut arrivals = Arrivals {
            applied: Vec::new(),
            fetch: arrived,
        };
        let result = apply(
            &mut self.writer,
            copy.as_deref_mut().map(|c| c as &mut dyn Tee),
            &mut arrivals,
        );
        let events = arrivals.applied;
        match &result {
            Ok(report) => {
                if let Some(copy) = copy {
                    copy.commit(&report.nodes, report.repeat);
                }
                // A repeat too: it may bring back the calls of a node that had expired
                // (streams read it and find nothing else changed).
                let nodes = report.nodes.iter().chain(&report.dropped).copied();
                self.publish(nodes, &report.events);
                self.events_committed(&events, report.events.clone());
                self.health.snapshot_applied();
                // A whole snapshot went in: the disk has room for bodies too.
                self.health.set_spill_failure(None);
                self.write_succeeded();
            }
            Err(e) => {
                if let SnapshotError::Store(e) = e {
                    self.store_failed(e);
                }
                self.apply_events(&events);
            }
        }
        result
    }

    /// A write failed: damage replaces the store; a full disk (or any failure to write)
    /// makes the agent not ready until a write succeeds.
    fn store_failed(&mut self, error: &rusqlite::Error) {
        if is_damage(error) {
            self.replace_store(error.to_string());
        } else {
            self.health.set_write_failure(Some(format!(
                "the store cannot be written ({error}): snapshots and call events are refused \
                 until a write succeeds"
            )));
        }
    }

    /// A write succeeded: if writes failed until now, a snapshot file that could not be
    /// applied then is tried at once.
    fn write_succeeded(&mut self) {
        if self.health.set_write_failure(None)
            && let Some((_, wait)) = self.file_retry
        {
            self.file_retry = Some((Instant::now(), wait));
        }
    }

    /// A reader found the store damaged: the writer checks it (the reader may have met
    /// a passing fault) and replaces it if SQLite agrees.
    fn confirm_damage(&mut self) {
        match self.writer.damage() {
            Ok(Some(words)) => self.replace_store(words),
            Ok(None) => tracing::warn!(
                "a reader found the store damaged, but integrity_check finds nothing; kept"
            ),
            Err(e) if is_damage(&e) => self.replace_store(e.to_string()),
            Err(e) => {
                tracing::error!(error = %e, "checking the store after a reader found it damaged failed")
            }
        }
    }

    /// Sets the damaged store aside and carries on with a new one, which the next
    /// snapshot fills (the watched file at once, if there is one).
    fn replace_store(&mut self, why: String) {
        match self.writer.replace_damaged(why) {
            Ok(aside) => {
                // Not ready before it is said: whoever reads the line sees /readyz say it.
                self.metrics.store_replaced();
                self.health
                    .replaced(replaced_line(self.writer.path(), &aside));
                tracing::error!(
                    store = %self.writer.path().display(),
                    error = %aside.why,
                    set_aside = %aside.to.display(),
                    "the store could not be read: it was set aside and a new one created; not ready until the next snapshot"
                );
                self.live.publish(live::Scope::everything());
                self.applied_file = None;
                if self.watch_path.is_some() {
                    self.file_retry = Some((Instant::now(), FILE_RETRY));
                }
            }
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "the damaged store could not be set aside; writes keep failing"
            ),
        }
    }

    /// One log line and one status update per snapshot, applied or rejected.
    fn record(&self, origin: Origin, result: Result<&ApplyReport, &SnapshotError>) {
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
                self.metrics.snapshot(source, Err(error.reason()));
                self.status.send_modify(|s| {
                    s.rejected += 1;
                    s.last_error = Some(error.to_string());
                });
            }
        }
    }

    fn expire(&mut self) {
        match self.writer.expire(SystemTime::now()) {
            Ok(nodes) if !nodes.is_empty() => {
                tracing::info!(?nodes, "silent nodes expired: their calls are gone");
                self.live.publish(live::Scope {
                    nodes: nodes.into_iter().collect(),
                    ..live::Scope::default()
                });
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "expiring silent nodes failed");
                self.store_failed(&e);
            }
        }
    }
}

/// `/readyz`'s line for a store replaced after damage.
pub fn replaced_line(store: &Path, aside: &crate::store::SetAside) -> String {
    format!(
        "the store {} could not be read ({}); it was set aside as {} and created anew: \
         waiting for the next snapshot",
        store.display(),
        aside.why,
        aside.to.display()
    )
}

/// The events that come while a snapshot applies, for its transaction: all those queued
/// next, up to the next job of another kind.
fn arriving<'a>(
    queue: &'a mut VecDeque<Job>,
    jobs: &'a mpsc::Receiver<Job>,
) -> impl FnMut(&mut Vec<Event>) + 'a {
    move |into| take_events(queue, jobs, into, usize::MAX)
}

/// Moves into `into` the call events queued next (up to `most` in it), never past a job of
/// another kind, which must apply after them. The writer does not wait for more: a run
/// forms by itself whenever events come faster than it commits, and an event alone is shown
/// at once. (Waiting 8 ms for company saved a fifth of the CPU at 500–2,000 events a second,
/// and put an idle event's p99 to the endpoint at 48 ms.)
fn take_events(
    queue: &mut VecDeque<Job>,
    jobs: &mpsc::Receiver<Job>,
    into: &mut Vec<Event>,
    most: usize,
) {
    queue.extend(jobs.try_iter());
    while into.len() < most && matches!(queue.front(), Some(Job::Event(_))) {
        if let Some(Job::Event(event)) = queue.pop_front() {
            into.push(*event);
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
