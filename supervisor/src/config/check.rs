//! The checks of a configuration that look past its text: a built-in plugin's own config (run
//! through the code that configures it), and the host (commands, users, groups). They run on
//! every config loaded from a file or the default — at start, at reload and by `check-config` —
//! so a mistake is refused with its key and line instead of becoming a crash loop.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ipc_protocol::Value;
use plugin_runner::builtin::ValidateError;

/// What went wrong with a built-in plugin: which key the error belongs to, and why.
pub(super) enum BuiltinError {
    /// The name does not run anything (the key is the plugin's table).
    UnknownPlugin(String),
    /// The plugin refuses its `config` table.
    Config(String),
}

/// The built-in plugin that `plugvisor-plugin` runs for these args: the first argument when
/// `args` is set, else the table's name.
pub(super) fn builtin_name<'a>(name: &'a str, args: Option<&'a [String]>) -> &'a str {
    match args {
        Some(args) => args.first().map_or("", String::as_str),
        None => name,
    }
}

/// Runs the built-in's own config validation.
pub(super) fn builtin(name: &str, config: &Value) -> Result<(), BuiltinError> {
    plugin_runner::builtin::validate(name, config).map_err(|e| match e {
        ValidateError::UnknownPlugin(_) => {
            BuiltinError::UnknownPlugin(format!("{e}; set `command` to run your own plugin binary"))
        }
        // CEL's parser draws a caret under the error on extra lines; errors here are one line.
        ValidateError::Config(e) => BuiltinError::Config(
            e.to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        ),
    })
}

/// Resolves `command` the way the spawn will (a bare name through `PATH`, the plugin's own
/// `env` PATH first) and checks that it is an executable file.
pub(super) fn command(command: &Path, env: &BTreeMap<String, String>) -> Result<PathBuf, String> {
    if command.as_os_str().is_empty() {
        return Err("is empty".into());
    }
    if command.to_string_lossy().contains('/') {
        return executable(command).map(|()| command.to_owned());
    }
    let path = env
        .get("PATH")
        .cloned()
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(command);
        if executable(&candidate).is_ok() {
            return Ok(candidate);
        }
    }
    Err(format!(
        "`{}` is not found in PATH ({path}); give its full path or install it",
        command.display()
    ))
}

fn executable(path: &Path) -> Result<(), String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("`{}` cannot be used: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("`{}` is not a file", path.display()));
    }
    if meta.permissions().mode() & 0o111 == 0
        || nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_err()
    {
        return Err(format!(
            "`{}` is not executable (chmod +x it)",
            path.display()
        ));
    }
    Ok(())
}

/// The group exists on this host.
pub(super) fn group(name: &str) -> Result<(), String> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(format!(
            "group `{name}` does not exist (see `getent group`)"
        )),
        Err(e) => Err(format!("cannot look up group `{name}`: {e}")),
    }
}

/// The uid names a user on this host.
pub(super) fn uid(uid: u32) -> Result<(), String> {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(format!(
            "uid {uid} is no user on this host (see `getent passwd {uid}`)"
        )),
        Err(e) => Err(format!("cannot look up uid {uid}: {e}")),
    }
}
