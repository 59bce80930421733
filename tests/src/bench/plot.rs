//! The picture: per-chunk latency distributions (CDFs on a log axis), one curve per
//! configuration, drawn with plotters' SVG backend.

use std::path::Path;

use plotters::prelude::*;

use super::stats::percentile;

const COLORS: [RGBColor; 6] = [
    RGBColor(0, 0, 0),
    RGBColor(120, 120, 120),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(214, 39, 40),
];

/// Draws the CDF of each `(name, sorted samples in µs)` into `path`.
pub fn cdf_svg(path: &Path, title: &str, series: &[(String, Vec<f64>)]) -> Result<(), String> {
    let all = series.iter().flat_map(|(_, v)| v.iter().copied());
    let lo = all.clone().fold(f64::INFINITY, f64::min).max(1.0);
    let hi = all.fold(0.0, f64::max).max(lo * 10.0);
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d((lo * 0.9..hi * 1.1).log_scale(), 0.0f64..1.0)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("per-chunk latency, upstream write to client read (µs, log scale)")
        .y_desc("fraction of chunks")
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, (name, sorted)) in series.iter().enumerate() {
        if sorted.is_empty() {
            continue;
        }
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(f64, f64)> = (0..=400)
            .map(|k| {
                let q = k as f64 / 400.0;
                (percentile(sorted, q).max(lo), q)
            })
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// The lifecycle picture: above, per-chunk latency over time (p50, p99 and max of each
/// `bin_s` bin, log axis); below, each stream's metadata at the time it ended (whole at 1, not
/// whole at 0) and the whole fraction of each bin; a dashed line at every event, labelled.
pub fn timeline_svg(
    path: &Path,
    title: &str,
    t: &super::lifecycle::Timeline,
    bin_s: f64,
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let end = t.seconds.max(
        t.streams
            .last()
            .map_or(0.0, |s| s.end_s)
            .max(t.chunks.last().map_or(0.0, |c| c.0)),
    );
    let bins = (end / bin_s).ceil().max(1.0) as usize;
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); bins];
    for &(at, us) in &t.chunks {
        lat[((at / bin_s) as usize).min(bins - 1)].push(us);
    }
    let mut quant = |q: f64| -> Vec<(f64, f64)> {
        lat.iter_mut()
            .enumerate()
            .filter(|(_, v)| !v.is_empty())
            .map(|(i, v)| {
                v.sort_by(f64::total_cmp);
                ((i as f64 + 0.5) * bin_s, percentile(v, q).max(1.0))
            })
            .collect()
    };
    let (p50, p99, max) = (quant(0.5), quant(0.99), quant(1.0));
    let hi = max.iter().map(|p| p.1).fold(10.0, f64::max) * 2.0;
    let lo = p50
        .iter()
        .map(|p| p.1)
        .fold(f64::INFINITY, f64::min)
        .min(hi / 20.0)
        / 2.0;

    let root = SVGBackend::new(path, (1100, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| err(&e))?;
    let (upper, lower) = root.split_vertically(400);
    let mut top = ChartBuilder::on(&upper)
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end, (lo..hi).log_scale())
        .map_err(|e| err(&e))?;
    top.configure_mesh()
        .y_desc("per-chunk latency (µs, log)")
        .x_desc("time since the load started (s)")
        .draw()
        .map_err(|e| err(&e))?;
    for (name, pts, color) in [
        ("max", &max, COLORS[1]),
        ("p99", &p99, COLORS[5]),
        ("p50", &p50, COLORS[2]),
    ] {
        top.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(format!("{name} per {:.0} ms", bin_s * 1000.0))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    for (label, at, _) in &t.events {
        top.draw_series(DashedLineSeries::new(
            vec![(*at, lo), (*at, hi)],
            6,
            4,
            BLACK.stroke_width(1),
        ))
        .map_err(|e| err(&e))?;
        top.draw_series(std::iter::once(Text::new(
            label.clone(),
            (*at + end * 0.005, hi / 1.6),
            ("sans-serif", 14),
        )))
        .map_err(|e| err(&e))?;
    }
    top.configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(&e))?;

    let mut bottom = ChartBuilder::on(&lower)
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end, -0.1f64..1.1)
        .map_err(|e| err(&e))?;
    bottom
        .configure_mesh()
        .y_desc("metadata whole")
        .x_desc("time the stream ended (s)")
        .y_labels(3)
        .draw()
        .map_err(|e| err(&e))?;
    let mut frac: Vec<(usize, usize)> = vec![(0, 0); bins];
    for s in &t.streams {
        let b = &mut frac[((s.end_s / bin_s) as usize).min(bins - 1)];
        b.0 += usize::from(s.whole);
        b.1 += 1;
    }
    let frac: Vec<(f64, f64)> = frac
        .iter()
        .enumerate()
        .filter(|(_, (_, n))| *n > 0)
        .map(|(i, (w, n))| ((i as f64 + 0.5) * bin_s, *w as f64 / *n as f64))
        .collect();
    bottom
        .draw_series(LineSeries::new(frac, COLORS[2].stroke_width(2)))
        .map_err(|e| err(&e))?
        .label(format!(
            "fraction whole, streams ending per {:.0} ms",
            bin_s * 1000.0
        ))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], COLORS[2].stroke_width(2)));
    bottom
        .draw_series(
            t.streams
                .iter()
                .filter(|s| s.whole)
                .map(|s| Circle::new((s.end_s, 1.0), 2, COLORS[3].filled())),
        )
        .map_err(|e| err(&e))?
        .label("a stream, whole")
        .legend(|(x, y)| Circle::new((x + 10, y), 3, COLORS[3].filled()));
    bottom
        .draw_series(
            t.streams
                .iter()
                .filter(|s| !s.whole)
                .map(|s| Cross::new((s.end_s, 0.0), 4, COLORS[5].stroke_width(2))),
        )
        .map_err(|e| err(&e))?
        .label("a stream, partial or missing")
        .legend(|(x, y)| Cross::new((x + 10, y), 4, COLORS[5].stroke_width(2)));
    for (_, at, _) in &t.events {
        bottom
            .draw_series(DashedLineSeries::new(
                vec![(*at, -0.1), (*at, 1.1)],
                6,
                4,
                BLACK.stroke_width(1),
            ))
            .map_err(|e| err(&e))?;
    }
    bottom
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::MiddleLeft)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}
