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
