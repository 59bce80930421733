//! Finding the workspace's binaries (`plugvisor`, `plugvisor-plugin`, and examples such as
//! `examples/conformance`) in the target directory the tests were built into. CI runs
//! `cargo build --workspace --bins --examples` before `cargo test`, so a missing binary is a setup
//! error: the message says how to fix it.

use std::path::PathBuf;

/// The directory holding the workspace binaries: `$CARGO_TARGET_DIR/debug` when set and holding
/// them, else the parent of the test executable's `deps/` directory.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> -> target/debug
    let mut dir = exe
        .parent()
        .expect("test binary has a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The path of a workspace binary, or a panic that says how to build it.
pub fn require(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    if !path.is_file() {
        panic!(
            "binary `{name}` not found at {}; build it first: `cargo build --workspace --bins --examples` \
             (with the same CARGO_TARGET_DIR as the tests)",
            path.display()
        );
    }
    path
}

/// `plugvisor`.
pub fn plugvisor() -> PathBuf {
    require("plugvisor")
}

/// `plugvisor-plugin`, the host of the built-in plugins.
pub fn plugvisor_plugin() -> PathBuf {
    require("plugvisor-plugin")
}
