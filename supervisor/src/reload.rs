//! Applying a new configuration to a running front (SIGHUP, `systemctl reload plugvisor`).
//!
//! [`plan`] compares two configurations, plugin by plugin: a plugin only in the new one is added,
//! one only in the old one removed, one whose table changed in any key restarted, and the rest
//! left alone (their processes, connections and queues are not touched). [`Running::reload`]
//! carries the plan out: removed and changed plugins are stopped the way the front stops them at
//! shutdown (`Shutdown`, then SIGTERM and SIGKILL to a spawned process; an external one gets
//! `Shutdown` and its socket closed), then added and changed plugins get a fresh socket, link and,
//! when spawned, supervisor. Streams already running keep the plugin list they started with; new
//! streams see the new one.
//!
//! Top-level keys that shape listeners (`listen`, `admin_listen`, `runtime_dir`) cannot change
//! in place: the plan names them and the running values stay until plugvisor restarts. The other
//! top-level keys apply to what starts after the reload.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, PluginConfig};
use crate::link::PluginLink;
use crate::{PluginEntry, Running};

/// What a reload changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Plugins only in the new configuration, in its order.
    pub added: Vec<String>,
    /// Plugins only in the old configuration.
    pub removed: Vec<String>,
    /// Plugins in both whose table differs: stopped, then started with the new table.
    pub changed: Vec<String>,
    /// Top-level keys that differ but only take effect when plugvisor restarts.
    pub needs_restart: Vec<&'static str>,
}

impl Plan {
    /// True when the reload changes no plugin.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
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
            "added {}; removed {}; restarted {}",
            list(&self.added),
            list(&self.removed),
            list(&self.changed)
        )
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
            Some(before) if before != *p => plan.changed.push(p.name.clone()),
            Some(_) => {}
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

impl Running {
    /// Applies `new` (see the module docs) and returns what changed. Plugins whose socket cannot
    /// be bound are left out and reported; everything else is applied.
    pub async fn reload(&mut self, mut new: Config) -> Result<Plan, ReloadError> {
        let plan = plan(&self.config, &new);
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

        let old_entries = self.plugins.entries();
        let going: Vec<PluginEntry> = old_entries
            .iter()
            .filter(|e| {
                let name = e.link.name().to_owned();
                plan.removed.contains(&name) || plan.changed.contains(&name)
            })
            .cloned()
            .collect();
        self.retire(&going, new.shutdown_grace).await;

        let mut failed = None;
        let mut entries = Vec::new();
        for plugin in &new.plugins {
            let fresh = plan.added.contains(&plugin.name) || plan.changed.contains(&plugin.name);
            if !fresh {
                if let Some(e) = old_entries.iter().find(|e| e.link.name() == plugin.name) {
                    entries.push(e.clone());
                }
                continue;
            }
            match self.launch(&new, plugin) {
                Ok(entry) => entries.push(entry),
                Err(message) => {
                    tracing::error!(plugin = %plugin.name, %message, "reload: cannot start plugin");
                    failed.get_or_insert(ReloadError {
                        plugin: plugin.name.clone(),
                        message,
                    });
                }
            }
        }
        let links: Vec<Arc<PluginLink>> = entries.iter().map(|e| e.link.clone()).collect();
        self.front.set_links(links);
        *self.plugins.entries.write().expect("plugins lock") = entries;
        self.config = new;
        tracing::info!(%plan, "configuration reloaded");
        match failed {
            Some(e) => Err(e),
            None => Ok(plan),
        }
    }

    /// Stops `going` as at shutdown, closes their sockets and ends their tasks.
    async fn retire(&mut self, going: &[PluginEntry], grace: Duration) {
        for entry in going {
            match &entry.supervised {
                Some(s) => s.begin_shutdown(grace),
                None => entry.link.send_shutdown(grace),
            }
        }
        let reaped = async {
            for entry in going {
                if let Some(s) = &entry.supervised {
                    s.finished().await;
                }
            }
        };
        if tokio::time::timeout(grace * 2 + Duration::from_secs(1), reaped)
            .await
            .is_err()
        {
            tracing::warn!("reload: plugins still running after their stop sequence; killing them");
        }
        for entry in going {
            let name = entry.link.name().to_owned();
            entry.link.disconnect("removed or changed by a reload");
            for task in self.plugin_tasks.remove(&name).unwrap_or_default() {
                task.abort();
            }
            let _ = std::fs::remove_file(self.config.plugin_socket(&name));
            tracing::info!(plugin = %name, "reload: plugin stopped");
        }
    }

    /// Binds `plugin`'s socket and starts its link, tasks and (when spawned) supervisor.
    fn launch(&mut self, config: &Config, plugin: &PluginConfig) -> Result<PluginEntry, String> {
        let (link, tasks) = crate::open_plugin(config, plugin, &self.metrics)?;
        self.plugin_tasks.insert(plugin.name.clone(), tasks);
        let entry = crate::supervise_plugin(config, link, &self.spawner, &self.metrics);
        tracing::info!(plugin = %plugin.name, spawned = plugin.spawn, "reload: plugin started");
        Ok(entry)
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
        assert_eq!(p.changed, vec!["latency"]);
        assert!(p.needs_restart.is_empty());
        assert_eq!(
            p.to_string(),
            "added metrics; removed gone; restarted latency"
        );
        assert!(plan(&old, &old).is_empty());
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
