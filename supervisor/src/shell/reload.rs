//! Applying a new configuration to a running front (SIGHUP, `systemctl reload plugvisor`).
//!
//! [`plan`] compares two configurations, plugin by plugin: a plugin only in the new one is added,
//! one only in the old one removed; one whose table changed only in what the front does with it
//! (deadlines, queues, dispatch, supervision timings: [`PluginConfig::same_process`]) is updated
//! in place, without touching its process; one whose process must change (command, args, env, its
//! `config` table, ...) is restarted by handover: a new process takes new streams while the old
//! one finishes the streams it has (each keeps its journal, so nothing is lost if the old one is
//! cut off after `drain_grace_ms`). Changing `spawn` or `group` replaces the plugin (stopped, then
//! started with a fresh socket). The rest is left alone. [`Running::reload`] carries the plan out
//! by sending each plugin's owner ([`crate::owner`]) its new table, or its stop: the owner
//! decides between an update in place and a handover.
//!
//! A plugin that cannot be started (its socket cannot be bound: a `group` that does not exist, a
//! file in the way) stays in the running configuration as [`Unstarted`]: `plugvisor status` shows
//! it `failed` with the reason, it is retried with its restart policy's backoff
//! ([`crate::registry`]), and every later reload tries it again, changed or not, so fixing the
//! cause brings it up. A removed plugin's metric series go with it.
//!
//! Top-level keys that shape listeners (`listen`, `admin_listen`, `runtime_dir`) cannot change
//! in place: the plan names them and the running values stay until plugvisor restarts. The other
//! top-level keys apply to what starts after the reload.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, PluginConfig};
use crate::metrics::Metrics;
use crate::owner::PluginOwner;
use crate::registry::Unstarted;
use crate::Running;

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
    /// Top-level keys that differ but only take effect when plugvisor restarts.
    pub needs_restart: Vec<&'static str>,
}

impl Plan {
    /// True when the reload changes no plugin.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.updated.is_empty()
            && self.replaced.is_empty()
            && self.retried.is_empty()
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
        Ok(())
    }
}

/// Compares the running configuration with a new one.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let find = |cfg: &Config, name: &str| -> Option<PluginConfig> {
        cfg.plugins.iter().find(|p| p.name == name).cloned()
    };
    let mut plan = Plan::default();
    for p in &new.plugins {
        match find(old, &p.name) {
            None => plan.added.push(p.name.clone()),
            Some(before) if before == *p => {}
            Some(before) if before.same_process(p) => plan.updated.push(p.name.clone()),
            Some(before) if before.spawn != p.spawn || before.group != p.group => {
                plan.replaced.push(p.name.clone())
            }
            Some(_) => plan.changed.push(p.name.clone()),
        }
    }
    for p in &old.plugins {
        if find(new, &p.name).is_none() {
            plan.removed.push(p.name.clone());
        }
    }
    if old.listen != new.listen {
        plan.needs_restart.push("listen");
    }
    if old.admin_listen != new.admin_listen {
        plan.needs_restart.push("admin_listen");
    }
    if old.runtime_dir != new.runtime_dir {
        plan.needs_restart.push("runtime_dir");
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
    }
}

impl Running {
    /// Applies `new` (see the module docs) and returns what changed. Plugins that cannot be
    /// started stay configured as [`Unstarted`] and are reported; everything else is applied.
    pub async fn reload(&mut self, mut new: Config) -> Result<Plan, ReloadError> {
        let plugins = self.plugins.clone();
        let _changes = plugins.lock_changes().await;
        let mut plan = plan(&self.config, &new);
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
                keys = ?plan.needs_restart,
                "these keys changed but only take effect when plugvisor restarts; keeping the running values"
            );
        }
        // Keys that shape what is already bound keep their running values.
        new.listen = self.config.listen.clone();
        new.admin_listen = self.config.admin_listen;
        new.runtime_dir = self.config.runtime_dir.clone();
        *plugins.launcher().config.write().expect("config lock") = new.clone();

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

        let mut failed = None;
        let mut entries = Vec::new();
        let mut still_unstarted = Vec::new();
        for plugin in &new.plugins {
            let fresh = plan.added.contains(&plugin.name)
                || plan.replaced.contains(&plugin.name)
                || plan.retried.contains(&plugin.name);
            if !fresh {
                if let Some(e) = old_entries.iter().find(|e| e.name() == plugin.name) {
                    if plan.updated.contains(&plugin.name) || plan.changed.contains(&plugin.name) {
                        let done = e.reconfigure(plugin.clone()).await;
                        tracing::debug!(plugin = %plugin.name, %done, "reload: plugin reconfigured");
                    }
                    entries.push(e.clone());
                }
                continue;
            }
            match plugins.launch(plugin) {
                Ok(entry) => {
                    tracing::info!(plugin = %plugin.name, spawned = plugin.spawn, "reload: plugin started");
                    entries.push(entry);
                }
                Err(message) => {
                    tracing::error!(plugin = %plugin.name, %message, "reload: cannot start plugin; retrying it with its restart policy's backoff");
                    still_unstarted.push(Unstarted::new(plugin.clone(), message.clone()));
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
        self.config = new;
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
        owner.begin_stop(grace, crate::owner::SocketFile::Remove);
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
        assert!(p.is_empty());
        assert_eq!(p.needs_restart, vec!["listen"]);
    }
}
