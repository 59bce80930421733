//! The process name. The supervisor spawns a plugin with `arg0 = "plugvisor-plugin: <name>"`,
//! which is what `ps` and `pgrep -f` show as the command line; here the host additionally sets the
//! kernel's 15-byte thread name (`comm`, shown by `ps -o comm`, `top`, `pgrep <pattern>`) to
//! `pv:<name>`. `prctl(PR_SET_NAME)` through `nix` is a safe call, so no unsafe code is needed.

use std::ffi::CString;

/// The `comm` name for a plugin: `pv:` and the name, cut to the kernel's 15 bytes.
pub fn comm_name(plugin: &str) -> String {
    let mut name = format!("pv:{plugin}");
    while name.len() > 15 {
        name.pop();
    }
    name
}

/// Sets the calling thread's (for the main thread: the process's) `comm` name. Failure is only
/// logged: a name is a convenience.
pub fn set(plugin: &str) {
    match CString::new(comm_name(plugin)) {
        Ok(name) => {
            if let Err(e) = nix::sys::prctl::set_name(&name) {
                tracing::debug!(error = %e, "cannot set the process name");
            }
        }
        Err(_) => tracing::debug!("plugin name contains a NUL byte; process name not set"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn comm_names_fit_the_kernel_limit() {
        assert_eq!(super::comm_name("usage"), "pv:usage");
        assert_eq!(super::comm_name("a-very-long-plugin-name").len(), 15);
    }
}
