//! A posted body handed to the writer while it is still arriving: the pieces hyper reads
//! go through a short queue to the writer's reader thread, so that receiving and applying
//! overlap, and the body is never copied anywhere else.
//!
//! Why it is bounded twice: the queue holds at most [`PIECES`] pieces (hyper's reads, up
//! to a few hundred KB each), so memory does not grow when the writer is the slower side;
//! and the writer may wait for the sender at most its budget in all, summed over the whole
//! body: [`WAIT_BASE`], and [`WAIT_PER_64_MIB`] for each 64 MiB the body declares (a
//! sender keeping 64 MB/s never meets it; libcurl over loopback gives GB/s), so that a
//! sender that slows down once it is being applied holds every other snapshot and event
//! for no longer than that. Past it the reader fails with [`Stalled`], the apply rolls
//! back, and the socket source refuses the post (503, to be sent again) and receives the
//! next ones whole before applying them (`socket::Direct`).

use std::io::{BufRead, Read};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, Instant};

use hyper::body::{Buf, Bytes};
use tokio::sync::Notify;

/// Pieces queued between the receiving task and the writer's reader. Each holds one of
/// hyper's read buffers (up to a few hundred KB): sixteen of them were ~9 MB at an apply's
/// peak (heaptrack), and eight apply as fast.
const PIECES: usize = 8;
/// How long, in all, the writer may wait for the rest of a body it applies as it arrives:
/// this, and [`WAIT_PER_64_MIB`] more for each 64 MiB of it.
pub const WAIT_BASE: Duration = Duration::from_secs(1);
pub const WAIT_PER_64_MIB: Duration = Duration::from_secs(1);

/// The body stopped coming while it was being applied: the writer waited its budget for
/// it.
#[derive(Debug, thiserror::Error)]
#[error("the body came too slowly to be applied as it arrived (the store waited {0:?} for it)")]
pub struct Stalled(Duration);

/// What the receiving task sends: the body's bytes, then how it ended.
enum Piece {
    Data(Bytes),
    End,
    /// It could not be received whole; the reader fails with this error.
    Failed(std::io::Error),
}

/// The receiving task's end.
pub struct PipeSender {
    queue: SyncSender<Piece>,
    space: Arc<Notify>,
}

/// The writer's end: a [`BufRead`] over the body, from its first received bytes on.
pub struct PipeReader {
    queue: Receiver<Piece>,
    space: Arc<Notify>,
    current: Bytes,
    ended: bool,
    waited: Duration,
    budget: Duration,
}

/// A pipe for a body of `declared` bytes whose reader starts with `first` (what was
/// received before the body was handed over).
pub fn pipe(first: Vec<u8>, declared: u64) -> (PipeSender, PipeReader) {
    let budget = WAIT_BASE + WAIT_PER_64_MIB.mul_f64(declared as f64 / (64 << 20) as f64);
    let (queue, receiver) = std::sync::mpsc::sync_channel(PIECES);
    let space = Arc::new(Notify::new());
    let sender = PipeSender {
        queue,
        space: space.clone(),
    };
    let reader = PipeReader {
        queue: receiver,
        space,
        current: Bytes::from(first),
        ended: false,
        waited: Duration::ZERO,
        budget,
    };
    (sender, reader)
}

/// The reader is gone: the apply ended (done, refused, or stalled).
#[derive(Debug)]
pub struct ReaderGone;

impl PipeSender {
    /// Queues `data`, waiting while the queue is full.
    pub async fn send(&self, data: Bytes) -> Result<(), ReaderGone> {
        self.put(Piece::Data(data)).await
    }

    /// Tells the reader the body is whole.
    pub async fn end(self) -> Result<(), ReaderGone> {
        self.put(Piece::End).await
    }

    /// Tells the reader the body could not be received, and why.
    pub async fn fail(self, error: std::io::Error) {
        let _ = self.put(Piece::Failed(error)).await;
    }

