//! What `/proc` says of a process: this one's, sampled at each scrape of `/metrics` for
//! the standard process series, and the benchmark's child's CPU time.

/// What `/proc/self` says of this process.
#[derive(Debug, Clone, Copy)]
pub(super) struct ProcessSample {
    pub rss_bytes: i64,
    pub cpu_seconds: f64,
    pub open_fds: i64,
    pub start_time_seconds: f64,
}

impl ProcessSample {
    pub(super) fn read() -> Option<ProcessSample> {
        // SAFETY: sysconf only reads a system constant; it takes no pointers.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page <= 0 {
            return None;
        }
        let stat = ProcStat::read("self")?;
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as i64;
        Some(ProcessSample {
            rss_bytes: stat.field(24)? as i64 * page,
            cpu_seconds: stat.cpu_seconds()?,
            open_fds,
            start_time_seconds: boot + stat.field(22)? / clock_ticks()?,
        })
    }
}

/// `/proc/<pid>/stat` of a process (`"self"`: this one), for this scrape and the
/// benchmark's measure of its child.
pub(crate) struct ProcStat {
    /// The fields after the command name, the third field (state) first.
    fields: Vec<String>,
}

impl ProcStat {
    pub(crate) fn read(pid: &str) -> Option<ProcStat> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name is in parentheses and may hold anything, spaces and ')' too.
        let rest = stat.get(stat.rfind(')')? + 1..)?;
        Some(ProcStat {
            fields: rest.split_whitespace().map(str::to_owned).collect(),
        })
    }

    /// Field `n` as proc(5) numbers them (from 1, the pid).
    fn field(&self, n: usize) -> Option<f64> {
        self.fields.get(n.checked_sub(3)?)?.parse().ok()
    }

    /// User and system CPU time of all its threads.
    pub(crate) fn cpu_seconds(&self) -> Option<f64> {
        Some((self.field(14)? + self.field(15)?) / clock_ticks()?)
    }
}

/// Clock ticks a second, the unit of `/proc/<pid>/stat`'s times.
fn clock_ticks() -> Option<f64> {
    // SAFETY: sysconf only reads a system constant; it takes no pointers.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then_some(ticks as f64)
}
