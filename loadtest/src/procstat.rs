//! CPU and memory of the broker (from /proc) and of this process (getrusage).

use std::fs;

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// utime + stime, seconds.
    pub cpu_s: f64,
    pub rss_kib: u64,
}

pub struct Broker {
    pid: u32,
    ticks_per_s: f64,
}

impl Broker {
    pub fn new(pid: u32) -> Broker {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Broker { pid, ticks_per_s: if ticks > 0 { ticks as f64 } else { 100.0 } }
    }

    /// `None` when the process is gone or /proc cannot be read.
    pub fn sample(&self) -> Option<Sample> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces:
        // state is field 3, utime field 14, stime field 15 (proc(5)).
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Some(Sample { cpu_s: (utime + stime) as f64 / self.ticks_per_s, rss_kib })
    }
}

/// This process's user + system CPU seconds so far.
pub fn self_cpu_s() -> f64 {
    // SAFETY: an all-zero rusage is valid; getrusage only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Raises the open-file limit to its hard maximum: each connection is a descriptor.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: plain get/setrlimit on a valid struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
        lim.rlim_cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_own_process() {
        let s = Broker::new(std::process::id()).sample().expect("/proc/self readable");
        assert!(s.rss_kib > 0);
        assert!(s.cpu_s >= 0.0);
    }
}
