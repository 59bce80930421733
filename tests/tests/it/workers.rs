//! `workers`: the front runs as many async runtime threads as its config says, one per CPU it may
//! use when the config is silent, and its log says how many run.

use tests::front::FrontProcess;

/// The threads of `pid` named as tokio names its runtime's workers.
fn runtime_workers(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == "tokio-rt-worker")
        .count()
}

#[test]
fn the_front_runs_the_configured_workers_and_one_per_cpu_by_default() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    for (header, expected) in [("workers = 3", 3), ("", cpus), ("workers = 1", 1)] {
        let dir = tempfile::tempdir().unwrap();
        let listen = format!("unix:{}", dir.path().join("ext_proc.sock").display());
        let front = FrontProcess::start_from(
            &tests::bins::plugvisor(),
            dir.path(),
            &listen,
            header,
            "[plugins.latency]\n",
            &["latency"],
        );
        assert_eq!(
            runtime_workers(front.pid()),
            expected,
            "`{header}` on {cpus} CPUs"
        );
        // The line comes once the front has waited for its plugins, a moment after they show.
        let serving = tests::within(std::time::Duration::from_secs(10), || {
            front
                .log()
                .lines()
                .find(|l| l.contains("plugvisor front serving"))
                .map(str::to_owned)
        });
        let serving =
            serving.unwrap_or_else(|| panic!("`{header}`: no serving line: {}", front.log()));
        assert!(
            serving.contains(&format!(" workers={expected}")),
            "`{header}`: {serving}"
        );
    }
}

/// Every thread's voluntary context switches so far (`/proc/<pid>/task/*/status`): how often the
/// process went to sleep, that is, how often something woke it.
fn wake_ups(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .sum()
}

/// An idle front with no plugins, outside systemd, has nothing to do: no timer wakes it. Each
/// wake-up costs tens of microseconds of CPU on a VM, which a slow stream's chunks then pay for.
#[test]
fn an_idle_front_without_plugins_sleeps() {
    let dir = tempfile::tempdir().unwrap();
    let front = FrontProcess::start(dir.path(), "", &[]);
    // Past the start's own work (and the allocator's purging after it).
    std::thread::sleep(std::time::Duration::from_secs(2));
    let before = wake_ups(front.pid());
    std::thread::sleep(std::time::Duration::from_secs(3));
    let woken = wake_ups(front.pid()) - before;
    assert!(woken <= 3, "an idle front woke {woken} times in 3 s");
}
