//! The checks of a configuration that look past its text: a built-in plugin's own config (run
//! through the code that configures it), and the host (commands, users, groups). They run on
//! every config loaded from a file or the default — at start, at reload and by `check-config` —
//! so a mistake is refused with its key and line instead of becoming a crash loop.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use ipc_protocol::Value;
use plugvisor_builtins::ValidateError;

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
    plugvisor_builtins::validate(name, config).map_err(|e| match e {
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

/// Resolves `command` the way the spawn will (a path when it has a `/`, else through `PATH`:
/// the plugin's own `env.PATH` first) and checks that it is an executable file.
pub(super) fn command(command: &Path, env: &BTreeMap<String, String>) -> Result<PathBuf, String> {
    let path_var = env
        .get("PATH")
        .map(OsString::from)
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_default();
    crate::plugin::spawn::resolve_command(command, &path_var).map_err(|problem| {
        let shown = command.display();
        let hint = if command
            .file_name()
            .is_some_and(|f| f == crate::plugin::spawn::PLUGIN_HOST)
        {
            "build it (`cargo build -p plugvisor-builtins`), or remove `command` and plugvisor runs \
             its built-in plugins itself"
                .to_owned()
        } else if problem.contains("PATH") {
            format!(
                "PATH is {}; give the full path or install it",
                path_var.to_string_lossy()
            )
        } else {
            "build or install it, or give the path of an executable".to_owned()
        };
        format!("`{shown}` {problem}; {hint}")
    })
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
