//! Reading a plugin's config: the [`ConfigError`] a plugin returns from
//! [`crate::Plugin::configure`], and small helpers that read typed keys out of the
//! [`Value::Map`] the front sends, naming the offending key in every error.

use std::collections::BTreeMap;

use ipc_protocol::Value;

/// A plugin's config is invalid. The message names the key and what to change; the host prints
/// it on stderr and exits with code 78.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    /// An error with the given message.
    pub fn new(msg: impl Into<String>) -> Self {
        ConfigError(msg.into())
    }
}

/// A read-only view of a config table that reports unknown keys and wrong types.
#[derive(Debug)]
pub struct ConfigMap<'a> {
    map: Option<&'a BTreeMap<String, Value>>,
    path: String,
}

static EMPTY: BTreeMap<String, Value> = BTreeMap::new();

impl<'a> ConfigMap<'a> {
    /// Views `config` as a table; `Null` is an empty table, anything else but a map is an error.
    pub fn new(config: &'a Value) -> Result<Self, ConfigError> {
        Self::at(config, "config")
    }

    fn at(value: &'a Value, path: &str) -> Result<Self, ConfigError> {
        match value {
            Value::Null => Ok(ConfigMap {
                map: None,
                path: path.to_owned(),
            }),
            Value::Map(m) => Ok(ConfigMap {
                map: Some(m),
                path: path.to_owned(),
            }),
            other => Err(ConfigError::new(format!(
                "{path} must be a table, got {other}"
            ))),
        }
    }

    fn entries(&self) -> &'a BTreeMap<String, Value> {
        self.map.unwrap_or(&EMPTY)
    }

    /// Fails on any key not in `known`, listing the known ones.
    pub fn deny_unknown(&self, known: &[&str]) -> Result<(), ConfigError> {
        for key in self.entries().keys() {
            if !known.contains(&key.as_str()) {
                return Err(ConfigError::new(format!(
                    "{}: unknown key `{key}` (known keys: {})",
                    self.path,
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                )));
            }
        }
        Ok(())
    }

    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.entries().get(key)
    }

    /// `key` as a string, if present.
    pub fn str(&self, key: &str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong(key, "a string", other)),
        }
    }

    /// `key` as a boolean, if present.
    pub fn bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong(key, "true or false", other)),
        }
    }

    /// `key` as a non-negative integer, if present.
    pub fn u64(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .and_then(|i| u64::try_from(i).ok())
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a non-negative integer", v)),
        }
    }

    /// `key` as a list of tables, each viewed as a [`ConfigMap`]; absent is an empty list.
    pub fn tables(&self, key: &str) -> Result<Vec<ConfigMap<'a>>, ConfigError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::List(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| ConfigMap::at(item, &format!("{key}[{i}]")))
                .collect(),
            Some(other) => Err(self.wrong(key, "a list of tables", other)),
        }
    }

    /// The path of this table in error messages (`config`, `attributes[0]`, ...).
    pub fn path(&self) -> &str {
        &self.path
    }

    fn wrong(&self, key: &str, want: &str, got: &Value) -> ConfigError {
        ConfigError::new(format!("{}.{key} must be {want}, got {got}", self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_config_is_an_empty_table() {
        let v = Value::Null;
        let c = ConfigMap::new(&v).unwrap();
        assert_eq!(c.u64("spin_us").unwrap(), None);
        c.deny_unknown(&[]).unwrap();
    }

    #[test]
    fn errors_name_the_key_and_the_expected_type() {
        let v = Value::map([("spin_us", Value::from("fast")), ("zzz", Value::Int(1))]);
        let c = ConfigMap::new(&v).unwrap();
        let e = c.u64("spin_us").unwrap_err().to_string();
        assert!(
            e.contains("config.spin_us must be a non-negative integer"),
            "{e}"
        );
        let e = c.deny_unknown(&["spin_us"]).unwrap_err().to_string();
        assert!(
            e.contains("unknown key `zzz`") && e.contains("spin_us"),
            "{e}"
        );
    }
}
