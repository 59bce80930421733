//! `plugvisor-plugin <plugin-name> --connect <socket path>`: hosts one built-in plugin.
#![forbid(unsafe_code)]

fn main() {
    plugin_runner::builtin::main()
}
