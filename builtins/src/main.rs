//! `plugvisor-plugin <plugin-name> --connect <socket>`: hosts one built-in plugin.
#![forbid(unsafe_code)]

fn main() {
    plugvisor_builtins::main()
}
