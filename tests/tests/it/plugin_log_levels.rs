//! A spawned plugin's log records as the real `plugvisor` forwards them: the plugin's level
//! becomes the record's level, the plugin and pid are fields, and only the front's timestamp is
//! on the line.

use std::time::Duration;

use supervisor::shell::control::{self, Request};
use tests::front::FrontProcess;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_warning_is_logged_by_the_front_at_warn_once_with_plugin_and_pid() {
    let dir = tempfile::tempdir().unwrap();
    // test-hang without a marker warns at start that it will never hang.
    let front = FrontProcess::start(dir.path(), "[plugins.test-hang]\n", &["test-hang"]);
    let answer = control::request(&front.control_socket(), &Request::Status)
        .await
        .unwrap();
    let pid = answer.plugins.unwrap()[0].pid.expect("spawned pid");

    let lines = tests::eventually_async(
        "the warning in the log",
        Duration::from_secs(10),
        async || {
            let log = front.log();
            let lines: Vec<String> = log
                .lines()
                .filter(|l| l.contains("it will never hang"))
                .map(str::to_owned)
                .collect();
            if lines.is_empty() {
                Err(log)
            } else {
                Ok(lines)
            }
        },
    )
    .await;
    assert_eq!(lines.len(), 1, "{}", front.log());
    let line = &lines[0];
    assert!(line.contains(" WARN "), "{line}");
    assert_eq!(line.matches("WARN").count(), 1, "one level: {line}");
    assert!(!line.contains(" INFO "), "{line}");
    // One timestamp: the front's, at the start of the line (years 20xx).
    assert_eq!(
        line.split_whitespace()
            .filter(|w| w.len() >= 20 && w.starts_with("20") && w.contains('T'))
            .count(),
        1,
        "one timestamp: {line}"
    );
    assert!(line.contains("plugin=test-hang"), "{line}");
    assert!(line.contains(&format!("pid={pid}")), "{line}");
    // The plugin's own prefix is gone; the front's fields carry who spoke.
    assert_eq!(line.matches("plugin=test-hang").count(), 1, "{line}");
}
