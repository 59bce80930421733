//! The sampling decision, as the OpenTelemetry specification defines its built-in samplers
//! (`OTEL_TRACES_SAMPLER`): made once per request, when its headers arrive, from the request's
//! parent (if its `traceparent` is valid) and the trace id.

use crate::config::traces::{RootSampler, Sampler};

/// Whether a request in trace `trace_id` with `parent` (its `traceparent`'s sampled flag, if it
/// had a valid one) is traced.
pub fn sampled(sampler: &Sampler, parent: Option<bool>, trace_id: &[u8; 16]) -> bool {
    if sampler.parent_based {
        // The remote parent's decision (the specification's remoteParentSampled: always_on,
        // remoteParentNotSampled: always_off).
        if let Some(sampled) = parent {
            return sampled;
        }
    }
    match sampler.root {
        RootSampler::AlwaysOn => true,
        RootSampler::AlwaysOff => false,
        RootSampler::TraceIdRatio(p) => ratio(p, trace_id),
    }
}

/// `TraceIdRatioBased`: the trace's randomness (its least significant 56 bits, random in W3C
/// Trace Context level 2 ids and in ours) against the rejection threshold `(1 - p) * 2^56`;
/// deterministic, so every participant with the same ratio keeps the same traces.
pub fn ratio(p: f64, trace_id: &[u8; 16]) -> bool {
    if p >= 1.0 {
        return true;
    }
    if p <= 0.0 {
        return false;
    }
    const SCALE: f64 = (1u64 << 56) as f64;
    let mut low = [0u8; 8];
    low[1..].copy_from_slice(&trace_id[9..16]);
    let randomness = u64::from_be_bytes(low);
    let threshold = ((1.0 - p) * SCALE).round() as u64;
    randomness >= threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(parent_based: bool, root: RootSampler) -> Sampler {
        Sampler { parent_based, root }
    }

    /// A trace id whose randomness is `fraction` of the way up its range.
    fn id_at(fraction: f64) -> [u8; 16] {
        let r = ((fraction * (1u64 << 56) as f64) as u64).min((1 << 56) - 1);
        let mut id = [0xabu8; 16];
        id[9..].copy_from_slice(&r.to_be_bytes()[1..]);
        id
    }

    #[test]
    fn each_sampler_decides_as_the_specification_says() {
        use RootSampler::*;
        let id = id_at(0.3);
        // (sampler, parent's sampled flag, expected)
        let table = [
            (s(false, AlwaysOn), None, true),
            (s(false, AlwaysOn), Some(false), true),
            (s(false, AlwaysOff), None, false),
            (s(false, AlwaysOff), Some(true), false),
            (s(false, TraceIdRatio(0.8)), None, true),
            (s(false, TraceIdRatio(0.8)), Some(false), true),
            (s(false, TraceIdRatio(0.5)), None, false),
            (s(false, TraceIdRatio(0.5)), Some(true), false),
            (s(true, AlwaysOn), None, true),
            (s(true, AlwaysOn), Some(true), true),
            (s(true, AlwaysOn), Some(false), false),
            (s(true, AlwaysOff), None, false),
            (s(true, AlwaysOff), Some(true), true),
            (s(true, AlwaysOff), Some(false), false),
            (s(true, TraceIdRatio(0.8)), None, true),
            (s(true, TraceIdRatio(0.5)), None, false),
            (s(true, TraceIdRatio(0.0)), Some(true), true),
            (s(true, TraceIdRatio(1.0)), Some(false), false),
        ];
        for (sampler, parent, expected) in table {
            assert_eq!(
                sampled(&sampler, parent, &id),
                expected,
                "{sampler:?} with parent {parent:?}"
            );
        }
    }

    #[test]
    fn the_ratio_keeps_that_fraction_of_trace_ids_and_decides_alike_every_time() {
        // At the threshold: kept from exactly (1 - p) up.
        assert!(ratio(0.25, &id_at(0.75)));
        assert!(!ratio(0.25, &id_at(0.7499)));
        assert!(ratio(1.0, &id_at(0.0)) && !ratio(0.0, &id_at(0.9999)));
        let ids: Vec<[u8; 16]> = (0..20_000)
            .map(|_| super::super::context::new_trace_id())
            .collect();
        for p in [0.01, 0.1, 0.5, 0.9] {
            let kept = ids.iter().filter(|id| ratio(p, id)).count() as f64 / ids.len() as f64;
            assert!((kept - p).abs() < 0.02, "p {p}: kept {kept}");
            // Deterministic: the same ids, the same decisions.
            assert!(ids.iter().all(|id| ratio(p, id) == ratio(p, id)));
            // A trace kept at p is kept at any higher ratio.
            assert!(ids
                .iter()
                .filter(|id| ratio(p, id))
                .all(|id| ratio(p + 0.05, id)));
        }
    }
}
