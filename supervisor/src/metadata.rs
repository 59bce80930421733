//! Turning the plugins' metadata into Envoy's `dynamic_metadata`.
//!
//! Each plugin answers the final RPC with `namespace → map`. The front merges the answers in config
//! order (a later plugin's key wins over an earlier one's in the same namespace), adds its own
//! namespace `plugvisor` with the names of the plugins whose metadata is missing, and encodes the
//! result as a `google.protobuf.Struct` keyed by namespace, which is what Envoy expects.

use std::collections::BTreeMap;

use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value as PbValue};
use ipc_protocol::{Metadata, Value};

/// The front's own namespace.
pub const FRONT_NAMESPACE: &str = "plugvisor";

/// Accumulates the answers of one final RPC.
#[derive(Debug, Default)]
pub struct Merge {
    namespaces: BTreeMap<String, BTreeMap<String, Value>>,
    missing: Vec<String>,
}

impl Merge {
    /// Adds one plugin's metadata; namespaces whose value is not a map are kept under `value`.
    pub fn add(&mut self, metadata: Metadata) {
        for (namespace, value) in metadata {
            if namespace == FRONT_NAMESPACE {
                tracing::debug!("ignoring plugin metadata in the front's own namespace");
                continue;
            }
            let entry = self.namespaces.entry(namespace).or_default();
            match value {
                Value::Map(map) => entry.extend(map),
                other => {
                    entry.insert("value".to_owned(), other);
                }
            }
        }
    }

    /// Records a plugin whose metadata is missing.
    pub fn missing(&mut self, plugin: &str) {
        self.missing.push(plugin.to_owned());
    }

    /// The names recorded as missing, in config order.
    pub fn missing_names(&self) -> &[String] {
        &self.missing
    }

    /// The `dynamic_metadata` struct, with `plugvisor: {stream_id, missing: [...]}`.
    pub fn into_struct(self, stream_id: u64) -> Struct {
        let mut fields: std::collections::HashMap<String, PbValue> = self
            .namespaces
            .into_iter()
            .map(|(ns, map)| (ns, to_pb(&Value::Map(map))))
            .collect();
        let front = Value::map([
            ("stream_id", Value::from(stream_id)),
            (
                "missing",
                Value::List(self.missing.into_iter().map(Value::String).collect()),
            ),
        ]);
        fields.insert(FRONT_NAMESPACE.to_owned(), to_pb(&front));
        Struct { fields }
    }
}

/// Converts a protocol value to a protobuf value (integers become doubles, as in JSON).
pub fn to_pb(v: &Value) -> PbValue {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Int(i) => Kind::NumberValue(*i as f64),
        Value::Float(f) => Kind::NumberValue(*f),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::List(l) => Kind::ListValue(ListValue {
            values: l.iter().map(to_pb).collect(),
        }),
        Value::Map(m) => Kind::StructValue(Struct {
            fields: m.iter().map(|(k, v)| (k.clone(), to_pb(v))).collect(),
        }),
    };
    PbValue { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(s: &Struct, ns: &str, key: &str) -> Option<f64> {
        match s.fields.get(ns)?.kind.as_ref()? {
            Kind::StructValue(inner) => match inner.fields.get(key)?.kind.as_ref()? {
                Kind::NumberValue(n) => Some(*n),
                _ => None,
            },
            _ => None,
        }
    }

    #[test]
    fn later_plugins_win_within_a_namespace_and_missing_is_listed() {
        let mut m = Merge::default();
        m.add(Metadata::from([(
            "envoy.lb".to_owned(),
            Value::map([("a", Value::Int(1)), ("b", Value::Int(2))]),
        )]));
        m.missing("latency");
        m.add(Metadata::from([(
            "envoy.lb".to_owned(),
            Value::map([("b", Value::Int(3))]),
        )]));
        let s = m.into_struct(7);
        assert_eq!(num(&s, "envoy.lb", "a"), Some(1.0));
        assert_eq!(num(&s, "envoy.lb", "b"), Some(3.0));
        assert_eq!(num(&s, "plugvisor", "stream_id"), Some(7.0));
        let Some(Kind::StructValue(front)) = s.fields["plugvisor"].kind.as_ref() else {
            panic!()
        };
        let Some(Kind::ListValue(l)) = front.fields["missing"].kind.as_ref() else {
            panic!()
        };
        assert_eq!(l.values, vec![to_pb(&Value::from("latency"))]);
    }
}
