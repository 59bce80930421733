//! Applying a new configuration to a running front (SIGHUP, `systemctl reload plugvisor`,
//! `plugvisor reload`).
//!
//! [`plan`] compares two configurations key by key, each key classified once in
//! [`crate::config::keys`]: a plugin only in the new one is added, one only in the old one
//! removed; one whose table changed only in what the front does with it is updated in place (its
//! owner applies the new deadlines, queue bounds and restart policy at once); one whose process
//! must change (command, args, env, its `config` table, ...) is restarted by handover: a new
//! process takes new streams while the old one finishes the streams it has (each keeps its
//! journal, so nothing is lost if the old one is cut off after `drain_grace_ms`). Changing
//! `spawn` or `group` replaces the plugin (stopped, then started with a fresh socket).
//!
//! The new configuration is then published ([`crate::config::Published`]) and every reader reads
//! it from there: new streams take their limits from it, owners their table, policy and ping
//! interval. Top-level keys that shape what is already bound or built (`listen`, `runtime_dir`,
//! `admin_listen`, `max_message_bytes`, `connect_timeout_ms`) keep their running values in the
//! published configuration, and the plan names them, in its log line and in `plugvisor reload`'s
//! answer, with what applies them (a restart, or `plugvisor upgrade`).
//!
//! A plugin that cannot be started (its socket cannot be bound: a `group` that does not exist, a
//! file in the way) stays in the running configuration as [`Unstarted`]: `plugvisor status` shows
//! it `failed` with the reason, it is retried with its restart policy's backoff
//! ([`crate::plugin::registry`]), and every later reload tries it again, changed or not, so fixing
//! the cause brings it up. A removed plugin's metric series go with it.

use std::sync::Arc;
use std::time::Duration;

use crate::config::keys::{self, Applies};
use crate::config::{Config, PluginConfig};
use crate::observe::metrics::Metrics;
use crate::plugin::owner::{PluginOwner, SocketFile};
use crate::plugin::registry::Unstarted;
use crate::shell::front::Running;

/// What a reload changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Plugins only in the new configuration, in its order.
    pub added: Vec<String>,
    /// Plugins only in the old configuration.
    pub removed: Vec<String>,
    /// Plugins in both whose process must change: restarted by handover with the new table.
    pub changed: Vec<String>,
    /// Plugins in both whose table changed only in front-side keys: updated in place.
    pub updated: Vec<String>,
    /// Plugins whose `spawn` or `group` changed: stopped, then started with a fresh socket.
    pub replaced: Vec<String>,
    /// Plugins unchanged in the configuration that an earlier reload could not start: tried
    /// again.
    pub retried: Vec<String>,
    /// Top-level keys that changed and apply now (to new streams, or at once).
    pub applied: Vec<&'static str>,
    /// Top-level keys that changed but keep their running value until plugvisor restarts (or
    /// upgrades, where that applies them): each with what applies it.
    pub needs_restart: Vec<(&'static str, Applies)>,
    /// Each changed plugin key, as `plugin.key`, with when it applies.
    pub plugin_keys: Vec<(String, Applies)>,
}

impl Plan {
    /// True when the reload changes nothing that runs.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.updated.is_empty()
            && self.replaced.is_empty()
            && self.retried.is_empty()
            && self.applied.is_empty()
    }
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(", ")
            }
        };
        write!(
            f,
            "added {}; removed {}; restarted {}; updated in place {}",
            list(&self.added),
            list(&self.removed),
            list(&self.changed),
            list(&self.updated)
        )?;
        if !self.replaced.is_empty() {
            write!(f, "; replaced {}", list(&self.replaced))?;
        }
        if !self.retried.is_empty() {
            write!(f, "; retried {}", list(&self.retried))?;
        }
        if !self.applied.is_empty() {
            write!(f, "; applied {}", self.applied.join(", "))?;
        }
        for (key, applies) in &self.needs_restart {
            match applies {
                Applies::Upgrade => write!(
                    f,
                    "; NOT applied: {key} needs `plugvisor upgrade` or a restart (running value kept)"
                )?,
                _ => write!(
                    f,
                    "; NOT applied: {key} needs a restart of plugvisor (running value kept)"
                )?,
            }
        }
        Ok(())
    }
}

