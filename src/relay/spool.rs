//! The relay's spool on disk: where a snapshot waits, compressed, until each URL took it.
//!
//! ```text
//! spool_dir/incoming/<seq>.jsonl                 rows being copied by the feed's reader thread
//! spool_dir/pending/<seq>.<token>.jsonl          committed, raw, waiting for the spooler
//! spool_dir/<url-key>/<seq>.<token>.jsonl.gz     compressed, waiting for that URL's sender
//! spool_dir/<url-key>/url                        which URL the folder is for (for humans)
//! ```
//!
//! Each step is a rename or a hard link, so a crash at any point leaves every snapshot in
//! exactly one of these states, and the next start resumes from there:
//!
//! * `incoming`: the snapshot was never committed to the store (or the commit was not yet
//!   announced): deleted at start. The file source re-reads its file at start anyway.
//! * `pending`: committed but not yet compressed, or compressed and linked only into some
//!   URL folders: compressed again and linked where it is missing (a link that exists is
//!   whole, since it is made only after the compressed file is synced). Its name carries
//!   the hash of its rows, checked while compressing: after a power loss a file the
//!   kernel had not yet written back is dropped, never sent cut short.
//! * a URL folder: compressed and synced; its sender deletes it once ClickHouse took it.
//!
//! The name's `<seq>` orders snapshots (zero-padded, so names sort like numbers; it goes
//! on from the largest found at start), and `<token>` is the ClickHouse deduplication
//! token, so that everything a sender needs is in the name. The raw copy is written by the
//! reader thread, not the writer, and without compression or sync: the writer's only added
//! work is a rename per snapshot. Compressing (about a second per 100k calls) and syncing
//! happen on the spooler thread, which nobody waits for.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::SystemTime;

use tokio::sync::mpsc::UnboundedSender;
use xxhash_rust::xxh3::Xxh3Default;

use crate::feed::Tee;
use crate::metrics::RelayMetrics;

pub const INCOMING: &str = "incoming";
pub const PENDING: &str = "pending";
const RAW: &str = ".jsonl";
pub const COMPRESSED: &str = ".jsonl.gz";
const PARTIAL: &str = ".jsonl.gz.tmp";
/// The file in a URL folder that names its URL.
pub const URL_FILE: &str = "url";

/// Node ids a token names at most; past them it says `etc` (the hash covers every row).
const TOKEN_NODES: usize = 8;

/// A spooled snapshot's name: its order and its deduplication token.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SpoolName {
    pub seq: u64,
    pub token: String,
}

impl SpoolName {
    /// `<seq>.<token>` with `suffix` (one of the spool's extensions) after it.
    pub fn file_name(&self, suffix: &str) -> String {
        format!("{:020}.{}{suffix}", self.seq, self.token)
    }

    /// The name of a file with `suffix`, if it is one of the spool's.
    pub fn parse(file_name: &str, suffix: &str) -> Option<SpoolName> {
        let stem = file_name.strip_suffix(suffix)?;
        let (seq, token) = stem.split_once('.')?;
        let valid = seq.len() == 20
            && seq.bytes().all(|b| b.is_ascii_digit())
            && !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        Some(SpoolName {
            seq: seq.parse().ok().filter(|_| valid)?,
            token: token.to_owned(),
        })
    }

    /// The hash of the rows, as the token carries it.
    fn hash(&self) -> Option<u128> {
        let (_, hex) = self.token.rsplit_once('-')?;
        u128::from_str_radix(hex, 16).ok()
    }
}

/// ClickHouse's `insert_deduplication_token` for a snapshot of `nodes` whose rows hash to
/// `hash`: `n1_2-<xxh3_128 hex>`. It depends on the rows alone (the same file applied
/// again at a restart gets the same token, and ClickHouse stores it once); the node ids
/// are there for a human reading `system.part_log` or the spool.
pub fn token(nodes: &[i64], hash: u128) -> String {
    let mut names: Vec<String> = nodes.iter().take(TOKEN_NODES).map(i64::to_string).collect();
    if nodes.len() > TOKEN_NODES {
        names.push("etc".into());
    }
    // A negative node id would put a `-` where the hash is looked for.
    let names = names.join("_").replace('-', "m");
    format!("n{names}-{hash:032x}")
}

