//! Turning the plugins' metadata into Envoy's `dynamic_metadata`, always in a shape Envoy accepts.
//!
//! Each plugin answers the final RPC with `namespace → map`. The front merges the answers in config
//! order (a later plugin's key wins over an earlier one's in the same namespace), adds its own
//! namespace `plugvisor` with the plugins whose metadata is missing and why, and encodes the result
//! as a `google.protobuf.Struct` keyed by namespace, which is what Envoy expects.
//!
//! One plugin's answer must never cost the stream or the other plugins: Envoy fails the whole
//! ext_proc stream (and with it the client's response) on metadata nested too deeply, and a large
//! answer costs memory in the front and in Envoy. So each answer is checked before it is merged:
//! nested at most [`MAX_DEPTH`] levels, at most the plugin's `metadata_max_bytes` as Envoy receives
//! it (protobuf bytes), and it must fit what is left of the stream's `stream_metadata_max_bytes`.
//! An answer that fails a check is left out whole and listed under `plugvisor.reasons`.

use std::collections::{BTreeMap, HashMap};

use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value as PbValue};
use ipc_protocol::{Metadata, Value};
use prost::Message as _;

/// The front's own namespace.
pub const FRONT_NAMESPACE: &str = "plugvisor";

/// How deeply a value may nest inside a plugin's namespace (the namespace's own map is level 1).
///
/// Envoy 1.40 parses the ext_proc reply with protobuf's default recursion limit of 100, and every
/// level of a `Struct` costs three protobuf levels (`Struct`, its map entry, `Value`): a namespace
/// nested 33 levels deep (counted like [`depth`]) still passes, 34 fails the ext_proc stream and
/// truncates the client's response (`tests/tests/it/data_path.rs` pins the edge with a real Envoy).
/// Half of that leaves room for whatever Envoy adds around it.
pub const MAX_DEPTH: usize = 16;

/// Why a plugin's metadata is not in a stream's `dynamic_metadata`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Excluded {
    /// No live connection.
    Down,
    /// No answer within `final_timeout`.
    Timeout,
    /// The plugin answered with an error.
    Failed,
    /// The answer was larger than the plugin's `metadata_max_bytes`.
    TooLarge,
    /// The answer nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// The answer did not fit in what was left of `stream_metadata_max_bytes`.
    StreamFull,
    /// The stream started while `max_streams` streams were active: no plugin saw it.
    Shed,
    /// The stream's event hung the plugin (see `stuck_timeout_ms`).
    Stuck,
    /// No process serves the plugin and none is coming (see [`Missing`]): `stopped`,
    /// `gave_up`, `not_connected` or `backoff`, reported without waiting for the deadline.
    NotComing(crate::plugin::link::Missing),
}

impl Excluded {
    /// The name used in `plugvisor.reasons` and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Excluded::Down => "down",
            Excluded::Timeout => "timeout",
            Excluded::Failed => "failed",
            Excluded::TooLarge => "too_large",
            Excluded::TooDeep => "too_deep",
            Excluded::StreamFull => "stream_full",
            Excluded::Shed => "max_streams",
            Excluded::Stuck => "stuck",
            Excluded::NotComing(m) => m.as_str(),
        }
    }
}

impl From<crate::plugin::link::Missing> for Excluded {
    fn from(m: crate::plugin::link::Missing) -> Excluded {
        match m {
            crate::plugin::link::Missing::Down => Excluded::Down,
            crate::plugin::link::Missing::Timeout => Excluded::Timeout,
            crate::plugin::link::Missing::Failed => Excluded::Failed,
            crate::plugin::link::Missing::Stuck => Excluded::Stuck,
            other => Excluded::NotComing(other),
        }
    }
}

/// Accumulates the answers of one final RPC.
#[derive(Debug)]
pub struct Merge {
    namespaces: BTreeMap<String, HashMap<String, PbValue>>,
    /// Protobuf bytes of the answers merged so far (an upper bound of the merged size).
    used: usize,
    stream_cap: usize,
    missing: Vec<(String, Excluded)>,
    /// Plugins that answered, but for a stream some of whose events they never got.
    partial: Vec<(String, u32)>,
    /// Namespaces plugins answered without a grant, left out.
    denied: BTreeMap<String, Vec<String>>,
}

