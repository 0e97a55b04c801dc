//! Latency-by-percentile charts (SVG), one line per report.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// Draws `series` (label, `[percentile, latency_us]` points) into an SVG file. The x axis is in
/// "nines" (50%, 90%, 99%, 99.9%, ...), the y axis logarithmic microseconds.
pub fn latency_by_percentile(path: &Path, title: &str, series: &[(String, Vec<[f64; 2]>)]) -> Result<()> {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let nines = |p: f64| -(1.0 - p / 100.0).max(1e-7).log10();
    let max_x = series.iter().flat_map(|(_, pts)| pts.iter().map(|p| nines(p[0]))).fold(1.0f64, f64::max).ceil();
    let max_y = series.iter().flat_map(|(_, pts)| pts.iter().map(|p| p[1])).fold(10.0f64, f64::max) * 1.5;
    let min_y = series.iter().flat_map(|(_, pts)| pts.iter().map(|p| p[1])).fold(max_y, f64::min).max(1.0) / 1.5;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..max_x, (min_y..max_y).log_scale())
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .x_labels(max_x as usize + 1)
        .x_label_formatter(&|x| {
            let p = 100.0 * (1.0 - 10f64.powf(-x));
            if *x < 0.01 {
                "0%".into()
            } else {
                format!("{p:.*}%", (x.round() as usize).saturating_sub(2))
            }
        })
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, (label, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let line: Vec<(f64, f64)> = pts.iter().map(|p| (nines(p[0]), p[1].max(1.0))).collect();
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_writes_an_svg_with_every_series() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.svg");
        let a = vec![[50.0, 100.0], [99.0, 300.0], [99.9, 900.0]];
        let b = vec![[50.0, 80.0], [99.0, 200.0], [99.99, 2000.0]];
        latency_by_percentile(&path, "test", &[("run a".into(), a), ("run b".into(), b)]).expect("plot");
        let svg = std::fs::read_to_string(&path).expect("svg");
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("run a") && svg.contains("run b"));
    }
}
