//! The floor of a posted snapshot: the same bytes, posted by the same client, to a sink
//! that only reads them and answers 200. Nothing can take a snapshot faster than that on
//! the machine the bench runs on, so an apply's time divided by it (its multiple) is the
//! figure that survives from one day to the next on a shared machine, where seconds do not.
//!
//! The sink runs in the bench process, on a thread of its own, and costs what reading a
//! socket costs: a fixed buffer, no parsing past the head.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::Context;

use crate::lab::client::curl_post_snapshot;

/// How many posts a floor is the median of.
const POSTS: usize = 5;

/// A sink on a loopback port, until the bench ends.
pub(super) struct Floor {
    addr: SocketAddr,
}

impl Floor {
    pub(super) fn start() -> anyhow::Result<Floor> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        std::thread::Builder::new()
            .name("bench-floor".into())
            .spawn(move || {
                for stream in listener.incoming().map_while(Result::ok) {
                    std::thread::spawn(move || {
                        if let Err(e) = sink(stream) {
                            eprintln!("the floor's sink: {e:#}");
                        }
                    });
                }
            })?;
        Ok(Floor { addr })
    }

    /// The median time of posting `body` to the sink, as the bench posts it to the agent
    /// ([`curl_post_snapshot`]).
    pub(super) fn of(&self, body: &[u8]) -> anyhow::Result<Duration> {
        let mut times = Vec::with_capacity(POSTS);
        for _ in 0..POSTS {
            times.push(curl_post_snapshot(self.addr, body)?);
        }
        times.sort();
        Ok(times[POSTS / 2])
    }
}

/// An apply's time as a multiple of its floor: `2.4× the floor (270 ms)`.
pub(super) fn multiple(took: Duration, floor: Duration) -> String {
    format!(
        "{:.2}× the floor ({:.0} ms)",
        took.as_secs_f64() / floor.as_secs_f64().max(1e-9),
        floor.as_secs_f64() * 1000.0
    )
}

/// Answers one connection's posts: reads each body whole, then `200`.
fn sink(stream: TcpStream) -> anyhow::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(256 * 1024, stream);
    let mut buffer = vec![0u8; 256 * 1024];
    let mut line = String::new();
    loop {
        let (mut length, mut expect) = (0u64, false);
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(()); // the client closed it
        }
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').context("a header without ':'")?;
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse()?;
            } else if name.eq_ignore_ascii_case("expect") {
                expect = true;
            }
        }
        if expect {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        while length > 0 {
            let want = buffer
                .len()
                .min(usize::try_from(length).unwrap_or(usize::MAX));
            let read = reader.read(&mut buffer[..want])?;
            anyhow::ensure!(read > 0, "the body ended early");
            length -= read as u64;
        }
        writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")?;
    }
}