impl Merge {
    /// A merge whose plugins' metadata may take at most `stream_cap` protobuf bytes in all.
    pub fn new(stream_cap: usize) -> Merge {
        Merge {
            namespaces: BTreeMap::new(),
            used: 0,
            stream_cap,
            missing: Vec::new(),
            partial: Vec::new(),
            denied: BTreeMap::new(),
        }
    }

    /// Adds one plugin's answer if it passes every check (depth, `plugin_cap`, what is left of
    /// the stream's cap); otherwise leaves all of it out, records why, and returns the reason.
    /// A namespace whose value is not a map is kept under `value`. Namespaces not in `granted`
    /// (the front's own among them) are not the plugin's to write: they are left out first and
    /// recorded under `denied`, and the rest goes on.
    pub fn add(
        &mut self,
        plugin: &str,
        mut metadata: Metadata,
        plugin_cap: usize,
        granted: &[String],
    ) -> Result<usize, Excluded> {
        let denied: Vec<String> = metadata
            .keys()
            .filter(|ns| granted.binary_search(ns).is_err())
            .cloned()
            .collect();
        for ns in &denied {
            metadata.remove(ns);
        }
        if !denied.is_empty() {
            self.denied.insert(plugin.to_owned(), denied);
        }
        let checked = check(metadata, plugin_cap).and_then(|(namespaces, size)| {
            if self.used + size > self.stream_cap {
                Err(Excluded::StreamFull)
            } else {
                Ok((namespaces, size))
            }
        });
        match checked {
            Ok((namespaces, size)) => {
                self.used += size;
                for (namespace, fields) in namespaces {
                    self.namespaces.entry(namespace).or_default().extend(fields);
                }
                Ok(size)
            }
            Err(reason) => {
                self.missing(plugin, reason);
                Err(reason)
            }
        }
    }

    /// Records a plugin whose metadata is missing, and why.
    pub fn missing(&mut self, plugin: &str, why: Excluded) {
        self.missing.push((plugin.to_owned(), why));
    }

    /// Records a plugin that answered without having seen `lost` of the stream's events (dropped
    /// on a full queue, or past the replay journal when its process was replaced).
    pub fn partial(&mut self, plugin: &str, lost: u32) {
        self.partial.push((plugin.to_owned(), lost));
    }

    /// The namespaces each plugin answered without a grant, left out.
    pub fn denied(&self) -> &BTreeMap<String, Vec<String>> {
        &self.denied
    }