/// The top-level keys (but `plugins`) whose values differ between `old` and `new`, by their
/// names in the file.
pub fn changed_top_level(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |key: &'static str, differs: bool| {
        if differs {
            changed.push(key);
        }
    };
    check("listen", old.listen != new.listen);
    check("admin_listen", old.admin_listen != new.admin_listen);
    check("runtime_dir", old.runtime_dir != new.runtime_dir);
    check(
        "default_response_body_mode",
        old.default_response_body_mode != new.default_response_body_mode,
    );
    check(
        "connect_timeout_ms",
        old.connect_timeout != new.connect_timeout,
    );
    check(
        "shutdown_grace_ms",
        old.shutdown_grace != new.shutdown_grace,
    );
    check("upgrade_drain_ms", old.upgrade_drain != new.upgrade_drain);
    check("ping_interval_ms", old.ping_interval != new.ping_interval);
    check("ready_timeout_ms", old.ready_timeout != new.ready_timeout);
    check("max_streams", old.max_streams != new.max_streams);
    check(
        "max_message_bytes",
        old.max_message_bytes != new.max_message_bytes,
    );
    check(
        "stream_metadata_max_bytes",
        old.stream_metadata_max_bytes != new.stream_metadata_max_bytes,
    );
    check(
        "idle_stream_timeout_ms",
        old.idle_stream_timeout != new.idle_stream_timeout,
    );
    check("workers", old.workers != new.workers);
    changed.extend(changed_records_keys(old, new));
    changed.extend(changed_traces_keys(old, new));
    changed
}

/// The keys of `[traces]` whose values differ, as `traces.<key>`. Turning tracing on or off is a
/// change of its `endpoint`.
pub fn changed_traces_keys(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |key: &'static str, differs: bool| {
        if differs {
            changed.push(key);
        }
    };
    match (&old.traces, &new.traces) {
        (Some(a), Some(b)) => {
            let (x, y) = (&a.transport, &b.transport);
            check("traces.endpoint", x.endpoint != y.endpoint);
            check("traces.protocol", x.protocol != y.protocol);
            check("traces.headers", x.headers != y.headers);
            check("traces.timeout_ms", x.timeout != y.timeout);
            check("traces.sampler", a.sampler.name() != b.sampler.name());
            // The argument of the same sampler (the argument of one that takes none is ignored).
            check(
                "traces.sampler_arg",
                a.sampler.name() == b.sampler.name() && a.sampler != b.sampler,
            );
        }
        (None, None) => {}
        _ => check("traces.endpoint", true),
    }
    changed
}

/// The keys of `[records]` and `[records.otlp]` whose values differ, as `records.<key>` and
/// `records.otlp.<key>`. Turning OTLP on or off is a change of its `endpoint`.
pub fn changed_records_keys(old: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (&old.records, &new.records);
    let mut changed = Vec::new();
    let mut check = |key: &'static str, differs: bool| {
        if differs {
            changed.push(key);
        }
    };
    check("records.path", a.path != b.path);
    check("records.rotate_bytes", a.rotate_bytes != b.rotate_bytes);
    check("records.keep", a.keep != b.keep);
    check("records.omit", a.omit != b.omit);
    check("records.queue_records", a.queue_records != b.queue_records);
    match (&a.otlp, &b.otlp) {
        (Some(x), Some(y)) => {
            check("records.otlp.endpoint", x.endpoint != y.endpoint);
            check("records.otlp.protocol", x.protocol != y.protocol);
            check("records.otlp.headers", x.headers != y.headers);
            check("records.otlp.timeout_ms", x.timeout != y.timeout);
            check("records.otlp.spool_dir", x.spool_dir != y.spool_dir);
            check(
                "records.otlp.spool_max_bytes",
                x.spool_max_bytes != y.spool_max_bytes,
            );
            // Resource attributes come from the environment, which a reload does not change.
        }
        (None, None) => {}
        _ => check("records.otlp.endpoint", true),
    }
    changed
}

/// When a change to a top-level key, a `[records]` key or a `[traces]` key applies.
fn applies(key: &str) -> Option<Applies> {
    keys::top_level(key)
        .or_else(|| keys::records(key))
        .or_else(|| keys::traces(key))
}

/// Gives `new` the running values of the top-level keys only a restart (or an upgrade) applies,
/// so the published configuration says what runs.
fn keep_running_values(old: &Config, new: &mut Config) {
    for key in changed_top_level(old, new) {
        if !applies(key).is_some_and(Applies::kept_until_restart) {
            continue;
        }
        if key.starts_with("records.") {
            // The sinks run with the table they started with: keep it whole.
            new.records = old.records.clone();
            continue;
        }
        if key.starts_with("traces.") {
            // The exporter runs as it started: keep its table, but for the sampler, which each
            // new stream reads from the published configuration.
            let sampler = new.traces.as_ref().map(|t| t.sampler);
            new.traces = old.traces.clone();
            if let (Some(kept), Some(sampler)) = (&mut new.traces, sampler) {
                kept.sampler = sampler;
            }
            continue;
        }
        match key {
            "listen" => new.listen = old.listen.clone(),
            "admin_listen" => new.admin_listen = old.admin_listen,
            "runtime_dir" => new.runtime_dir = old.runtime_dir.clone(),
            "connect_timeout_ms" => new.connect_timeout = old.connect_timeout,
            "max_message_bytes" => new.max_message_bytes = old.max_message_bytes,
            "workers" => new.workers = old.workers,
            other => unreachable!("top-level key `{other}` kept until a restart but not copied"),
        }
    }
}

