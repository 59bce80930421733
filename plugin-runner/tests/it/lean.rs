//! The SDK stays lean: a plugin author's crate (`examples/hello-plugin`) builds none of what only
//! the built-in plugins need. Those crates took minutes of first build and most of a gigabyte of
//! `target/`; they belong in `plugvisor-builtins`.
//!
//! Asks `cargo tree` for the dependency graph from `Cargo.lock` (no build, no network when the
//! packages are already fetched, which any build of the workspace has done).

use std::path::Path;
use std::process::Command;

/// What only the built-ins need: CEL (and its ANTLR runtime), the `/metrics` HTTP server and its
/// encoding, and the Content-Encoding decoders.
const HEAVY: &[&str] = &[
    "cel",
    "antlr4rust",
    "hyper",
    "hyper-util",
    "prometheus-client",
    "zstd",
    "zstd-sys",
    "brotli",
    "brotli-decompressor",
    "flate2",
];

/// The names of the packages `package` builds for its normal (non-dev, non-build) dependencies.
fn normal_dependencies(package: &str) -> Vec<String> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tree = |offline: bool| {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(&workspace).args([
            "tree", "-p", package, "-e", "normal", "--prefix", "none", "--locked",
        ]);
        if offline {
            cmd.arg("--offline");
        }
        cmd.output().expect("cargo runs")
    };
    // Offline first (CI has fetched everything by now); a cold registry cache may need the network.
    let mut out = tree(true);
    if !out.status.success() {
        out = tree(false);
    }
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn assert_lean(package: &str) {
    let deps = normal_dependencies(package);
    assert!(
        deps.iter().any(|d| d == "plugin-runner"),
        "cargo tree -p {package} does not list plugin-runner: {deps:?}"
    );
    let heavy: Vec<&str> = HEAVY
        .iter()
        .copied()
        .filter(|h| deps.iter().any(|d| d == h))
        .collect();
    assert!(
        heavy.is_empty(),
        "{package} depends on {heavy:?}, which only the built-in plugins need: \
         move the code that uses them to builtins/ (plugvisor-builtins)"
    );
}

#[test]
fn a_plugin_built_on_the_sdk_builds_none_of_the_builtins_dependencies() {
    assert_lean("hello-plugin");
}

#[test]
fn the_sdk_itself_builds_none_of_the_builtins_dependencies() {
    assert_lean("plugin-runner");
}