/// The writer's side of the spool: where a snapshot's rows are copied while it applies,
/// and how a committed one is handed to the spooler. Cheap to clone.
#[derive(Clone)]
pub struct SpoolHandle {
    shared: Arc<Shared>,
}

struct Shared {
    incoming: PathBuf,
    pending: PathBuf,
    next_seq: AtomicU64,
    wake: mpsc::Sender<Wake>,
    /// Every URL's metrics: a snapshot lost before it reached the URL folders counts as
    /// dropped for each.
    urls: Vec<RelayMetrics>,
}

/// What the spooler thread is told.
pub enum Wake {
    /// A snapshot is pending.
    Pending,
    Stop,
}

impl SpoolHandle {
    pub(super) fn new(
        root: &Path,
        first_seq: u64,
        wake: mpsc::Sender<Wake>,
        urls: Vec<RelayMetrics>,
    ) -> SpoolHandle {
        SpoolHandle {
            shared: Arc::new(Shared {
                incoming: root.join(INCOMING),
                pending: root.join(PENDING),
                next_seq: AtomicU64::new(first_seq),
                wake,
                urls,
            }),
        }
    }

    /// A new copy for the snapshot about to apply; `None` (logged and counted) when the
    /// spool cannot take it: the snapshot still applies, it is only not relayed.
    pub fn begin(&self) -> Option<Incoming> {
        let seq = self.shared.next_seq.fetch_add(1, Ordering::Relaxed);
        let path = self.shared.incoming.join(format!("{seq:020}{RAW}"));
        match File::create(&path) {
            Ok(file) => Some(Incoming {
                path,
                seq,
                file: BufWriter::with_capacity(1 << 20, file),
                hasher: Xxh3Default::new(),
                error: None,
                has_rows: false,
                at_line_start: true,
                handed_over: false,
            }),
            Err(e) => {
                self.lost(&format!("creating {}: {e}", path.display()));
                None
            }
        }
    }

    /// Hands the copy of a committed snapshot of `nodes` to the spooler: a rename and a
    /// message, nothing that waits. A snapshot without a single row is not relayed (there
    /// is nothing to insert).
    pub fn commit(&self, mut incoming: Incoming, nodes: &[i64]) {
        let hash = match incoming.finish() {
            Ok(Some(hash)) => hash,
            Ok(None) => return, // dropping it deletes the file
            Err(e) => {
                self.lost(&format!("writing {}: {e}", incoming.path.display()));
                return;
            }
        };
        let name = SpoolName {
            seq: incoming.seq,
            token: token(nodes, hash),
        };
        let pending = self.shared.pending.join(name.file_name(RAW));
        match std::fs::rename(&incoming.path, &pending) {
            Ok(()) => {
                incoming.handed_over = true;
                let _ = self.shared.wake.send(Wake::Pending);
            }
            Err(e) => self.lost(&format!(
                "moving {} to {PENDING}: {e}",
                incoming.path.display()
            )),
        }
    }

    fn lost(&self, error: &str) {
        tracing::error!(%error, "snapshot applied but not relayed: the spool could not take it");
        for url in &self.shared.urls {
            url.dropped.inc();
        }
    }
}

/// The copy of one snapshot's rows, written by the feed's reader thread as it reads them.
/// Dropped without [`SpoolHandle::commit`] (the snapshot was rejected), its file goes.
pub struct Incoming {
    path: PathBuf,
    seq: u64,
    file: BufWriter<File>,
    hasher: Xxh3Default,
    /// The first write error: later bytes are not written, and the copy is not relayed.
    error: Option<io::Error>,
    has_rows: bool,
    at_line_start: bool,
    handed_over: bool,
}