/// The keys of a plugin's table whose values differ, by their names in the file.
pub fn changed_plugin_keys(old: &PluginConfig, new: &PluginConfig) -> Vec<&'static str> {
    let (a, b) = (&old.process, &new.process);
    let mut changed = Vec::new();
    let mut check = |key: &'static str, differs: bool| {
        if differs {
            changed.push(key);
        }
    };
    check("spawn", a.spawn != b.spawn);
    check("group", a.group != b.group);
    check("command", a.command != b.command);
    check("args", a.args != b.args);
    check("env", a.env != b.env);
    check("uid", a.uid != b.uid);
    check("config", a.config != b.config);
    check("cpu_scheduling", a.cpu_scheduling != b.cpu_scheduling);
    check(
        "metadata_max_bytes",
        a.metadata_max_bytes != b.metadata_max_bytes,
    );
    check("budget_bytes", a.budget_bytes != b.budget_bytes);
    check("dispatch", old.dispatch != new.dispatch);
    check("namespaces", old.namespaces != new.namespaces);
    check("final_timeout_ms", old.final_timeout != new.final_timeout);
    check(
        "inline_timeout_ms",
        old.inline_timeout != new.inline_timeout,
    );
    check("queue_events", old.queue_events != new.queue_events);
    check("queue_bytes", old.queue_bytes != new.queue_bytes);
    check("required", old.required != new.required);
    check("restart", old.restart.restart != new.restart.restart);
    check(
        "backoff_min_ms",
        old.restart.backoff_min != new.restart.backoff_min,
    );
    check(
        "backoff_max_ms",
        old.restart.backoff_max != new.restart.backoff_max,
    );
    check(
        "max_restarts",
        old.restart.max_restarts != new.restart.max_restarts,
    );
    check(
        "restart_period_ms",
        old.restart.period != new.restart.period,
    );
    check("start_timeout_ms", old.start_timeout != new.start_timeout);
    check("hang_timeout_ms", old.hang_timeout != new.hang_timeout);
    check("replay_bytes", old.replay_bytes != new.replay_bytes);
    check("drain_grace_ms", old.drain_grace != new.drain_grace);
    check("stuck_timeout_ms", old.stuck_timeout != new.stuck_timeout);
    check("batch_ms", old.batch != new.batch);
    changed
}

/// Compares the running configuration with a new one.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let find = |cfg: &Config, name: &str| -> Option<PluginConfig> {
        cfg.plugins.iter().find(|p| p.name == name).cloned()
    };
    let mut plan = Plan::default();
    for p in &new.plugins {
        let Some(before) = find(old, &p.name) else {
            plan.added.push(p.name.clone());
            continue;
        };
        let changed: Vec<(&'static str, Applies)> = changed_plugin_keys(&before, p)
            .into_iter()
            .map(|k| (k, keys::plugin(k).expect("every plugin key is classified")))
            .collect();
        if changed.is_empty() {
            continue;
        }
        let has = |a: Applies| changed.iter().any(|(_, x)| *x == a);
        if has(Applies::NewSocket) {
            plan.replaced.push(p.name.clone());
        } else if has(Applies::NewProcess) {
            plan.changed.push(p.name.clone());
        } else {
            plan.updated.push(p.name.clone());
        }
        plan.plugin_keys.extend(
            changed
                .into_iter()
                .map(|(k, a)| (format!("{}.{k}", p.name), a)),
        );
    }
    for p in &old.plugins {
        if find(new, &p.name).is_none() {
            plan.removed.push(p.name.clone());
        }
    }
    for key in changed_top_level(old, new) {
        let applies = applies(key).expect("every top-level and records key is classified");
        if applies.kept_until_restart() {
            plan.needs_restart.push((key, applies));
        } else {
            plan.applied.push(key);
        }
    }
    plan
}

/// A reload that could only be applied in part.
#[derive(Debug, thiserror::Error)]
#[error("plugin `{plugin}` could not be started: {message}")]
pub struct ReloadError {
    /// The plugin.
    pub plugin: String,
    /// Why.
    pub message: String,
}

/// Removes every series labelled with `name` (a plugin the reload removed), so `/metrics` stops
/// reporting a plugin that no longer exists. A stream started before the reload may still count a
/// drop for it and so bring one series back until the next removal; that is the stream's truth.
pub fn forget_plugin_metrics(metrics: &Metrics, name: &str) {
    let label = Metrics::plugin(name);
    metrics.events_sent.remove(&label);
    metrics.events_replayed.remove(&label);
    metrics.stuck_lanes.remove(&label);
    metrics.queue_depth.remove(&label);
    metrics.queue_bytes.remove(&label);
    metrics.inflight_bytes.remove(&label);
    metrics.final_duration.remove(&label);
    metrics.plugin_connected.remove(&label);
    metrics.namespaces_denied.remove(&label);
    metrics.plugin_active_streams.remove(&label);
    metrics.plugin_up.remove(&label);
    metrics.restarts.remove(&label);
    metrics.last_exit_code.remove(&label);
    metrics.last_exit_signal.remove(&label);
    metrics.start_duration.remove(&label);
    // Reasons are open-ended (each part of the front adds its own): take them from what is
    // exported rather than from a list that would drift.
    let prefix = format!("{{plugin=\"{name}\",reason=\"");
    let text = metrics.encode();
    let reasons: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|line| {
            let rest = &line[line.find(&prefix)? + prefix.len()..];
            Some(&rest[..rest.find('"')?])
        })
        .collect();
    for reason in reasons {
        let label = Metrics::reason(name, reason);
        metrics.events_dropped.remove(&label);
        metrics.finals_missing.remove(&label);
        metrics.handshakes_refused.remove(&label);
        metrics.replies_refused.remove(&label);
    }
}

