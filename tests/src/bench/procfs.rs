//! Readings from /proc and the kernel's clocks: a process's CPU time, its resident set, and its
//! children.

/// CPU seconds (user + system, every thread, the ended ones included) the process `pid` has used
/// so far; 0 if it is gone. Read from the process's CPU-time clock (`clock_getcpuclockid`), in
/// nanoseconds: `/proc/<pid>/stat` counts in 10 ms ticks, too coarse for a few hundred chunks of
/// a few tens of microseconds each. Falls back to those ticks when the clock cannot be read.
pub fn cpu_seconds(pid: u32) -> f64 {
    // A pid outside `pid_t`'s positive range names no process (0 and -1 would be this one).
    let Ok(raw) = i32::try_from(pid) else {
        return 0.0;
    };
    if raw <= 0 {
        return 0.0;
    }
    let pid_t = nix::unistd::Pid::from_raw(raw);
    if let Ok(t) = nix::time::clock_getcpuclockid(pid_t).and_then(nix::time::clock_gettime) {
        return t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9;
    }
    stat_cpu_seconds(pid)
}

/// CPU seconds from `/proc/<pid>/stat` (utime + stime of all its threads, in the kernel's fixed
/// 100 Hz `USER_HZ` ticks); 0 if it is gone.
fn stat_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let tick = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (tick(14) + tick(15)) as f64 / 100.0
}

/// Resident set size of `pid` in bytes (`VmRSS`); 0 if it is gone.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// The direct children of `pid` (from every thread's `children` list).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
                out.extend(
                    list.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The child of `pid` whose command line contains `needle` (e.g. `--as spin1`).
pub fn child_with_arg(pid: u32, needle: &str) -> Option<u32> {
    children(pid).into_iter().find(|c| {
        std::fs::read(format!("/proc/{c}/cmdline"))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .replace('\0', " ")
                    .contains(needle)
            })
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_process_has_cpu_and_memory() {
        let me = std::process::id();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i));
        }
        assert!(super::cpu_seconds(me) >= 0.0);
        assert!(super::rss_bytes(me) > 0);
        assert_eq!(super::cpu_seconds(u32::MAX), 0.0);
    }

    #[test]
    fn cpu_time_is_read_finer_than_the_tick() {
        let me = std::process::id();
        let before = super::cpu_seconds(me);
        let limit = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut after = before;
        while after == before && std::time::Instant::now() < limit {
            std::hint::black_box(0u64.wrapping_add(1));
            after = super::cpu_seconds(me);
        }
        // The first change seen is a few microseconds, not a 10 ms tick.
        assert!(
            after > before && after - before < 0.01,
            "{before} -> {after}"
        );
        // And the clock agrees with /proc's ticks.
        assert!((after - super::stat_cpu_seconds(me)).abs() < 0.05);
    }
}
