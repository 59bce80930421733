//! The statistics of the benchmark: percentiles of raw samples (nearest rank, no interpolation,
//! so a p99 is always a latency that was really observed), summaries, and quantiles read back from
//! a Prometheus histogram's cumulative buckets the way `histogram_quantile` does.

/// p50/p99 and friends of one sample set, in the samples' unit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

/// The `q`-quantile (0..=1) of `sorted` by nearest rank; NaN when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sorts `samples` and summarizes them.
pub fn summarize(samples: &mut [f64]) -> Summary {
    samples.sort_by(f64::total_cmp);
    if samples.is_empty() {
        return Summary {
            n: 0,
            p50: f64::NAN,
            p90: f64::NAN,
            p99: f64::NAN,
            max: f64::NAN,
            mean: f64::NAN,
        };
    }
    Summary {
        n: samples.len(),
        p50: percentile(samples, 0.50),
        p90: percentile(samples, 0.90),
        p99: percentile(samples, 0.99),
        max: samples[samples.len() - 1],
        mean: samples.iter().sum::<f64>() / samples.len() as f64,
    }
}

/// `a / b`, NaN when `b` is not positive (a ratio to nothing means nothing).
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

/// The `q`-quantile of a histogram given as cumulative `(upper bound, count)` buckets in
/// increasing order (the `+Inf` bucket last), interpolated linearly inside the bucket as
/// Prometheus' `histogram_quantile` does. NaN without observations.
pub fn histogram_quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return f64::NAN;
    };
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return prev.0;
            }
            let in_bucket = count - prev.1;
            if in_bucket <= 0.0 {
                return le;
            }
            return prev.0 + (le - prev.0) * (rank - prev.1) / in_bucket;
        }
        prev = (le, count);
    }
    prev.0
}

/// The cumulative buckets of histogram `name` whose label set contains `label` (e.g.
/// `message="chunk"`), from a Prometheus text exposition.
pub fn parse_buckets(text: &str, name: &str, label: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut out: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(label))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// `after - before`, bucket by bucket (the observations made in between).
pub fn bucket_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|&(le, count)| {
            let was = before
                .iter()
                .find(|(l, _)| *l == le)
                .map_or(0.0, |(_, c)| *c);
            (le, count - was)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles_are_observed_values() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let s = summarize(&mut v);
        assert_eq!(
            (s.n, s.p50, s.p90, s.p99, s.max),
            (100, 50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(s.mean, 50.5);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
        assert!(summarize(&mut []).p50.is_nan());
        // Small sets: p99 of 10 samples is the largest.
        let mut ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(summarize(&mut ten).p99, 10.0);
    }

    #[test]
    fn ratios_to_nothing_are_nan() {
        assert_eq!(ratio(3.0, 2.0), 1.5);
        assert!(ratio(1.0, 0.0).is_nan());
        assert!(ratio(1.0, -1.0).is_nan());
    }

    #[test]
    fn histogram_quantiles_interpolate_like_prometheus() {
        // 10 observations in (0, 1], 10 in (1, 2], none above.
        let b = [(1.0, 10.0), (2.0, 20.0), (f64::INFINITY, 20.0)];
        assert_eq!(histogram_quantile(&b, 0.5), 1.0);
        assert_eq!(histogram_quantile(&b, 0.25), 0.5);
        assert_eq!(histogram_quantile(&b, 0.75), 1.5);
        assert!(histogram_quantile(&[(1.0, 0.0), (f64::INFINITY, 0.0)], 0.5).is_nan());
        // Everything beyond the last finite bound: the bound is the answer.
        assert_eq!(
            histogram_quantile(&[(1.0, 0.0), (f64::INFINITY, 5.0)], 0.5),
            1.0
        );
    }

    #[test]
    fn buckets_are_parsed_and_subtracted() {
        let before = "# HELP x\n\
            plugvisor_response_overhead_seconds_bucket{le=\"0.00001\",message=\"chunk\"} 1\n\
            plugvisor_response_overhead_seconds_bucket{le=\"+Inf\",message=\"chunk\"} 2\n\
            plugvisor_response_overhead_seconds_bucket{le=\"0.00001\",message=\"final\"} 9\n";
        let after =
            "plugvisor_response_overhead_seconds_bucket{message=\"chunk\",le=\"+Inf\"} 12\n\
            plugvisor_response_overhead_seconds_bucket{message=\"chunk\",le=\"0.00001\"} 5\n";
        let name = "plugvisor_response_overhead_seconds";
        let b = parse_buckets(before, name, "message=\"chunk\"");
        let a = parse_buckets(after, name, "message=\"chunk\"");
        assert_eq!(b, vec![(0.00001, 1.0), (f64::INFINITY, 2.0)]);
        assert_eq!(
            bucket_delta(&b, &a),
            vec![(0.00001, 4.0), (f64::INFINITY, 10.0)]
        );
    }
}