impl Running {
    /// Applies `new` (see the module docs) and returns what changed. Plugins that cannot be
    /// started stay configured as [`Unstarted`] and are reported; everything else is applied.
    pub async fn reload(&mut self, mut new: Config) -> Result<Plan, ReloadError> {
        let plugins = self.plugins.clone();
        let _changes = plugins.lock_changes().await;
        let old = self.config.current();
        let mut plan = plan(&old, &new);
        let unstarted: Vec<String> = plugins
            .unstarted()
            .iter()
            .map(|u| u.name().to_owned())
            .collect();
        plan.retried = new
            .plugins
            .iter()
            .map(|p| p.name.clone())
            .filter(|n| {
                unstarted.contains(n)
                    && !plan.changed.contains(n)
                    && !plan.updated.contains(n)
                    && !plan.replaced.contains(n)
            })
            .collect();
        // A plugin that was never started has no process to hand over: start it afresh.
        for list in [&mut plan.changed, &mut plan.updated] {
            let (fresh, kept): (Vec<String>, Vec<String>) =
                list.drain(..).partition(|n| unstarted.contains(n));
            *list = kept;
            plan.replaced.extend(fresh);
        }
        if !plan.needs_restart.is_empty() {
            tracing::warn!(
                keys = ?plan.needs_restart.iter().map(|(k, a)| format!("{k} ({})", a.as_str())).collect::<Vec<_>>(),
                "these keys changed but only take effect when plugvisor restarts (or upgrades, where marked); keeping the running values"
            );
        }
        keep_running_values(&old, &mut new);

        let old_entries = self.plugins.entries();
        let going: Vec<Arc<PluginOwner>> = old_entries
            .iter()
            .filter(|e| {
                let name = e.name().to_owned();
                plan.removed.contains(&name) || plan.replaced.contains(&name)
            })
            .cloned()
            .collect();
        retire(&going, new.shutdown_grace).await;

        // From here on every reader sees the new configuration.
        self.config.replace(new);
        let new = self.config.current();

        let mut failed = None;
        let mut entries = Vec::new();
        let mut still_unstarted = Vec::new();
        for plugin in &new.plugins {
            let fresh = plan.added.contains(&plugin.name)
                || plan.replaced.contains(&plugin.name)
                || plan.retried.contains(&plugin.name);
            if !fresh {
                if let Some(e) = old_entries.iter().find(|e| e.name() == plugin.name) {
                    // Every owner looks: a top-level key it reads (the ping interval) may have
                    // changed even where its own table did not.
                    let done = e.reconfigure().await;
                    tracing::debug!(plugin = %plugin.name, %done, "reload: plugin reconfigured");
                    entries.push(e.clone());
                }
                continue;
            }
            match plugins.launch(plugin) {
                Ok(entry) => {
                    tracing::info!(plugin = %plugin.name, spawned = plugin.process.spawn, "reload: plugin started");
                    entries.push(entry);
                }
                Err(message) => {
                    tracing::error!(plugin = %plugin.name, %message, "reload: cannot start plugin; retrying it with its restart policy's backoff");
                    still_unstarted.push(Unstarted::new(plugin, message.clone()));
                    failed.get_or_insert(ReloadError {
                        plugin: plugin.name.clone(),
                        message,
                    });
                }
            }
        }
        plugins.replace(entries, still_unstarted);
        // Their owners and links end here, so nothing of theirs updates a series after it is
        // removed.
        drop(going);
        drop(old_entries);
        for name in &plan.removed {
            forget_plugin_metrics(&self.metrics, name);
        }
        tracing::info!(%plan, "configuration reloaded");
        match failed {
            Some(e) => Err(e),
            None => Ok(plan),
        }
    }
}

