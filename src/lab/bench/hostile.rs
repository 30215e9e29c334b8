//! Issue 13's figures: the agent beside hostile clients (`bench --hostile`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;

use super::{BenchOptions, ENDPOINT, SCRAPE_TOKEN, Series, ms, tokens};
use crate::lab::agent::AgentProcess;
use crate::lab::sems::{BIG_ACCOUNT, customer_of, uuid_of};

/// How many slow readers, feed tricklers, and for how long the readers read.
const SLOW_READERS: usize = 50;
const TRICKLERS: usize = 16;
const SLOW_READ_SECONDS: u64 = 10;

/// Issue 13's figures on the large node: a period posted beside trickling feed senders,
/// and resident memory while fifty clients read the largest answer (the big account's),
/// the scrape and the metrics as slowly as a 4 KB receive buffer and 40 KB/s allow.
pub(super) fn hostile(
    options: &BenchOptions,
    base: &Path,
    large: &Series,
    add: &mut impl FnMut(&str, String, &'static str),
) -> anyhow::Result<()> {
    let agent = AgentProcess::start(&base.join("hostile"))?;
    agent.post(&large.full)?;
    let (alone, _) = agent.post(&large.period)?;
    let stop = Arc::new(AtomicBool::new(false));
    let tricklers: Vec<_> = (0..TRICKLERS)
        .map(|_| {
            let (feed, stop) = (agent.feed, stop.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut stream = TcpStream::connect(feed)?;
                stream.write_all(
                    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n\
                      INSERT INTO active_calls FORMAT JSONEachRow\n",
                )?;
                while !stop.load(Ordering::Relaxed) {
                    stream.write_all(b" ")?;
                    std::thread::sleep(Duration::from_millis(500));
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let (beside, _) = agent.post(&large.more_periods[0])?;
    stop.store(true, Ordering::Relaxed);
    for trickler in tricklers {
        let _ = trickler.join();
    }
    add(
        &format!(
            "a {}-call period posted alone / beside {TRICKLERS} trickling senders",
            options.calls
        ),
        format!("{} / {}", ms(alone), ms(beside)),
        "delayed < 1 s",
    );

    let tokens = tokens();
    let big = format!("{ENDPOINT}?account-id={}", uuid_of(BIG_ACCOUNT));
    let big_token = format!("Bearer {}", tokens[&customer_of(BIG_ACCOUNT)]);
    let scrape_token = format!("Bearer {SCRAPE_TOKEN}");
    let cases = [
        (
            format!(
                "the big account's answer ({} calls)",
                large.switch.count_in(BIG_ACCOUNT)
            ),
            big,
            big_token,
        ),
        (
            format!("the scrape ({} calls)", options.calls),
            crate::api::scrape::ACTIVE_CALLS.to_owned(),
            scrape_token,
        ),
        (
            "the metrics".to_owned(),
            crate::api::ops::METRICS.to_owned(),
            String::new(),
        ),
    ];
    wal_beside_a_slow_scrape(base, add)?;
    for (what, target, token) in cases {
        std::thread::sleep(Duration::from_secs(1));
        let before = agent.rss_mb();
        agent.reset_peak();
        let readers: Vec<_> = (0..SLOW_READERS)
            .map(|_| {
                let (api, target, token) = (agent.api, target.clone(), token.clone());
                std::thread::spawn(move || slow_read(api, &target, &token))
            })
            .collect();
        let mut statuses: std::collections::BTreeMap<String, usize> = Default::default();
        let mut read = 0u64;
        for reader in readers {
            let (status, bytes) = reader
                .join()
                .map_err(|_| anyhow::anyhow!("a reader panicked"))??;
            *statuses.entry(status).or_default() += 1;
            read += bytes;
        }
        let peak = agent.peak_mb();
        add(
            &format!(
                "{SLOW_READERS} clients reading {what} for {SLOW_READ_SECONDS} s at ≤ 40 KB/s"
            ),
            format!(
                "RSS {before:.1} MB before, peak {peak:.1} MB; answers {statuses:?}, {:.1} MB read",
                read as f64 / 1e6
            ),
            "≤ 150 MB",
        );
    }
    Ok(())
}

/// Issue 20's case: a 20k-call node posting a 3% change every second while one aggregator
/// reads the scrape at 128 KB/s for 40 s. The WAL's largest size meanwhile, and its size
/// once the reader has left.
fn wal_beside_a_slow_scrape(
    base: &Path,
    add: &mut impl FnMut(&str, String, &'static str),
) -> anyhow::Result<()> {
    const CALLS: usize = 20_000;
    const SECONDS: i64 = 40;
    let dir = base.join("hostile-wal");
    let agent = AgentProcess::start(&dir)?;
    let wal = || std::fs::metadata(dir.join("active-calls.db-wal")).map_or(0, |m| m.len());
    let mut switch = crate::lab::sems::Switch::new(7);
    let mut now = crate::clock::unix_now();
    switch.fill(CALLS, now);
    agent.post(&switch.render(now))?;
    let reader = {
        let api = agent.api;
        std::thread::spawn(move || {
            let scrape = crate::api::scrape::ACTIVE_CALLS;
            slow_read_at(
                api,
                scrape,
                &format!("Bearer {SCRAPE_TOKEN}"),
                128 * 1024,
                40,
            )
        })
    };
    let started = Instant::now();
    let mut largest = 0;
    for second in 1..=SECONDS {
        now += 1;
        switch.step(0.015, 0.015, now, 1);
        agent.post(&switch.render(now))?;
        largest = largest.max(wal());
        super::sleep_until(started + Duration::from_secs(second as u64));
    }
    let (status, read) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the reader panicked"))??;
    // The reader has left and the switch is quiet: the writer gives the WAL's disk back
    // once it has been idle for 10 s.
    let quiet = Instant::now();
    while wal() > 0 && quiet.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
    }
    add(
        &format!(
            "the WAL: {CALLS} calls, a 3% change posted every second for {SECONDS} s, one \
             scrape read at 128 KB/s"
        ),
        format!(
            "largest {:.1} MB; {:.1} MB {:.0} s after the reader left and the switch went quiet \
             (it read {:.1} MB, {status})",
            largest as f64 / 1e6,
            wal() as f64 / 1e6,
            quiet.elapsed().as_secs_f64(),
            read as f64 / 1e6
        ),
        "≤ 64 MB, given back",
    );
    Ok(())
}

/// GETs `target` over a connection with a 4 KB receive buffer and reads 4 KB every
/// 100 ms for [`SLOW_READ_SECONDS`]: the status line, and the bytes read.
fn slow_read(api: SocketAddr, target: &str, authorization: &str) -> anyhow::Result<(String, u64)> {
    slow_read_at(api, target, authorization, 40 * 1024, SLOW_READ_SECONDS)
}

/// [`slow_read`] at `bytes_per_second`, for `seconds`.
fn slow_read_at(
    api: SocketAddr,
    target: &str,
    authorization: &str,
    bytes_per_second: u64,
    seconds: u64,
) -> anyhow::Result<(String, u64)> {
    let mut stream = small_buffer_connection(api)?;
    let auth = if authorization.is_empty() {
        String::new()
    } else {
        format!("Authorization: {authorization}\r\n")
    };
    // Closed after the answer: a 503 on a kept-alive connection would leave the reader
    // waiting for the agent's idle timeout (30 s), racing its own read timeout.
    stream.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n").as_bytes(),
    )?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut buf = vec![0u8; 4096];
    let mut first = Vec::new();
    let mut total = 0u64;
    while Instant::now() < until {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if first.len() < 12 {
            first.extend_from_slice(&buf[..n.min(12)]);
        }
        total += n as u64;
        // Paced: no faster than `bytes_per_second` from the start.
        super::sleep_until(
            started + Duration::from_secs_f64(total as f64 / bytes_per_second as f64),
        );
    }
    let status = String::from_utf8_lossy(&first[..first.len().min(12)]).into_owned();
    Ok((status.trim_start_matches("HTTP/1.1 ").to_owned(), total))
}

/// A connection to `addr` whose receive buffer is 4 KB, so that the agent cannot hand a
/// large answer to the kernel and forget it (a slow reader; the tests use it too).
pub fn small_buffer_connection(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = addr else {
        bail!("the benchmark's agent listens on IPv4");
    };
    // SAFETY: a fresh socket is made, configured and connected through libc, with every
    // pointer to a value that lives across its call; its descriptor is then owned by the
    // TcpStream alone (closed on every error path before that).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let size: libc::c_int = 4096;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let connected = libc::connect(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        anyhow::ensure!(
            connected == 0,
            "connect: {}",
            std::io::Error::last_os_error()
        );
        Ok(stream)
    }
}
