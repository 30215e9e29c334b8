//! Writes what a simulated yeti node sends, for checks outside the Rust tests (the real
//! ClickHouse check, `scripts/clickhouse-check`): consecutive snapshots in SEMS's bytes
//! (`sems::Switch`, one 5-second period apart) and the directory of its accounts.
//!
//! `cargo run --release --example switch -- DIR [calls] [snapshots] [seed]`
//! (default 2,000 calls, 8 snapshots, seed 1) writes `DIR/directory.json` and
//! `DIR/snapshot-1.jsonl` … `DIR/snapshot-<snapshots>.jsonl`, each with its `INSERT` line,
//! the first at the current second (aligned to the period).

use std::path::PathBuf;

use active_calls_agent::lab::sems::{self, Switch};

const PERIOD: i64 = 5;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: switch DIR [calls] [snapshots] [seed]";
    let dir = PathBuf::from(args.next().ok_or_else(|| anyhow::anyhow!(usage))?);
    let mut number = |default: u64| -> anyhow::Result<u64> {
        args.next()
            .map_or(Ok(default), |a| a.parse())
            .map_err(|_| anyhow::anyhow!(usage))
    };
    let (calls, snapshots, seed) = (number(2000)?, number(8)?, number(1)?);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("directory.json"), sems::directory_json())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let mut at = now - now % PERIOD;
    let mut switch = Switch::new(seed);
    switch.fill(calls as usize, at);
    for i in 1..=snapshots {
        if i > 1 {
            at += PERIOD;
            switch.period(at, PERIOD);
        }
        std::fs::write(dir.join(format!("snapshot-{i}.jsonl")), switch.render(at))?;
    }
    Ok(())
}