/// Stops `going` as at shutdown and waits for their owners to end (each closes its
/// connections and removes its socket); past twice the grace, what is left is killed.
async fn retire(going: &[Arc<PluginOwner>], grace: Duration) {
    for owner in going {
        owner.begin_stop(grace, SocketFile::Remove);
    }
    let stopped = async {
        for owner in going {
            owner.finished().await;
        }
    };
    if tokio::time::timeout(grace * 2 + Duration::from_secs(1), stopped)
        .await
        .is_err()
    {
        tracing::warn!("reload: plugins still running after their stop sequence; killing them");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, "test").unwrap()
    }

    #[test]
    fn plan_adds_removes_and_restarts_by_name_and_table() {
        let old =
            config("[plugins.usage]\n[plugins.latency]\nfinal_timeout_ms = 100\n[plugins.gone]\n");
        let new = config(
            "[plugins.latency]\nfinal_timeout_ms = 300\n[plugins.usage]\n[plugins.metrics]\n",
        );
        let p = plan(&old, &new);
        assert_eq!(p.added, vec!["metrics"]);
        assert_eq!(p.removed, vec!["gone"]);
        assert_eq!(p.updated, vec!["latency"]);
        assert!(p.changed.is_empty());
        assert!(p.needs_restart.is_empty());
        assert_eq!(
            p.to_string(),
            "added metrics; removed gone; restarted none; updated in place latency"
        );
        assert!(plan(&old, &old).is_empty());
    }

    #[test]
    fn process_keys_restart_front_keys_update_in_place_spawn_and_group_replace() {
        let old = config("[plugins.a]\n[plugins.b]\n[plugins.c]\n[plugins.d]\n");
        let new = config(
            "[plugins.a]\nqueue_events = 8\nfinal_timeout_ms = 9\ndispatch = \"inline\"\n\
             [plugins.b]\nenv = { X = \"1\" }\n\
             [plugins.c]\nspawn = false\n\
             [plugins.d]\n[plugins.d.config]\nk = 1\n",
        );
        let p = plan(&old, &new);
        assert_eq!(p.updated, vec!["a"]);
        assert_eq!(p.changed, vec!["b", "d"]);
        assert_eq!(p.replaced, vec!["c"]);
    }

    #[test]
    fn a_removed_plugin_takes_its_series_with_it() {
        let metrics = Metrics::new();
        for name in ["gone", "kept"] {
            metrics
                .plugin_connected
                .get_or_create(&Metrics::plugin(name))
                .set(1);
            metrics.restarts.get_or_create(&Metrics::plugin(name)).inc();
            for reason in ["queue_full", "some_future_reason"] {
                metrics
                    .events_dropped
                    .get_or_create(&Metrics::reason(name, reason))
                    .inc();
            }
            metrics
                .finals_missing
                .get_or_create(&Metrics::reason(name, "timeout"))
                .inc();
        }
        forget_plugin_metrics(&metrics, "gone");
        let text = metrics.encode();
        assert!(!text.contains("plugin=\"gone\""), "{text}");
        assert!(text.contains(
            "plugvisor_plugin_events_dropped_total{plugin=\"kept\",reason=\"some_future_reason\"} 1"
        ));
        assert!(text.contains("plugvisor_plugin_connected{plugin=\"kept\"} 1"));
    }

    #[test]
    fn listener_keys_wait_for_a_restart() {
        let old = config("listen = \"127.0.0.1:9002\"\n[plugins.usage]\n");
        let new = config("listen = \"127.0.0.1:9100\"\nshutdown_grace_ms = 1\n[plugins.usage]\n");
        let p = plan(&old, &new);
        assert_eq!(p.applied, vec!["shutdown_grace_ms"]);
        assert_eq!(p.needs_restart, vec![("listen", Applies::Restart)]);
        assert!(
            p.to_string()
                .contains("NOT applied: listen needs a restart"),
            "{p}"
        );
    }

    /// The keys the parser knows for a table, as serde's `deny_unknown_fields` lists them: the
    /// schema itself, not a list kept beside it.
    fn schema_keys(text_with_unknown_key: &str) -> Vec<String> {
        let err = Config::parse(text_with_unknown_key, "t")
            .unwrap_err()
            .to_string();
        let expected = err
            .split("expected one of ")
            .nth(1)
            .unwrap_or_else(|| panic!("no key list in {err}"));
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }

    /// A value other than the default for every key of the schema. A key added to the schema
    /// without a row here (and in `config::keys`, and in docs/configuration.md) fails
    /// `every_key_reloads_or_says_why_not`.
    const TOP_SAMPLES: &[(&str, &str)] = &[
        ("listen", "listen = \"127.0.0.1:9100\""),
        ("admin_listen", "admin_listen = \"127.0.0.1:9101\""),
        ("runtime_dir", "runtime_dir = \"/tmp/elsewhere\""),
        (
            "default_response_body_mode",
            "default_response_body_mode = \"streamed\"",
        ),
        ("connect_timeout_ms", "connect_timeout_ms = 1234"),
        ("shutdown_grace_ms", "shutdown_grace_ms = 1234"),
        ("upgrade_drain_ms", "upgrade_drain_ms = 1234"),
        ("ping_interval_ms", "ping_interval_ms = 1234"),
        ("ready_timeout_ms", "ready_timeout_ms = 1234"),
        ("max_streams", "max_streams = 5"),
        ("max_message_bytes", "max_message_bytes = 100000"),
        (
            "stream_metadata_max_bytes",
            "stream_metadata_max_bytes = 2048",
        ),
        ("idle_stream_timeout_ms", "idle_stream_timeout_ms = 1234"),
        // Not what `default_workers` gives on any machine this runs on.
        ("workers", "workers = 509"),
    ];

    const PLUGIN_SAMPLES: &[(&str, &str)] = &[
        ("spawn", "spawn = false"),
        ("group", "group = \"root\""),
        ("command", "command = \"/bin/true\""),
        ("args", "args = [\"x\"]"),
        ("env", "env = { A = \"1\" }"),
        ("uid", "uid = 0"),
        ("config", "config = { k = 1 }"),
        ("cpu_scheduling", "cpu_scheduling = \"idle\""),
        ("metadata_max_bytes", "metadata_max_bytes = 2048"),
        ("budget_bytes", "budget_bytes = 100000"),
        ("dispatch", "dispatch = \"inline\""),
        ("final_timeout_ms", "final_timeout_ms = 7"),
        ("inline_timeout_ms", "inline_timeout_ms = 7"),
        ("queue_events", "queue_events = 7"),
        ("queue_bytes", "queue_bytes = 7"),
        ("required", "required = true"),
        ("restart", "restart = \"transient\""),
        ("backoff_min_ms", "backoff_min_ms = 7"),
        ("backoff_max_ms", "backoff_max_ms = 70000"),
        ("max_restarts", "max_restarts = 2"),
        ("restart_period_ms", "restart_period_ms = 7"),
        ("start_timeout_ms", "start_timeout_ms = 7"),
        ("hang_timeout_ms", "hang_timeout_ms = 7000"),
        ("replay_bytes", "replay_bytes = 7"),
        ("drain_grace_ms", "drain_grace_ms = 7"),
        ("stuck_timeout_ms", "stuck_timeout_ms = 7"),
        ("batch_ms", "batch_ms = 7"),
        ("namespaces", "namespaces = [\"envoy.lb\"]"),
    ];

    /// A value other than the default for every `[records]` key, on top of [`RECORDS_BASE`].
    const RECORDS_SAMPLES: &[(&str, &str)] = &[
        (
            "records.path",
            "[records]\npath = \"/tmp/elsewhere/r.jsonl\"",
        ),
        ("records.rotate_bytes", "[records]\nrotate_bytes = 100000"),
        ("records.keep", "[records]\nkeep = 2"),
        ("records.omit", "[records]\nomit = [\"path\"]"),
        ("records.queue_records", "[records]\nqueue_records = 7"),
        (
            "records.otlp.endpoint",
            "endpoint = \"http://127.0.0.1:4999\"",
        ),
        ("records.otlp.protocol", "protocol = \"grpc\""),
        ("records.otlp.headers", "headers = { api-key = \"k\" }"),
        ("records.otlp.timeout_ms", "timeout_ms = 7"),
        ("records.otlp.spool_dir", "spool_dir = \"/tmp/elsewhere\""),
        ("records.otlp.spool_max_bytes", "spool_max_bytes = 7"),
    ];

    /// OTLP on, so that a change of each of its keys shows.
    const RECORDS_BASE: &str = "[records.otlp]\nendpoint = \"http://127.0.0.1:4318/v1/logs\"\n";

    fn names(table: &[(&'static str, Applies)]) -> Vec<String> {
        let mut v: Vec<String> = table.iter().map(|(k, _)| (*k).to_owned()).collect();
        v.sort();
        v
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    /// Every key of the schema is classified, has a sample, is marked in docs/configuration.md
    /// with its class, and a change to it alone is reported by the plan as its class says: applied
    /// (the published configuration carries it) or named as needing a restart or an upgrade (the
    /// running value kept).
    #[test]
    fn every_key_reloads_or_says_why_not() {
        let mut top = schema_keys("no_such_key = 1\n");
        // Tables with keys of their own: `plugins` here, `records` and `traces` in
        // `every_records_key_reloads_or_says_why_not` and `every_traces_key_reloads_or_says_why_not`.
        top.retain(|k| k != "plugins" && k != "records" && k != "traces");
        assert_eq!(
            sorted(top.clone()),
            names(keys::TOP_LEVEL),
            "config::keys::TOP_LEVEL"
        );
        let plugin = schema_keys("[plugins.x]\nno_such_key = 1\n");
        assert_eq!(
            sorted(plugin.clone()),
            names(keys::PLUGIN),
            "config::keys::PLUGIN"
        );
        let docs = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/configuration.md"
        ))
        .unwrap();

        let old = config("[plugins.x]\n");
        for key in &top {
            let applies = keys::top_level(key).unwrap();
            assert!(
                docs.contains(&format!("| `{key}` | {} |", applies.as_str())),
                "docs/configuration.md does not mark `{key}` as `{}`",
                applies.as_str()
            );
            let sample = TOP_SAMPLES
                .iter()
                .find(|(k, _)| k == key)
                .unwrap_or_else(|| panic!("no sample value for top-level `{key}`"))
                .1;
            let mut new = config(&format!("{sample}\n[plugins.x]\n"));
            assert_eq!(
                changed_top_level(&old, &new),
                vec![key.as_str()],
                "{sample}"
            );
            let p = plan(&old, &new);
            if applies.kept_until_restart() {
                assert_eq!(p.needs_restart, vec![(key.as_str(), applies)], "{sample}");
                assert!(p.applied.is_empty(), "{sample}");
                assert!(
                    p.to_string().contains(&format!("NOT applied: {key}")),
                    "{p}"
                );
                keep_running_values(&old, &mut new);
                assert!(changed_top_level(&old, &new).is_empty(), "{key} kept");
            } else {
                assert_eq!(p.applied, vec![key.as_str()], "{sample}");
                assert!(p.needs_restart.is_empty(), "{sample}");
            }
        }
        for key in &plugin {
            let applies = keys::plugin(key).unwrap();
            assert!(
                docs.contains(&format!("| `{key}` | {} |", applies.as_str())),
                "docs/configuration.md does not mark `plugins.<name>.{key}` as `{}`",
                applies.as_str()
            );
            let sample = PLUGIN_SAMPLES
                .iter()
                .find(|(k, _)| k == key)
                .unwrap_or_else(|| panic!("no sample value for plugin key `{key}`"))
                .1;
            let new = config(&format!("[plugins.x]\n{sample}\n"));
            let (a, b) = (&old.plugins[0], &new.plugins[0]);
            assert_eq!(changed_plugin_keys(a, b), vec![key.as_str()], "{sample}");
            // The split of the table agrees with the classification.
            let process_key = matches!(applies, Applies::NewProcess | Applies::NewSocket);
            assert_eq!(
                !a.same_process(b),
                process_key,
                "{key}: ProcessConfig holds it?"
            );
            assert_eq!(!a.same_socket(b), applies == Applies::NewSocket, "{key}");
            let p = plan(&old, &new);
            let list = match applies {
                Applies::NewSocket => &p.replaced,
                Applies::NewProcess => &p.changed,
                Applies::AtOnce | Applies::NewStreams => &p.updated,
                other => panic!("a plugin key cannot need {other:?}"),
            };
            assert_eq!(list, &vec!["x".to_owned()], "{sample}: {p:?}");
            assert_eq!(p.plugin_keys, vec![(format!("x.{key}"), applies)]);
        }
    }

    /// `[records]` and `[records.otlp]` as the test above does the top level: every key is
    /// classified, has a sample, is marked in docs/configuration.md, and a change to it alone is
    /// named by the plan as waiting for an upgrade, with the running table kept.
    #[test]
    fn every_records_key_reloads_or_says_why_not() {
        let mut schema: Vec<String> = schema_keys("[records]\nno_such_key = 1\n")
            .into_iter()
            .filter(|k| k != "otlp")
            .map(|k| format!("records.{k}"))
            .collect();
        schema.extend(
            schema_keys("[records.otlp]\nno_such_key = 1\n")
                .into_iter()
                .map(|k| format!("records.otlp.{k}")),
        );
        assert_eq!(
            sorted(schema.clone()),
            names(keys::RECORDS),
            "config::keys::RECORDS"
        );
        let docs = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/configuration.md"
        ))
        .unwrap();
        let section = |title: &str| {
            let start = docs
                .find(title)
                .unwrap_or_else(|| panic!("docs/configuration.md has no {title}"));
            let rest = &docs[start + title.len()..];
            rest[..rest.find("\n## ").unwrap_or(rest.len())].to_owned()
        };
        let old = config(&format!("[plugins.x]\n{RECORDS_BASE}"));
        for key in &schema {
            let applies = keys::records(key).unwrap();
            let (title, short) = match key.strip_prefix("records.otlp.") {
                Some(k) => ("## `[records.otlp]`", k),
                None => ("## `[records]`", key.strip_prefix("records.").unwrap()),
            };
            assert!(
                section(title).contains(&format!("| `{short}` | {} |", applies.as_str())),
                "docs/configuration.md does not mark `{key}` as `{}`",
                applies.as_str()
            );
            let sample = RECORDS_SAMPLES
                .iter()
                .find(|(k, _)| k == key)
                .unwrap_or_else(|| panic!("no sample value for `{key}`"))
                .1;
            let text = if key.starts_with("records.otlp.") && key != "records.otlp.endpoint" {
                format!("[plugins.x]\n{RECORDS_BASE}{sample}\n")
            } else if key == "records.otlp.endpoint" {
                format!("[plugins.x]\n[records.otlp]\n{sample}\n")
            } else {
                format!("[plugins.x]\n{sample}\n{RECORDS_BASE}")
            };
            let mut new = config(&text);
            assert_eq!(changed_top_level(&old, &new), vec![key.as_str()], "{text}");
            let p = plan(&old, &new);
            assert!(applies.kept_until_restart(), "{key}");
            assert_eq!(p.needs_restart, vec![(key.as_str(), applies)], "{text}");
            assert!(
                p.to_string().contains(&format!("NOT applied: {key}")),
                "{p}"
            );
            keep_running_values(&old, &mut new);
            assert!(changed_top_level(&old, &new).is_empty(), "{key} kept");
        }
    }

    /// A value other than the default for every `[traces]` key, on top of [`TRACES_BASE`].
    const TRACES_SAMPLES: &[(&str, &str)] = &[
        ("traces.endpoint", "endpoint = \"http://127.0.0.1:4999\""),
        ("traces.protocol", "protocol = \"grpc\""),
        ("traces.headers", "headers = { api-key = \"k\" }"),
        ("traces.timeout_ms", "timeout_ms = 7"),
        ("traces.sampler", "sampler = \"always_off\""),
        ("traces.sampler_arg", "sampler_arg = 0.5"),
    ];

    /// Tracing on with a ratio sampler, so that a change of each key shows.
    const TRACES_BASE: &str = "[traces]\nsampler = \"parentbased_traceidratio\"\n";

    /// `[traces]` as the tests above do `[records]`: every key is classified, has a sample, is
    /// marked in docs/configuration.md, and a change to it alone is named by the plan as waiting
    /// for an upgrade, with the running table kept, or (the sampler) as applied to new streams.
    #[test]
    fn every_traces_key_reloads_or_says_why_not() {
        let schema: Vec<String> = schema_keys("[traces]\nno_such_key = 1\n")
            .into_iter()
            .map(|k| format!("traces.{k}"))
            .collect();
        assert_eq!(
            sorted(schema.clone()),
            names(keys::TRACES),
            "config::keys::TRACES"
        );
        let docs = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/configuration.md"
        ))
        .unwrap();
        let title = "## `[traces]`";
        let start = docs
            .find(title)
            .unwrap_or_else(|| panic!("docs/configuration.md has no {title}"));
        let rest = &docs[start + title.len()..];
        let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
        // The base without the key the sample sets.
        let base = |key: &str| {
            let mut text = "[plugins.x]\n[traces]\n".to_owned();
            if key != "traces.endpoint" {
                text.push_str("endpoint = \"http://127.0.0.1:4318/v1/traces\"\n");
            }
            if key != "traces.sampler" {
                text.push_str(TRACES_BASE.trim_start_matches("[traces]\n"));
            }
            text
        };
        let old = config(&base(""));
        for key in &schema {
            let applies = keys::traces(key).unwrap();
            let short = key.strip_prefix("traces.").unwrap();
            assert!(
                section.contains(&format!("| `{short}` | {} |", applies.as_str())),
                "docs/configuration.md does not mark `{key}` as `{}`",
                applies.as_str()
            );
            let sample = TRACES_SAMPLES
                .iter()
                .find(|(k, _)| k == key)
                .unwrap_or_else(|| panic!("no sample value for `{key}`"))
                .1;
            let text = format!("{}{sample}\n", base(key));
            let mut new = config(&text);
            assert_eq!(changed_top_level(&old, &new), vec![key.as_str()], "{text}");
            let p = plan(&old, &new);
            if applies.kept_until_restart() {
                assert_eq!(p.needs_restart, vec![(key.as_str(), applies)], "{text}");
                assert!(
                    p.to_string().contains(&format!("NOT applied: {key}")),
                    "{p}"
                );
                keep_running_values(&old, &mut new);
                assert!(changed_top_level(&old, &new).is_empty(), "{key} kept");
            } else {
                // The sampler: new streams take it from the published configuration.
                assert_eq!(applies, Applies::NewStreams, "{key}");
                assert!(p.needs_restart.is_empty(), "{p}");
                assert_eq!(p.applied, vec![key.as_str()], "{text}");
                keep_running_values(&old, &mut new);
                assert_eq!(changed_top_level(&old, &new), vec![key.as_str()], "{key}");
            }
        }
    }

    /// A reload that changes the endpoint (kept until an upgrade) and the sampler (new streams)
    /// at once keeps the running exporter's table with the new sampler, and says which is which.
    #[test]
    fn a_sampler_change_applies_even_beside_an_exporter_change_that_waits() {
        let old = config("[plugins.x]\n[traces]\nendpoint = \"http://127.0.0.1:4318\"\n");
        let mut new = config(
            "[plugins.x]\n[traces]\nendpoint = \"http://127.0.0.1:4999\"\n\
             sampler = \"traceidratio\"\nsampler_arg = 0.25\n",
        );
        let p = plan(&old, &new);
        assert_eq!(p.applied, vec!["traces.sampler"]);
        assert_eq!(p.needs_restart, vec![("traces.endpoint", Applies::Upgrade)]);
        keep_running_values(&old, &mut new);
        let (was, now) = (old.traces.unwrap(), new.traces.unwrap());
        assert_eq!(now.transport, was.transport);
        assert_eq!(now.sampler.name(), "traceidratio");
        assert_eq!(
            now.sampler.root,
            crate::config::traces::RootSampler::TraceIdRatio(0.25)
        );
    }
}