    /// The plugins recorded as missing, in config order.
    pub fn missing_names(&self) -> Vec<&str> {
        self.missing.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The `dynamic_metadata` struct, with
    /// `plugvisor: {stream_id, front_pid, missing: [names], reasons: {name: reason}}` (stream ids
    /// count per front: after an upgrade two fronts serve at once) and, when a plugin
    /// answered for a stream it did not see whole, `partial: {name: events it never got}`, and
    /// when a plugin answered namespaces it may not write, `denied: {name: [namespaces]}`.
    pub fn into_struct(self, stream_id: u64) -> Struct {
        let mut fields: HashMap<String, PbValue> = self
            .namespaces
            .into_iter()
            .map(|(ns, fields)| (ns, struct_value(fields)))
            .collect();
        let front = Value::map([
            ("stream_id", Value::from(stream_id)),
            ("front_pid", Value::from(u64::from(std::process::id()))),
            (
                "missing",
                Value::List(
                    self.missing
                        .iter()
                        .map(|(n, _)| Value::String(n.clone()))
                        .collect(),
                ),
            ),
            (
                "reasons",
                Value::Map(
                    self.missing
                        .into_iter()
                        .map(|(n, why)| (n, Value::from(why.as_str())))
                        .collect(),
                ),
            ),
        ]);
        let front = match (front, self.denied.is_empty()) {
            (Value::Map(mut map), false) => {
                map.insert(
                    "denied".to_owned(),
                    Value::Map(
                        self.denied
                            .into_iter()
                            .map(|(n, ns)| {
                                (n, Value::List(ns.into_iter().map(Value::String).collect()))
                            })
                            .collect(),
                    ),
                );
                Value::Map(map)
            }
            (front, _) => front,
        };
        let front = match (front, self.partial.is_empty()) {
            (Value::Map(mut map), false) => {
                map.insert(
                    "partial".to_owned(),
                    Value::Map(
                        self.partial
                            .into_iter()
                            .map(|(n, lost)| (n, Value::from(u64::from(lost))))
                            .collect(),
                    ),
                );
                Value::Map(map)
            }
            (front, _) => front,
        };
        fields.insert(FRONT_NAMESPACE.to_owned(), to_pb(&front));
        Struct { fields }
    }
}

/// One answer converted, with its size as Envoy receives it, or why it cannot be sent.
type Checked = (Vec<(String, HashMap<String, PbValue>)>, usize);

fn check(metadata: Metadata, plugin_cap: usize) -> Result<Checked, Excluded> {
    let mut namespaces = Vec::with_capacity(metadata.len());
    let mut size = 0;
    for (namespace, value) in metadata {
        let fields = match value {
            Value::Map(map) => map,
            other => BTreeMap::from([("value".to_owned(), other)]),
        };
        // The namespace's map is level 1, its values level 2.
        if fields.values().any(|v| depth(v) + 1 > MAX_DEPTH) {
            return Err(Excluded::TooDeep);
        }
        let fields: HashMap<String, PbValue> =
            fields.iter().map(|(k, v)| (k.clone(), to_pb(v))).collect();
        // Measured as one entry of the `dynamic_metadata` struct: what it adds to Envoy's reply.
        let entry = Struct {
            fields: HashMap::from([(namespace, struct_value(fields))]),
        };
        size += entry.encoded_len();
        if size > plugin_cap {
            return Err(Excluded::TooLarge);
        }
        namespaces.extend(
            entry
                .fields
                .into_iter()
                .map(|(ns, value)| match value.kind {
                    Some(Kind::StructValue(s)) => (ns, s.fields),
                    _ => (ns, HashMap::new()),
                }),
        );
    }
    Ok((namespaces, size))
}

/// Nesting of a value: scalars are 1, a list or map is one more than its deepest element.
pub fn depth(v: &Value) -> usize {
    match v {
        Value::List(l) => 1 + l.iter().map(depth).max().unwrap_or(0),
        Value::Map(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        _ => 1,
    }
}

fn struct_value(fields: HashMap<String, PbValue>) -> PbValue {
    PbValue {
        kind: Some(Kind::StructValue(Struct { fields })),
    }
}

/// `dynamic_metadata` as JSON, namespace by namespace (numbers as JSON numbers, as Envoy's
/// access log prints them): what a usage record carries.
pub fn to_json(metadata: &Struct) -> std::collections::BTreeMap<String, serde_json::Value> {
    fn json(v: &PbValue) -> serde_json::Value {
        match v.kind.as_ref() {
            None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
            Some(Kind::BoolValue(b)) => (*b).into(),
            Some(Kind::NumberValue(n)) => number(*n),
            Some(Kind::StringValue(s)) => s.clone().into(),
            Some(Kind::ListValue(l)) => l.values.iter().map(json).collect(),
            Some(Kind::StructValue(s)) => s
                .fields
                .iter()
                .map(|(k, v)| (k.clone(), json(v)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        }
    }
    // Whole numbers stay integers (token counts), as they were before Envoy's doubles.
    fn number(n: f64) -> serde_json::Value {
        if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
            serde_json::Value::from(n as i64)
        } else {
            serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, Into::into)
        }
    }
    metadata
        .fields
        .iter()
        .map(|(k, v)| (k.clone(), json(v)))
        .collect()
}

/// Converts a protocol value to a protobuf value (integers become doubles, as in JSON; a NaN or
/// infinite float, which JSON cannot carry and Envoy's access log cannot print, becomes null).
pub fn to_pb(v: &Value) -> PbValue {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Int(i) => Kind::NumberValue(*i as f64),
        Value::Float(f) if f.is_finite() => Kind::NumberValue(*f),
        Value::Float(_) => Kind::NullValue(0),
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

    fn front(s: &Struct) -> serde_json::Value {
        fn json(v: &PbValue) -> serde_json::Value {
            match v.kind.as_ref().unwrap() {
                Kind::NullValue(_) => serde_json::Value::Null,
                Kind::BoolValue(b) => (*b).into(),
                Kind::NumberValue(n) => (*n).into(),
                Kind::StringValue(s) => s.clone().into(),
                Kind::ListValue(l) => l.values.iter().map(json).collect(),
                Kind::StructValue(s) => s
                    .fields
                    .iter()
                    .map(|(k, v)| (k.clone(), json(v)))
                    .collect::<serde_json::Map<_, _>>()
                    .into(),
            }
        }
        json(&s.fields[FRONT_NAMESPACE])
    }

    /// A map nested `levels` deep: `{"k": {"k": ... 1}}` (a scalar is level 1).
    fn nested(levels: usize) -> Value {
        (1..levels).fold(Value::Int(1), |v, _| Value::map([("k", v)]))
    }

    impl Merge {
        /// [`Merge::add`] with every namespace of the answer granted but the front's own.
        fn add_granted(
            &mut self,
            plugin: &str,
            md: Metadata,
            cap: usize,
        ) -> Result<usize, Excluded> {
            let granted: Vec<String> = md
                .keys()
                .filter(|k| *k != FRONT_NAMESPACE)
                .cloned()
                .collect();
            self.add(plugin, md, cap, &granted)
        }
    }

    #[test]
    fn namespaces_without_a_grant_are_left_out_and_listed_and_the_rest_goes_on() {
        let mut m = Merge::new(64 * 1024);
        let liar = Metadata::from([
            (
                "plugvisor.usage".to_owned(),
                Value::map([("total_tokens", Value::Int(999_999))]),
            ),
            (
                "plugvisor.liar".to_owned(),
                Value::map([("n", Value::Int(1))]),
            ),
            (
                "plugvisor".to_owned(),
                Value::map([("missing", Value::Int(0))]),
            ),
        ]);
        let usage = one(
            "plugvisor.usage",
            Value::map([("total_tokens", Value::Int(42))]),
        );
        m.add("usage", usage, 1024, &["plugvisor.usage".to_owned()])
            .unwrap();
        m.add("liar", liar, 1024, &["plugvisor.liar".to_owned()])
            .unwrap();
        assert_eq!(
            m.denied()["liar"],
            vec!["plugvisor".to_owned(), "plugvisor.usage".to_owned()]
        );
        let s = m.into_struct(3);
        assert_eq!(num(&s, "plugvisor.usage", "total_tokens"), Some(42.0));
        assert_eq!(num(&s, "plugvisor.liar", "n"), Some(1.0));
        assert_eq!(
            front(&s)["denied"],
            serde_json::json!({"liar": ["plugvisor", "plugvisor.usage"]})
        );
        assert_eq!(front(&s)["missing"], serde_json::json!([]));
    }

    fn one(ns: &str, value: Value) -> Metadata {
        Metadata::from([(ns.to_owned(), value)])
    }

    #[test]
    fn later_plugins_win_within_a_namespace_and_missing_is_listed_with_its_reason() {
        let mut m = Merge::new(64 * 1024);
        m.add_granted(
            "a",
            one(
                "envoy.lb",
                Value::map([("a", Value::Int(1)), ("b", Value::Int(2))]),
            ),
            16 * 1024,
        )
        .unwrap();
        m.missing("latency", Excluded::Timeout);
        m.add_granted(
            "c",
            one("envoy.lb", Value::map([("b", Value::Int(3))])),
            1024,
        )
        .unwrap();
        let s = m.into_struct(7);
        assert_eq!(num(&s, "envoy.lb", "a"), Some(1.0));
        assert_eq!(num(&s, "envoy.lb", "b"), Some(3.0));
        assert_eq!(num(&s, "plugvisor", "stream_id"), Some(7.0));
        assert_eq!(
            front(&s),
            serde_json::json!({"stream_id": 7.0, "front_pid": f64::from(std::process::id()), "missing": ["latency"], "reasons": {"latency": "timeout"}})
        );
    }

    #[test]
    fn depth_is_accepted_at_the_limit_and_refused_one_past_it() {
        // The namespace map is level 1: a value of MAX_DEPTH - 1 levels fills it exactly.
        let mut m = Merge::new(64 * 1024);
        assert!(m
            .add_granted(
                "at",
                one("ns.at", Value::map([("v", nested(MAX_DEPTH - 1))])),
                16 * 1024
            )
            .is_ok());
        assert_eq!(
            m.add_granted(
                "past",
                one("ns.past", Value::map([("v", nested(MAX_DEPTH))])),
                16 * 1024
            ),
            Err(Excluded::TooDeep)
        );
        // Lists count like maps.
        let list = (1..MAX_DEPTH).fold(Value::Int(1), |v, _| Value::List(vec![v]));
        assert_eq!(
            m.add_granted("list", one("ns.list", Value::map([("v", list)])), 16 * 1024),
            Err(Excluded::TooDeep)
        );
        let s = m.into_struct(1);
        assert!(s.fields.contains_key("ns.at"));
        assert!(!s.fields.contains_key("ns.past"));
        assert_eq!(
            front(&s)["reasons"],
            serde_json::json!({"past": "too_deep", "list": "too_deep"})
        );
    }

    #[test]
    fn size_is_measured_as_envoy_receives_it_and_capped_at_and_past_the_limit() {
        let md = one("ns", Value::map([("s", Value::from("x".repeat(1000)))]));
        let exact = Struct {
            fields: HashMap::from([(
                "ns".to_owned(),
                to_pb(&Value::map([("s", Value::from("x".repeat(1000)))])),
            )]),
        }
        .encoded_len();
        let mut m = Merge::new(64 * 1024);
        assert_eq!(m.add_granted("at", md.clone(), exact), Ok(exact));
        assert_eq!(
            m.add_granted("past", md, exact - 1),
            Err(Excluded::TooLarge)
        );
    }

    #[test]
    fn the_stream_cap_leaves_out_whole_answers_in_config_order() {
        let big = |ns: &str| one(ns, Value::map([("s", Value::from("y".repeat(600)))]));
        let mut m = Merge::new(1500);
        assert!(m.add_granted("a", big("ns.a"), 1024).is_ok());
        assert!(m.add_granted("b", big("ns.b"), 1024).is_ok());
        assert_eq!(
            m.add_granted("c", big("ns.c"), 1024),
            Err(Excluded::StreamFull)
        );
        // A small answer still fits after a large one was left out.
        assert!(m
            .add_granted("d", one("ns.d", Value::map([("n", Value::Int(1))])), 1024)
            .is_ok());
        let s = m.into_struct(1);
        assert!(s.fields.contains_key("ns.a") && s.fields.contains_key("ns.b"));
        assert!(!s.fields.contains_key("ns.c") && s.fields.contains_key("ns.d"));
        assert_eq!(
            front(&s)["reasons"],
            serde_json::json!({"c": "stream_full"})
        );
    }

    #[test]
    fn the_front_namespace_is_not_the_plugins_and_odd_values_are_kept_sendable() {
        let mut m = Merge::new(64 * 1024);
        let md = Metadata::from([
            (
                "plugvisor".to_owned(),
                Value::map([("missing", Value::Int(0))]),
            ),
            ("ns.scalar".to_owned(), Value::Int(5)),
            (
                "ns.floats".to_owned(),
                Value::map([
                    ("nan", Value::Float(f64::NAN)),
                    ("inf", Value::Float(f64::INFINITY)),
                ]),
            ),
        ]);
        m.add_granted("p", md, 16 * 1024).unwrap();
        let s = m.into_struct(3);
        assert_eq!(front(&s)["missing"], serde_json::json!([]));
        assert_eq!(num(&s, "ns.scalar", "value"), Some(5.0));
        let Some(Kind::StructValue(f)) = s.fields["ns.floats"].kind.as_ref() else {
            panic!()
        };
        assert_eq!(f.fields["nan"].kind, Some(Kind::NullValue(0)));
        assert_eq!(f.fields["inf"].kind, Some(Kind::NullValue(0)));
    }
}