impl Tee for Incoming {
    fn copy(&mut self, bytes: &[u8]) {
        if self.error.is_some() || bytes.is_empty() {
            return;
        }
        self.has_rows = self.has_rows || !bytes.trim_ascii().is_empty();
        self.at_line_start = bytes.ends_with(b"\n");
        self.hasher.update(bytes);
        if let Err(e) = self.file.write_all(bytes) {
            self.error = Some(e);
        }
    }
}

impl Incoming {
    /// Ends the last line and flushes: the hash of what was written, `None` when it holds
    /// no row.
    fn finish(&mut self) -> io::Result<Option<u128>> {
        if !self.at_line_start {
            self.copy(b"\n");
        }
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        self.file.flush()?;
        Ok(self.has_rows.then(|| self.hasher.digest128()))
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.handed_over {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A snapshot newly in a URL folder, for its sender.
#[derive(Debug)]
pub struct Spooled {
    pub name: SpoolName,
    pub bytes: u64,
    pub at: SystemTime,
}

/// A URL folder as the spooler sees it.
pub struct UrlFolder {
    pub dir: PathBuf,
    pub news: UnboundedSender<Spooled>,
    pub metrics: RelayMetrics,
}

/// Why a pending snapshot did not reach the URL folders.
#[derive(Debug, thiserror::Error)]
enum SpoolError {
    #[error("its rows do not match their hash (cut short by a crash?)")]
    Torn,
    #[error("stopping")]
    Stopped,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The spooler thread's niceness: the lowest priority there is.
const SPOOLER_NICENESS: i32 = 19;

/// The spooler thread: compresses each pending snapshot once, links it into every URL
/// folder, and tells the senders. Runs until [`Wake::Stop`] (or `stopping`, checked
/// between chunks, so a stop does not wait for a large file).
pub struct Spooler {
    pub pending: PathBuf,
    pub urls: Vec<UrlFolder>,
    pub stopping: Arc<AtomicBool>,
}

impl Spooler {
    pub fn run(self, wake: mpsc::Receiver<Wake>) {
        // Below the writer too: compressing a 100k-call snapshot takes seconds of a core,
        // and the next snapshot's apply (which a switch or a customer waits on) must not
        // share the second core with it.
        crate::feed::writer::set_niceness(SPOOLER_NICENESS);
        loop {
            self.spool_pending();
            let Ok(first) = wake.recv() else { return };
            // Many wakes while busy are one pass over the folder.
            if std::iter::once(first)
                .chain(wake.try_iter())
                .any(|w| matches!(w, Wake::Stop))
            {
                return;
            }
        }
    }

    fn spool_pending(&self) {
        let mut names = match list(&self.pending, RAW) {
            Ok(names) => names,
            Err(e) => {
                tracing::error!(
                    dir = %self.pending.display(),
                    error = %e,
                    "cannot list the relay's pending snapshots"
                );
                return;
            }
        };
        names.sort();
        for name in names {
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            let raw = self.pending.join(name.file_name(RAW));
            match self.spool_one(&raw, &name) {
                Ok(()) => {}
                Err(SpoolError::Stopped) => return,
                Err(e) => {
                    tracing::error!(
                        file = %raw.display(),
                        error = %e,
                        "snapshot dropped before the relay could spool it"
                    );
                    for url in &self.urls {
                        url.metrics.dropped.inc();
                    }
                    let _ = std::fs::remove_file(&raw);
                    let _ = std::fs::remove_file(self.pending.join(name.file_name(PARTIAL)));
                }
            }
        }
    }

    fn spool_one(&self, raw: &Path, name: &SpoolName) -> Result<(), SpoolError> {
        let partial = self.pending.join(name.file_name(PARTIAL));
        // A partial file of an earlier run may be linked already: never write into it.
        remove_if_exists(&partial)?;
        let bytes = self.compress(raw, &partial, name.hash())?;
        let file_name = name.file_name(COMPRESSED);
        for url in &self.urls {
            match std::fs::hard_link(&partial, url.dir.join(&file_name)) {
                Ok(()) => {}
                // Linked before a crash: that link is whole (made after the sync).
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e.into()),
            }
        }
        for url in &self.urls {
            File::open(&url.dir)?.sync_all()?;
        }
        let at = SystemTime::now();
        for url in &self.urls {
            let _ = url.news.send(Spooled {
                name: name.clone(),
                bytes,
                at,
            });
        }
        std::fs::remove_file(raw)?;
        std::fs::remove_file(&partial)?;
        Ok(())
    }

    /// Gzips `raw` into `partial` and syncs it, checking the rows against `hash`.
    /// Returns the compressed size.
    fn compress(&self, raw: &Path, partial: &Path, hash: Option<u128>) -> Result<u64, SpoolError> {
        let mut input = BufReader::with_capacity(1 << 20, File::open(raw)?);
        let output = BufWriter::with_capacity(1 << 18, File::create(partial)?);
        // Fast compression: ~5x smaller for these rows, at a fraction of the CPU of the
        // default level, on a host whose CPU belongs to the switch.
        let mut gzip = flate2::write::GzEncoder::new(output, flate2::Compression::fast());
        let mut hasher = Xxh3Default::new();
        let mut chunk = vec![0; 1 << 20];
        loop {
            if self.stopping.load(Ordering::Relaxed) {
                return Err(SpoolError::Stopped);
            }
            let n = input.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            hasher.update(&chunk[..n]);
            gzip.write_all(&chunk[..n])?;
        }
        if hash != Some(hasher.digest128()) {
            return Err(SpoolError::Torn);
        }
        let file = gzip.finish()?.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(file.metadata()?.len())
    }
}

/// The spool names with `suffix` in `dir`, unsorted; other files are ignored.
pub fn list(dir: &Path, suffix: &str) -> io::Result<Vec<SpoolName>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(name) = entry
            .file_name()
            .to_str()
            .and_then(|n| SpoolName::parse(n, suffix))
        {
            names.push(name);
        }
    }
    Ok(names)
}

/// Prepares `root` at start: creates the folders, deletes what a crash or a stop left
/// half-done in `incoming` and `pending`, and returns the first free sequence number.
pub fn prepare(root: &Path, url_dirs: &[PathBuf]) -> io::Result<u64> {
    let incoming = root.join(INCOMING);
    let pending = root.join(PENDING);
    for dir in [&incoming, &pending].into_iter().chain(url_dirs) {
        std::fs::create_dir_all(dir)?;
    }
    let mut discarded = 0;
    for entry in std::fs::read_dir(&incoming)? {
        std::fs::remove_file(entry?.path())?;
        discarded += 1;
    }
    if discarded > 0 {
        tracing::info!(
            discarded,
            "relay: discarded copies of snapshots that were not committed (a stop or a crash mid-apply)"
        );
    }
    let mut last = 0;
    for entry in std::fs::read_dir(&pending)? {
        let entry = entry?;
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        if file_name.ends_with(PARTIAL) {
            std::fs::remove_file(entry.path())?;
        } else if let Some(name) = SpoolName::parse(&file_name, RAW) {
            last = last.max(name.seq);
        }
    }
    for dir in url_dirs {
        last = list(dir, COMPRESSED)?
            .iter()
            .map(|n| n.seq)
            .fold(last, u64::max);
    }
    Ok(last + 1)
}

pub(super) fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sort_like_numbers() {
        let a = SpoolName {
            seq: 9,
            token: token(&[1, 2], 0xabc),
        };
        let b = SpoolName {
            seq: 10,
            token: token(&[1], 1),
        };
        let (fa, fb) = (a.file_name(COMPRESSED), b.file_name(COMPRESSED));
        assert!(fa < fb, "{fa} {fb}");
        assert_eq!(SpoolName::parse(&fa, COMPRESSED), Some(a.clone()));
        assert_eq!(a.hash(), Some(0xabc));
        assert_eq!(SpoolName::parse(&fa, RAW), None);
        assert_eq!(SpoolName::parse("url", COMPRESSED), None);
        assert_eq!(SpoolName::parse("1.x.jsonl.gz", COMPRESSED), None);
        assert_eq!(
            SpoolName::parse(&a.file_name(PARTIAL), COMPRESSED),
            None,
            "a partial file is not a spooled one"
        );
    }

