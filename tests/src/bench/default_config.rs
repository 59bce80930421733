//! The embedded default configuration (`supervisor::config::DEFAULT_CONFIG`, what `plugvisor`
//! runs without `--config`) as the benchmark runs it: the text verbatim, except that every
//! `127.0.0.1:<port>` in it moves to a free port (a run must not take the real 9002/9003, which
//! other fronts on this host may hold), a `runtime_dir` of the run's own is put first, and, for the
//! Unix-socket twin, the top-level `listen` names a socket. Whatever the default grows (another
//! plugin, another address) is measured as it is.

use std::path::Path;

/// One rendering of the default config.
#[derive(Debug, Clone)]
pub struct DefaultConfig {
    /// The config file's text.
    pub text: String,
    /// Its ext_proc listener, as the config writes it (`ip:port` or `unix:/path`).
    pub listen: String,
    /// Its admin port (`/metrics`).
    pub admin_port: u16,
    /// Its plugins, in file order.
    pub plugins: Vec<String>,
}

/// The default config with its own ports and `runtime_dir`; `unix` moves the listener to that
/// socket.
pub fn render(runtime_dir: &Path, unix: Option<&Path>) -> DefaultConfig {
    let parsed = supervisor::Config::default_config().expect("the embedded default parses");
    let mut text = String::new();
    let mut ports: Vec<(String, String)> = Vec::new();
    let mut in_table = false;
    let mut listen = String::new();
    let mut admin_port = 0;
    for line in supervisor::config::DEFAULT_CONFIG.lines() {
        in_table |= line.trim_start().starts_with('[');
        let mut line = line.to_owned();
        // Every loopback port, the same port everywhere it appears.
        let mut at = 0;
        while let Some(p) = line[at..].find("127.0.0.1:") {
            let start = at + p + "127.0.0.1:".len();
            let end = start
                + line[start..]
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(line.len() - start);
            let old = line[start..end].to_owned();
            let new = match ports.iter().find(|(o, _)| *o == old) {
                Some((_, n)) => n.clone(),
                None => {
                    let n = crate::free_port().to_string();
                    ports.push((old.clone(), n.clone()));
                    n
                }
            };
            line.replace_range(start..end, &new);
            at = start + new.len();
        }
        let key = line.split('=').next().unwrap_or("").trim().to_owned();
        if !in_table && key == "listen" {
            if let Some(sock) = unix {
                line = format!("listen = \"unix:{}\"", sock.display());
            }
            listen = line.split('"').nth(1).expect("listen = \"…\"").to_owned();
        }
        if !in_table && key == "admin_listen" {
            admin_port = line
                .rsplit(':')
                .next()
                .and_then(|p| p.trim_end_matches('"').parse().ok())
                .expect("admin_listen = \"127.0.0.1:port\"");
        }
        text.push_str(&line);
        text.push('\n');
    }
    assert!(
        !listen.is_empty() && admin_port != 0,
        "the embedded default lost its top-level listen or admin_listen: the benchmark needs both"
    );
    DefaultConfig {
        text: format!("runtime_dir = \"{}\"\n{text}", runtime_dir.display()),
        listen,
        admin_port,
        plugins: parsed.plugins.iter().map(|p| p.name.clone()).collect(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_ports_runtime_dir_and_listener_change() {
        let d = super::render(std::path::Path::new("/tmp/x"), None);
        assert!(d.text.starts_with("runtime_dir = \"/tmp/x\"\n"));
        assert!(!d.text.contains(":9002") && !d.text.contains(":9003"));
        assert!(d.listen.starts_with("127.0.0.1:"));
        let back = d
            .text
            .replace(&d.listen, "127.0.0.1:9002")
            .replace(&format!("127.0.0.1:{}", d.admin_port), "127.0.0.1:9003");
        assert_eq!(
            back.trim_start_matches("runtime_dir = \"/tmp/x\"\n"),
            supervisor::config::DEFAULT_CONFIG
        );
        let u = super::render(
            std::path::Path::new("/tmp/x"),
            Some(std::path::Path::new("/tmp/x/e.sock")),
        );
        assert_eq!(u.listen, "unix:/tmp/x/e.sock");
        assert!(u.text.contains("listen = \"unix:/tmp/x/e.sock\"\n"));
        assert!(!u.plugins.is_empty());
    }
}
