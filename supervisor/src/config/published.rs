//! The running configuration, published once.
//!
//! [`Published`] holds the one `Arc<Config>` the front runs with. Every reader (the data path's
//! stream limits, the plugins' owners, the launcher, the control socket, the stop) reads it from
//! here when it needs a value, so a reload, which replaces it whole, reaches each of them without
//! anyone copying a key by hand. Only the reload ([`crate::shell::reload`]) replaces it.

use std::sync::Arc;

use tokio::sync::watch;

use super::{Config, PluginConfig};

/// The running configuration; cheap to clone, every clone sees the same value.
#[derive(Clone)]
pub struct Published {
    tx: Arc<watch::Sender<Arc<Config>>>,
}

impl std::fmt::Debug for Published {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Published").field(&self.current()).finish()
    }
}

impl Published {
    /// Publishes `config` as the running configuration.
    pub fn new(config: Config) -> Published {
        Published {
            tx: Arc::new(watch::channel(Arc::new(config)).0),
        }
    }

    /// The configuration as it stands now.
    pub fn current(&self) -> Arc<Config> {
        self.tx.borrow().clone()
    }

    /// `name`'s table in the running configuration, if it is configured.
    pub fn plugin(&self, name: &str) -> Option<PluginConfig> {
        self.tx
            .borrow()
            .plugins
            .iter()
            .find(|p| p.name == name)
            .cloned()
    }

    /// A receiver that sees every later configuration.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        self.tx.subscribe()
    }

    /// Replaces the running configuration (a reload); returns the one it replaced.
    pub(crate) fn replace(&self, config: Config) -> Arc<Config> {
        self.tx.send_replace(Arc::new(config))
    }
}
