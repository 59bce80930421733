//! The configured plugins: one [`PluginOwner`] each, in config order, and the plugins that could
//! not be started ([`Unstarted`]), which are retried.
//!
//! A plugin whose socket cannot be bound (a `group` that does not exist yet, a directory in the
//! way) is not dropped: it stays in `plugvisor status` as `failed` with the reason, counts as
//! down for `/healthz` when it is `required`, and is tried again with its restart policy's
//! backoff (`backoff_min_ms` doubling up to `backoff_max_ms`; never with `restart = "temporary"`),
//! at every reload, and at once by `plugvisor start|restart <name>`. `plugvisor stop <name>` stops
//! the retries until the next `start` or reload.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use tokio::sync::watch;

use crate::config::{PluginConfig, Published};
use crate::observe::metrics::Metrics;
use crate::plugin::link::PluginLink;
use crate::plugin::owner::{Bound, PluginOwner};
use crate::plugin::restart::RestartType;
use crate::plugin::spawn::Spawner;
use crate::plugin::supervise::{Command, PluginStatus};

/// A configured plugin that could not be started: no socket, no link, no process. Its table is
/// the one in the published configuration.
#[derive(Debug, Clone)]
pub struct Unstarted {
    /// Its name.
    pub name: String,
    /// Why it could not be started (the last attempt).
    pub reason: String,
    /// Attempts so far.
    pub attempts: u32,
    /// When it is tried next; `None` when it is not retried by itself (`restart = "temporary"`,
    /// or stopped by the operator).
    pub next_try: Option<Instant>,
}