    /// A spool over a temporary folder with one URL folder, as a restart finds it.
    fn spool_with(
        files: &[(&str, &[u8])],
    ) -> (
        tempfile::TempDir,
        Spooler,
        tokio::sync::mpsc::UnboundedReceiver<Spooled>,
        u64,
    ) {
        let root = tempfile::tempdir().unwrap();
        let url_dir = root.path().join("u");
        std::fs::create_dir_all(root.path().join(PENDING)).unwrap();
        std::fs::create_dir_all(root.path().join(INCOMING)).unwrap();
        for (name, content) in files {
            std::fs::write(root.path().join(name), content).unwrap();
        }
        let first_seq = prepare(root.path(), std::slice::from_ref(&url_dir)).unwrap();
        let (news, news_rx) = tokio::sync::mpsc::unbounded_channel();
        let spooler = Spooler {
            pending: root.path().join(PENDING),
            urls: vec![UrlFolder {
                dir: url_dir,
                news,
                metrics: crate::metrics::Metrics::new().relay("http://ch:8123/"),
            }],
            stopping: Arc::new(AtomicBool::new(false)),
        };
        (root, spooler, news_rx, first_seq)
    }

    #[test]
    fn a_restart_finishes_what_a_crash_left_and_drops_what_it_tore() {
        let rows = b"{\"node_id\":1}\n";
        let whole = SpoolName {
            seq: 7,
            token: token(&[1], xxhash_rust::xxh3::xxh3_128(rows)),
        };
        let torn = SpoolName {
            seq: 8,
            token: token(
                &[1],
                xxhash_rust::xxh3::xxh3_128(b"{\"node_id\":1}\n{\"x\""),
            ),
        };
        let pending = |n: &SpoolName, suffix| format!("{PENDING}/{}", n.file_name(suffix));
        let (root, spooler, mut news, first_seq) = spool_with(&[
            (&format!("{INCOMING}/00000000000000000009.jsonl"), b"{\"cut"),
            (&pending(&whole, RAW), rows),
            // A crash mid-compress left a partial file.
            (&pending(&whole, PARTIAL), b"garbage"),
            (&pending(&torn, RAW), b"{\"node_id\":1}\n"),
        ]);
        assert_eq!(first_seq, 9, "numbers go on after the largest pending one");
        assert_eq!(
            std::fs::read_dir(root.path().join(INCOMING))
                .unwrap()
                .count(),
            0
        );
        spooler.spool_pending();

        let linked = spooler.urls[0].dir.join(whole.file_name(COMPRESSED));
        let mut text = String::new();
        flate2::read::GzDecoder::new(File::open(&linked).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text.as_bytes(), rows);
        let spooled = news.try_recv().unwrap();
        assert_eq!(
            (spooled.name, spooled.bytes),
            (whole.clone(), linked.metadata().unwrap().len())
        );
        assert!(news.try_recv().is_err(), "the torn one is not announced");
        assert_eq!(spooler.urls[0].metrics.dropped.get(), 1);
        assert_eq!(
            std::fs::read_dir(root.path().join(PENDING))
                .unwrap()
                .count(),
            0,
            "pending is empty"
        );

        // The same snapshot pending again (a crash after linking): the link stays.
        std::fs::write(root.path().join(pending(&whole, RAW)), rows).unwrap();
        spooler.spool_pending();
        assert_eq!(news.try_recv().unwrap().name, whole);
        assert!(linked.exists());
    }

    #[test]
    fn tokens_name_the_nodes_and_the_hash() {
        assert_eq!(token(&[7], 0xff), format!("n7-{:032x}", 0xff));
        assert_eq!(token(&[], 1), format!("n-{:032x}", 1));
        let many: Vec<i64> = (1..=10).collect();
        assert!(token(&many, 1).starts_with("n1_2_3_4_5_6_7_8_etc-"));
        let negative = token(&[-3], 5);
        assert_eq!(
            SpoolName {
                seq: 1,
                token: negative
            }
            .hash(),
            Some(5)
        );
    }
}