    async fn put(&self, mut piece: Piece) -> Result<(), ReaderGone> {
        loop {
            // Registered before trying, so a read between the try and the wait is not missed
            // (a notification without a waiter is kept for the next one).
            let space = self.space.notified();
            match self.queue.try_send(piece) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(back)) => piece = back,
                Err(TrySendError::Disconnected(_)) => return Err(ReaderGone),
            }
            space.await;
        }
    }
}

impl PipeReader {
    /// The next piece, waiting for it within what is left of the budget.
    fn next_piece(&mut self) -> std::io::Result<Piece> {
        let piece = match self.queue.try_recv() {
            Ok(piece) => piece,
            Err(TryRecvError::Disconnected) => return Err(cut()),
            Err(TryRecvError::Empty) => {
                let started = Instant::now();
                let left = self.budget.saturating_sub(self.waited);
                let piece = self.queue.recv_timeout(left);
                self.waited += started.elapsed();
                match piece {
                    Ok(piece) => piece,
                    Err(RecvTimeoutError::Timeout) => {
                        return Err(std::io::Error::other(Stalled(self.waited)));
                    }
                    Err(RecvTimeoutError::Disconnected) => return Err(cut()),
                }
            }
        };
        self.space.notify_one();
        Ok(piece)
    }
}

impl Drop for PipeReader {
    /// Wakes a sender waiting for room, which then finds the reader gone.
    fn drop(&mut self) {
        self.space.notify_one();
    }
}

/// The receiving task went away without saying how the body ended.
fn cut() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the body was cut short")
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for PipeReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.current.is_empty() && !self.ended {
            match self.next_piece()? {
                Piece::Data(data) => self.current = data,
                Piece::End => self.ended = true,
                Piece::Failed(error) => return Err(error),
            }
        }
        Ok(&self.current)
    }

    fn consume(&mut self, amount: usize) {
        self.current.advance(amount);
    }
}

/// Whether `error` (as the apply reports it) is a [`Stalled`] body.
pub fn is_stalled(error: &std::io::Error) -> bool {
    error.get_ref().is_some_and(|e| e.is::<Stalled>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    #[test]
    fn the_reader_gets_the_first_bytes_then_the_pieces_in_order() {
        let (sender, mut reader) = pipe(b"first\n".to_vec(), 1 << 20);
        let rt = runtime();
        let read = std::thread::spawn(move || {
            let mut text = String::new();
            reader.read_to_string(&mut text).map(|_| text)
        });
        rt.block_on(async {
            for i in 0..100 {
                sender.send(Bytes::from(format!("line {i}\n"))).await.ok();
            }
            sender.end().await.ok();
        });
        let text = read.join().expect("the reader").expect("the body");
        assert!(text.starts_with("first\nline 0\nline 1\n"));
        assert!(text.ends_with("line 99\n"));
    }

    #[test]
    fn a_sender_that_stops_costs_the_reader_its_budget_then_an_error() {
        let (sender, mut reader) = pipe(b"x".to_vec(), 32 << 20);
        let started = Instant::now();
        let mut text = String::new();
        let error = reader.read_to_string(&mut text).expect_err("stalled");
        assert!(is_stalled(&error), "{error}");
        assert!(started.elapsed() >= WAIT_BASE + WAIT_PER_64_MIB / 2);
        drop(sender);
    }

    #[test]
    fn a_failure_reaches_the_reader_and_a_gone_reader_reaches_the_sender() {
        let (sender, mut reader) = pipe(Vec::new(), 0);
        let rt = runtime();
        rt.block_on(sender.fail(std::io::Error::other("too large")));
        let error = reader.read(&mut [0; 8]).expect_err("failed");
        assert_eq!(error.to_string(), "too large");
        let (sender, reader) = pipe(Vec::new(), 0);
        drop(reader);
        assert!(rt.block_on(sender.send(Bytes::from_static(b"x"))).is_err());
    }
}