impl Unstarted {
    /// A plugin whose first start failed for `reason`.
    pub fn new(plugin: &PluginConfig, reason: String) -> Unstarted {
        let mut u = Unstarted {
            name: plugin.name.clone(),
            reason,
            attempts: 0,
            next_try: None,
        };
        u.failed_again(plugin, None);
        u
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Records another failed attempt and schedules the next one by the restart policy's
    /// backoff (`plugin` is its table as published now).
    fn failed_again(&mut self, plugin: &PluginConfig, reason: Option<String>) {
        if let Some(reason) = reason {
            self.reason = reason;
        }
        self.attempts += 1;
        let policy = &plugin.restart;
        self.next_try = (policy.restart != RestartType::Temporary).then(|| {
            let doubled = policy
                .backoff_min
                .saturating_mul(1u32 << (self.attempts - 1).min(20));
            Instant::now() + doubled.min(policy.backoff_max)
        });
    }

    /// What `plugvisor status` shows: `failed`, the reason where an exit would be, and when it
    /// is tried again; `spawned` is whether its table, as published now, has the front spawn it.
    pub fn status(&self, spawned: bool) -> PluginStatus {
        PluginStatus {
            name: self.name.clone(),
            state: "failed".into(),
            spawned,
            connected: false,
            pid: None,
            uptime_secs: None,
            restarts: 0,
            last_exit: Some(format!("not started: {}", self.reason)),
            last_error: None,
            queue_depth: 0,
            dropped_events: 0,
            retry_in_ms: self
                .next_try
                .map(|t| t.saturating_duration_since(Instant::now()).as_millis() as u64),
            stuck_lanes: 0,
            draining: Vec::new(),
        }
    }
}

/// What starting a plugin needs besides its table.
pub struct Launcher {
    /// The running configuration (tables, socket paths, ping interval, stop grace).
    pub config: Published,
    /// Forks plugin processes.
    pub spawner: Spawner,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// The batch clock the plugins' links share.
    pub clock: Arc<crate::plugin::link::BatchClock>,
    /// The links in config order, published to the data path whenever the set changes.
    pub links: watch::Sender<crate::data_path::ext_proc::Links>,
}

/// The configured plugins, in config order.
pub struct Plugins {
    entries: RwLock<Vec<Arc<PluginOwner>>>,
    unstarted: RwLock<Vec<Unstarted>>,
    launcher: Launcher,
    /// Held by whoever changes the set of plugins (a reload, a retry, `plugvisor start` of an
    /// unstarted plugin), so those never interleave.
    changes: tokio::sync::Mutex<()>,
    /// Set once this front handed its socket paths to a new front (an upgrade): nothing is
    /// bound here any more.
    frozen: std::sync::atomic::AtomicBool,
    /// Rung when the unstarted plugins or their next tries change, and when the registry is
    /// dropped: [`retry_loop`] sleeps until the earliest try is due or this rings, so a front
    /// whose plugins all started never wakes for it.
    retries_changed: Arc<tokio::sync::Notify>,
}

impl Drop for Plugins {
    fn drop(&mut self) {
        self.retries_changed.notify_one();
    }
}

impl Plugins {
    /// The registry of a front that started `entries`.
    pub fn new(entries: Vec<Arc<PluginOwner>>, launcher: Launcher) -> Plugins {
        Plugins {
            entries: RwLock::new(entries),
            unstarted: RwLock::new(Vec::new()),
            launcher,
            changes: tokio::sync::Mutex::new(()),
            frozen: std::sync::atomic::AtomicBool::new(false),
            retries_changed: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Stops starting plugins: the socket paths belong to the new front an upgrade handed
    /// them to.
    pub fn freeze(&self) {
        self.frozen
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// The plugins' owners, in config order.
    pub fn entries(&self) -> Vec<Arc<PluginOwner>> {
        self.entries.read().expect("plugins lock").clone()
    }

    /// The plugins that could not be started.
    pub fn unstarted(&self) -> Vec<Unstarted> {
        self.unstarted.read().expect("plugins lock").clone()
    }

    /// What starting a plugin needs.
    pub fn launcher(&self) -> &Launcher {
        &self.launcher
    }

    /// Taken while the set of plugins changes.
    pub async fn lock_changes(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.changes.lock().await
    }

    /// Replaces the whole set (a reload), and tells the data path.
    pub fn replace(&self, entries: Vec<Arc<PluginOwner>>, unstarted: Vec<Unstarted>) {
        let links: Vec<Arc<PluginLink>> = entries.iter().map(|e| e.link().clone()).collect();
        self.launcher.links.send_replace(Arc::new(links));
        *self.entries.write().expect("plugins lock") = entries;
        *self.unstarted.write().expect("plugins lock") = unstarted;
        self.retries_changed.notify_one();
    }

    /// Forgets every plugin (the front is stopping) and returns their owners.
    pub fn take_all(&self) -> Vec<Arc<PluginOwner>> {
        self.unstarted.write().expect("plugins lock").clear();
        std::mem::take(&mut *self.entries.write().expect("plugins lock"))
    }

    /// Binds `plugin`'s socket and starts its owner (which starts its process when spawned).
    pub fn launch(&self, plugin: &PluginConfig) -> Result<Arc<PluginOwner>, String> {
        if self.frozen.load(std::sync::atomic::Ordering::Acquire) {
            return Err("this front handed its sockets to a new front (upgrade)".into());
        }
        let config = &self.launcher.config;
        let owner = Bound::bind(
            &config.current(),
            plugin,
            &self.launcher.metrics,
            &self.launcher.clock,
        )?
        .start(config, &self.launcher.spawner);
        Ok(Arc::new(owner))
    }

    /// The `required` plugins not connected right now, unstarted ones included, in config order
    /// (`/healthz`).
    pub fn required_down(&self) -> Vec<String> {
        let mut down: Vec<String> = self
            .entries()
            .iter()
            .filter(|e| e.link().config().required && !e.link().is_connected())
            .map(|e| e.name().to_owned())
            .collect();
        let config = self.launcher.config.current();
        let required = |name: &str| config.plugins.iter().any(|p| p.name == name && p.required);
        down.extend(
            self.unstarted()
                .iter()
                .filter(|u| required(u.name()))
                .map(|u| u.name().to_owned()),
        );
        down.sort_by_key(|name| self.position(name));
        down
    }

    /// Every plugin's status, in config order.
    pub fn status(&self) -> Vec<PluginStatus> {
        let mut status: Vec<PluginStatus> = self.entries().iter().map(|e| e.status()).collect();
        let config = self.launcher.config.current();
        let spawned = |name: &str| {
            config
                .plugins
                .iter()
                .any(|p| p.name == name && p.process.spawn)
        };
        status.extend(self.unstarted().iter().map(|u| u.status(spawned(u.name()))));
        status.sort_by_key(|s| self.position(&s.name));
        status
    }

    /// `name`'s position in the running configuration.
    fn position(&self, name: &str) -> usize {
        self.launcher
            .config
            .current()
            .plugins
            .iter()
            .position(|p| p.name == name)
            .unwrap_or(usize::MAX)
    }

    /// Starts, stops or restarts a plugin. For a plugin that could not be started, `start` and
    /// `restart` try again at once and `stop` ends its retries.
    pub async fn command(&self, name: &str, command: Command) -> Result<String, String> {
        if self.unstarted().iter().any(|u| u.name() == name) {
            return self.command_unstarted(name, command).await;
        }
        let entries = self.entries();
        let Some(entry) = entries.iter().find(|e| e.name() == name) else {
            let mut known: Vec<String> = entries.iter().map(|e| e.name().to_owned()).collect();
            known.extend(self.unstarted().iter().map(|u| u.name().to_owned()));
            return Err(format!(
                "no plugin `{name}` is configured (configured: {})",
                known.join(", ")
            ));
        };
        entry.command(command).await
    }

    async fn command_unstarted(&self, name: &str, command: Command) -> Result<String, String> {
        let _changes = self.lock_changes().await;
        match command {
            Command::Stop => {
                let mut unstarted = self.unstarted.write().expect("plugins lock");
                let u = unstarted.iter_mut().find(|u| u.name() == name);
                if let Some(u) = u {
                    u.next_try = None;
                }
                Ok(format!(
                    "{name} is not running (it could not be started); it is not retried until \
                     `plugvisor start {name}` or a reload"
                ))
            }
            Command::Start | Command::Restart => match self.try_start(name) {
                Some(Ok(())) => Ok(format!("{name}: starting")),
                Some(Err(reason)) => Err(format!("plugin `{name}` cannot be started: {reason}")),
                None => Ok(format!("{name} was started meanwhile")),
            },
        }
    }

    /// Tries to start the unstarted plugin `name` (the caller holds [`Plugins::lock_changes`]):
    /// on success it joins the running plugins; on failure its reason and next retry are
    /// updated. `None` when it is no longer unstarted.
    fn try_start(&self, name: &str) -> Option<Result<(), String>> {
        self.unstarted().iter().find(|u| u.name() == name)?;
        let Some(plugin) = self.launcher.config.plugin(name) else {
            // Removed from the configuration meanwhile: nothing left to start.
            self.unstarted
                .write()
                .expect("plugins lock")
                .retain(|u| u.name() != name);
            return None;
        };
        match self.launch(&plugin) {
            Ok(owner) => {
                tracing::info!(plugin = %name, "plugin that could not be started earlier is now started");
                let mut entries = self.entries();
                entries.push(owner);
                entries.sort_by_key(|e| self.position(e.name()));
                let unstarted: Vec<Unstarted> = self
                    .unstarted()
                    .into_iter()
                    .filter(|u| u.name() != name)
                    .collect();
                self.replace(entries, unstarted);
                Some(Ok(()))
            }
            Err(reason) => {
                let mut unstarted = self.unstarted.write().expect("plugins lock");
                let u = unstarted.iter_mut().find(|u| u.name() == name)?;
                u.failed_again(&plugin, Some(reason.clone()));
                self.retries_changed.notify_one();
                tracing::warn!(plugin = %name, %reason, attempts = u.attempts, retry_in_ms = u.next_try.map(|t| t.saturating_duration_since(Instant::now()).as_millis() as u64), "plugin still cannot be started");
                Some(Err(reason))
            }
        }
    }
}

/// Retries the unstarted plugins whose next try is due, until the registry is dropped. Sleeps
/// until the earliest next try, or until the unstarted plugins change.
pub async fn retry_loop(plugins: std::sync::Weak<Plugins>) {
    let Some(changed) = plugins.upgrade().map(|p| p.retries_changed.clone()) else {
        return;
    };
    loop {
        let next = {
            let Some(plugins) = plugins.upgrade() else {
                return;
            };
            if plugins.frozen.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            let now = Instant::now();
            let unstarted = plugins.unstarted();
            let due: Vec<String> = unstarted
                .iter()
                .filter(|u| u.next_try.is_some_and(|t| t <= now))
                .map(|u| u.name().to_owned())
                .collect();
            if !due.is_empty() {
                let _changes = plugins.lock_changes().await;
                for name in due {
                    let _ = plugins.try_start(&name);
                }
                continue;
            }
            unstarted.iter().filter_map(|u| u.next_try).min()
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => {}
                    () = changed.notified() => {}
                }
            }
            None => changed.notified().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(text: &str) -> PluginConfig {
        crate::config::Config::parse(text, "test")
            .unwrap()
            .plugins
            .remove(0)
    }

    #[test]
    fn an_unstarted_plugin_shows_as_failed_with_its_reason_and_next_try() {
        let u = Unstarted::new(
            &plugin("[plugins.x]\nbackoff_min_ms = 1000\n"),
            "group `g` does not exist".into(),
        );
        let s = u.status(true);
        assert_eq!(s.state, "failed");
        assert_eq!(
            s.last_exit.as_deref(),
            Some("not started: group `g` does not exist")
        );
        assert!(
            s.retry_in_ms.is_some_and(|ms| ms > 900 && ms <= 1000),
            "{s:?}"
        );
    }

    #[test]
    fn retries_back_off_by_the_policy_up_to_its_cap_and_never_for_temporary() {
        let table = plugin("[plugins.x]\nbackoff_min_ms = 100\nbackoff_max_ms = 350\n");
        let mut u = Unstarted::new(&table, "r".into());
        let mut delays = Vec::new();
        for _ in 0..4 {
            let next = u.next_try.unwrap();
            delays.push(next.saturating_duration_since(Instant::now()).as_millis() as u64);
            u.failed_again(&table, None);
        }
        // 100, 200, then the 350 cap (read back a moment later, so slightly under).
        assert!(delays[0] <= 100 && delays[0] > 50, "{delays:?}");
        assert!(delays[1] <= 200 && delays[1] > 150, "{delays:?}");
        assert!(delays[2] <= 350 && delays[2] > 300, "{delays:?}");
        assert!(delays[3] <= 350 && delays[3] > 300, "{delays:?}");
        let t = Unstarted::new(
            &plugin("[plugins.x]\nrestart = \"temporary\"\n"),
            "r".into(),
        );
        assert_eq!(t.next_try, None);
        assert_eq!(t.status(true).retry_in_ms, None);
    }
}
