//! Latency-by-percentile charts (SVG), one line per report.
//!
//! The y axis is drawn from ticks computed here rather than from plotters' logarithmic key
//! points, which can yield the same tick twice (at a decade boundary) and put labels on
//! decades only, so a chart whose curves start at 120 µs had no label below 1 ms. The bounds
//! are snapped outward to labelled ticks, so the lowest and the highest value drawn always lie
//! between two labels, and labels carry their unit (`250 µs`, `2 ms`). The x axis keeps
//! plotters' linear points at whole nines; the right margin leaves room for half the last
//! label, which is centred on the plot's right edge. The legend sits below the chart, one line
//! per series, so long run descriptions neither hide curves nor get cut off.
//!
//! This module does not read reports from disk or decide file names; the binary does.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::Report;

/// Draws `series` (label, `[percentile, latency_us]` points) into an SVG file. The x axis is in
/// "nines" (50%, 90%, 99%, 99.9%, ...), the y axis logarithmic latency labelled in µs, ms or
/// s; the legend (the labels) is drawn below the chart.
pub fn latency_by_percentile(path: &Path, title: &str, series: &[(String, Vec<[f64; 2]>)]) -> Result<()> {
    let legend_height = LEGEND_PAD_PX * 2 + LEGEND_ROW_PX * series.len() as u32;
    let root = SVGBackend::new(path, (WIDTH_PX, CHART_HEIGHT_PX + legend_height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (chart_area, legend_area) = root.split_vertically(CHART_HEIGHT_PX);
    let x_axis = percentile_axis(series.iter().flat_map(|(_, pts)| pts.iter().map(|p| nines(p[0]))));
    let y_axis = LatencyAxis::new(series.iter().flat_map(|(_, pts)| pts.iter().map(|p| p[1].max(1.0))));
    let mut chart = ChartBuilder::on(&chart_area)
        .caption(title, ("sans-serif", 22))
        .margin(MARGIN_PX)
        .margin_right(x_axis.margin_right_px)
        .x_label_area_size(44)
        .y_label_area_size(Y_LABEL_AREA_PX)
        .build_cartesian_2d(
            0f64..x_axis.max,
            (y_axis.min..y_axis.max).log_scale().with_key_points(y_axis.ticks).with_light_points(y_axis.minor),
        )
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency")
        .label_style(("sans-serif", LABEL_FONT_PX))
        .x_labels(x_axis.ticks.len())
        .axis_desc_style(("sans-serif", 14))
        .x_label_formatter(&|x| percentile_label(*x))
        .y_label_formatter(&|y| latency_label(*y))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, (_, pts)) in series.iter().enumerate() {
        let line: Vec<(f64, f64)> = pts.iter().map(|p| (nines(p[0]), p[1].max(1.0))).collect();
        chart
            .draw_series(LineSeries::new(line, Palette99::pick(i).to_rgba().stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?;
    }
    draw_legend(&legend_area, series.iter().map(|(label, _)| label.as_str()))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Legend labels for runs read from reports: each report's own description, or `fallback`
/// (say, the file stem) when the report carries no settings. Runs with the same description
/// (repeated runs of one configuration) get their fallback appended so they stay apart.
pub fn legend_labels(runs: &[(String, &Report)]) -> Vec<String> {
    let described: Vec<Option<String>> = runs.iter().map(|(_, r)| r.description()).collect();
    runs.iter()
        .zip(&described)
        .map(|((fallback, _), description)| match description {
            None => fallback.clone(),
            Some(d) if described.iter().filter(|o| o.as_ref() == Some(d)).count() > 1 => format!("{d} ({fallback})"),
            Some(d) => d.clone(),
        })
        .collect()
}

/// A latency tick label: µs below 1 ms, ms below 1 s, else s, without trailing zeros
/// (`250 µs`, `2.5 ms`, `1 s`).
pub fn latency_label(us: f64) -> String {
    let (value, unit) = if us >= 1e6 {
        (us / 1e6, "s")
    } else if us >= 1e3 {
        (us / 1e3, "ms")
    } else {
        (us, "µs")
    };
    let digits = format!("{value:.2}");
    let number = digits.trim_end_matches('0').trim_end_matches('.');
    format!("{number} {unit}")
}

/// An x tick label: the percentile `nines` nines stand for (0 → 0%, 1 → 90%, 3 → 99.9%).
fn percentile_label(nines: f64) -> String {
    if nines < 0.01 {
        return "0%".into();
    }
    let p = 100.0 * (1.0 - 10f64.powf(-nines));
    format!("{p:.*}%", (nines.round() as usize).saturating_sub(2))
}

/// How many nines a percentile has: 90 → 1, 99.9 → 3 (capped at 7).
fn nines(percentile: f64) -> f64 {
    -(1.0 - percentile / 100.0).max(1e-7).log10()
}

/// The x axis: whole nines from 0 up to the data's largest, at least 1.
struct PercentileAxis {
    max: f64,
    /// Labelled: every whole nine (plotters' linear axis finds them from their count).
    ticks: Vec<f64>,
    /// Room right of the plot for half the last label, which is centred on the right edge.
    margin_right_px: u32,
}

fn percentile_axis(points_nines: impl Iterator<Item = f64>) -> PercentileAxis {
    // Less a rounding error: 99.999% comes out a hair above 5 nines, which must not add a sixth.
    let max = (points_nines.fold(1.0f64, f64::max) - 1e-6).ceil();
    let whole = max as u32;
    let ticks: Vec<f64> = (0..=whole).map(f64::from).collect();
    let widest = ticks.iter().map(|t| label_width_px(&percentile_label(*t))).fold(0, u32::max);
    PercentileAxis { max, ticks, margin_right_px: MARGIN_PX.max(widest / 2 + MARGIN_PX / 2) }
}

/// The y axis: bounds snapped outward to labelled ticks, so every value drawn lies between two
/// labels. The ticks are the densest of 1..9, 1-2-3-5, 1-2-5 and 1 (decades) times the powers
/// of ten whose labels stay `Y_TICK_GAP_PX_MIN` apart.
#[derive(Debug, PartialEq)]
struct LatencyAxis {
    min: f64,
    max: f64,
    ticks: Vec<f64>,
    minor: Vec<f64>,
}

impl LatencyAxis {
    fn new(values_us: impl Iterator<Item = f64>) -> LatencyAxis {
        let (lowest, highest) = values_us.fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let (lowest, highest) = if highest > 0.0 { (lowest.max(1.0), highest) } else { (100.0, 1000.0) };
        let candidates: [&[f64]; 4] = [&EVERY_STEP, &[1.0, 2.0, 3.0, 5.0], &[1.0, 2.0, 5.0], &[1.0]];
        let (min, max, ticks) = candidates
            .iter()
            .map(|steps| snapped_ticks(steps, lowest, highest))
            .find(|(min, max, ticks)| {
                let decades = (max / min).log10();
                let gap = ticks.windows(2).map(|w| (w[1] / w[0]).log10()).fold(f64::MAX, f64::min);
                gap / decades * Y_AXIS_PX >= Y_TICK_GAP_PX_MIN
            })
            .unwrap_or_else(|| snapped_ticks(&[1.0], lowest, highest));
        let minor =
            nice_values(&EVERY_STEP).into_iter().filter(|v| (min..=max).contains(v) && !ticks.contains(v)).collect();
        LatencyAxis { min, max, ticks, minor }
    }
}

/// The axis bounds and ticks for `steps` times the powers of ten: the largest tick below
/// `lowest` and the smallest above `highest`, each with a little headroom so a curve does not
/// run along the frame (at least 1 µs, at most `NICE_US_MAX`).
fn snapped_ticks(steps: &[f64], lowest: f64, highest: f64) -> (f64, f64, Vec<f64>) {
    let nice = nice_values(steps);
    let min = nice.iter().copied().filter(|v| *v <= lowest / 1.2).fold(1.0, f64::max);
    let max = nice.iter().copied().find(|v| *v >= highest * 1.2).unwrap_or(NICE_US_MAX);
    let ticks = nice.into_iter().filter(|v| (min..=max).contains(v)).collect();
    (min, max, ticks)
}

/// `steps` times every power of ten from 1 µs to `NICE_US_MAX`, ascending.
fn nice_values(steps: &[f64]) -> Vec<f64> {
    (0..=10).flat_map(|e| steps.iter().map(move |s| s * 10f64.powi(e))).filter(|v| *v <= NICE_US_MAX).collect()
}

/// Draws one line per series: its colour, then its label.
fn draw_legend<'a>(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    labels: impl Iterator<Item = &'a str>,
) -> Result<()> {
    // Aligned with the plot's left edge.
    let left = (MARGIN_PX + Y_LABEL_AREA_PX) as i32;
    for (i, label) in labels.enumerate() {
        let top = (LEGEND_PAD_PX + LEGEND_ROW_PX * i as u32) as i32;
        let color = Palette99::pick(i).to_rgba();
        let middle = top + LEGEND_ROW_PX as i32 / 2;
        area.draw(&PathElement::new(vec![(left, middle), (left + 24, middle)], color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?;
        let style = TextStyle::from(("sans-serif", LEGEND_FONT_PX).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        area.draw(&Text::new(label.to_owned(), (left + 32, middle), style)).map_err(|e| anyhow!("{e}"))?;
    }
    Ok(())
}

/// A generous estimate of a label's width (SVG leaves the measuring to the viewer).
fn label_width_px(label: &str) -> u32 {
    (label.chars().count() as f64 * f64::from(LABEL_FONT_PX) * 0.7).ceil() as u32
}

const WIDTH_PX: u32 = 900;
const CHART_HEIGHT_PX: u32 = 560;
const MARGIN_PX: u32 = 16;
const LABEL_FONT_PX: u32 = 13;
const LEGEND_FONT_PX: u32 = 14;
const Y_LABEL_AREA_PX: u32 = 72;
/// The minor grid (and the densest ticks): every step within a decade.
const EVERY_STEP: [f64; 9] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
const LEGEND_ROW_PX: u32 = 22;
const LEGEND_PAD_PX: u32 = 6;
/// The plot's height without caption and x labels, roughly (for spacing the y labels).
const Y_AXIS_PX: f64 = 440.0;
/// Closer than this and y labels (13 px high) crowd each other.
const Y_TICK_GAP_PX_MIN: f64 = 24.0;
/// The histograms' top (100 s).
const NICE_US_MAX: f64 = 1e8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_writes_an_svg_with_every_series() {
        let a = vec![[50.0, 100.0], [99.0, 300.0], [99.9, 900.0]];
        let b = vec![[50.0, 80.0], [99.0, 200.0], [99.99, 2000.0]];
        let svg = render(&[("run a".into(), a), ("run b".into(), b)]);
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("run a") && svg.contains("run b"));
    }

    #[test]
    fn latency_labels_name_the_unit_without_trailing_zeros() {
        let check = |us: f64, expect: &str| assert_eq!(latency_label(us), expect, "{us} µs");
        check(1.0, "1 µs");
        check(1.5, "1.5 µs");
        check(100.0, "100 µs");
        check(250.0, "250 µs");
        check(500.0, "500 µs");
        check(1000.0, "1 ms");
        check(2500.0, "2.5 ms");
        check(20_000.0, "20 ms");
        check(1e6, "1 s");
        check(5e7, "50 s");
    }

    #[test]
    fn latency_axis_ticks_enclose_every_value() {
        let check = |lowest: f64, highest: f64, ticks: &[f64]| {
            let axis = LatencyAxis::new([lowest, highest].into_iter());
            assert_eq!(axis.ticks, ticks, "{lowest}..{highest}");
            assert!(axis.ticks[0] <= lowest && *axis.ticks.last().expect("ticks") >= highest, "{axis:?}");
            assert_eq!((axis.min, axis.max), (axis.ticks[0], *axis.ticks.last().expect("ticks")));
            assert!(axis.ticks.windows(2).all(|w| w[0] < w[1]), "ascending, no tick twice: {axis:?}");
            assert!(axis.minor.iter().all(|m| !axis.ticks.contains(m)), "{axis:?}");
        };
        check(120.0, 900.0, &[100.0, 200.0, 300.0, 500.0, 1000.0, 2000.0]);
        check(120.0, 4000.0, &[100.0, 200.0, 300.0, 500.0, 1000.0, 2000.0, 3000.0, 5000.0]);
        // Less than a decade: every 100 µs is labelled.
        check(300.0, 700.0, &[200.0, 300.0, 400.0, 500.0, 600.0, 700.0, 800.0, 900.0]);
        check(500.0, 500.0, &[400.0, 500.0, 600.0]);
        check(1.0, 3.0, &[1.0, 2.0, 3.0, 4.0]);
        // Four decades: 1-2-5.
        check(450.0, 1.2e6, &[200.0, 500.0, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6, 2e6]);
        // Eight: decades only.
        check(1.0, 5e7, &[1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8]);
    }

    #[test]
    fn svg_draws_each_tick_label_once_and_ticks_below_a_millisecond() {
        // Curves from 120 µs to 4 ms: plotters' own log axis labelled "1000.0" twice and put
        // nothing below it but "100.0".
        let a = (0..=20).map(|i| [percentile(i), 120.0 * 2.0f64.powf(f64::from(i) / 5.0)]).collect();
        let b = (0..=20).map(|i| [percentile(i), 250.0 * 16.0f64.powf(f64::from(i) / 20.0)]).collect();
        let texts = texts(&render(&[("a".into(), a), ("b".into(), b)]));
        for label in ["100 µs", "200 µs", "300 µs", "500 µs", "1 ms", "2 ms", "3 ms", "5 ms"] {
            assert_eq!(texts.iter().filter(|t| t.text == label).count(), 1, "{label} once in {texts:?}");
        }
        assert!(!texts.iter().any(|t| t.text.contains(".0 ")), "no trailing zeros: {texts:?}");
    }

    #[test]
    fn svg_x_labels_fit_inside_the_image() {
        for top in [99.999, 99.9999, 99.99999] {
            let svg = render(&[("a".into(), vec![[50.0, 100.0], [top, 900.0]])]);
            let texts = texts(&svg);
            let last =
                texts.iter().filter(|t| t.text.ends_with('%')).max_by(|a, b| a.x.total_cmp(&b.x)).expect("x labels");
            assert_eq!(last.anchor, "middle", "{last:?}");
            let half_width = f64::from(label_width_px(&last.text)) / 2.0;
            assert!(last.x + half_width <= f64::from(WIDTH_PX), "{last:?} is cut at the right edge");
        }
    }

    #[test]
    fn percentile_axis_ends_at_the_nine_of_the_last_point() {
        let check = |last: f64, max: f64| {
            let axis = percentile_axis([nines(50.0), nines(last)].into_iter());
            assert_eq!(axis.max, max, "{last}%");
        };
        check(percentile(20), 5.0);
        check(99.0, 2.0);
        check(99.5, 3.0);
        check(50.0, 1.0);
    }

    #[test]
    fn legend_labels_describe_the_runs() {
        let report = |acks: &str, commit: &str| {
            let mut r = sample_report();
            r.config["acks"] = acks.into();
            r.commit = commit.into();
            r
        };
        let (all, leader, again) = (report("all", "abc1234"), report("leader", "abc1234"), report("all", "abc1234"));
        let mut bare = sample_report();
        bare.config = serde_json::json!({});
        let labels = legend_labels(&[
            ("f1".into(), &all),
            ("f2".into(), &leader),
            ("f3".into(), &again),
            ("other-tool".into(), &bare),
        ]);
        assert!(labels[0].starts_with("produce: ") && labels[0].contains("acks=all"), "{labels:?}");
        assert!(labels[0].contains("commit abc1234") && labels[0].ends_with("(f1)"), "{labels:?}");
        assert!(labels[1].contains("acks=leader") && !labels[1].contains("(f2)"), "{labels:?}");
        assert!(labels[2].ends_with("(f3)"), "same settings, told apart by the file: {labels:?}");
        assert_eq!(labels[3], "other-tool", "nothing better than the file stem");

        let svg = render(&[(labels[1].clone(), vec![[50.0, 100.0], [99.0, 900.0]])]);
        assert!(texts(&svg).iter().any(|t| t.text == labels[1]), "the legend shows the description");
    }

    fn render(series: &[(String, Vec<[f64; 2]>)]) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.svg");
        latency_by_percentile(&path, "test", series).expect("plot");
        std::fs::read_to_string(&path).expect("svg")
    }

    /// The percentile of point `i` of [`crate::report::percentile_points`].
    fn percentile(i: u32) -> f64 {
        100.0 * (1.0 - 10f64.powf(-(0.301 + f64::from(i) * (5.0 - 0.301) / 20.0)))
    }

    #[derive(Debug)]
    struct SvgText {
        x: f64,
        anchor: String,
        text: String,
    }

    /// Every `<text>` element of an SVG written by plotters: its x, anchor and content.
    fn texts(svg: &str) -> Vec<SvgText> {
        let attr = |tag: &str, name: &str| {
            let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
            Some(tag[start..].split('"').next()?.to_owned())
        };
        svg.split("<text")
            .skip(1)
            .map(|rest| {
                let (tag, after) = rest.split_once('>').expect("a text tag ends");
                let content = after.split("</text>").next().expect("closed").trim();
                SvgText {
                    x: attr(tag, "x").and_then(|x| x.parse().ok()).unwrap_or(f64::NAN),
                    anchor: attr(tag, "text-anchor").unwrap_or_default(),
                    text: content.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"),
                }
            })
            .collect()
    }

    fn sample_report() -> Report {
        Report {
            commit_latency_us: None,
            mode: "produce".into(),
            messages: 1,
            bytes: 1024,
            seconds: 1.0,
            messages_per_sec: 1.0,
            bytes_per_sec: 1024.0,
            latency_us: crate::report::Latency::default(),
            publish_latency_us: None,
            config: serde_json::json!({
                "mode": "produce", "partitions": 8, "replicas": 3, "producers": 8, "consumers": 1,
                "message_size": 1024, "key_distribution": "None", "acks": "all", "rate": null,
                "prefer_replica": "leader", "rack": null,
            }),
            commit: "abc1234".into(),
            machine: crate::report::Machine { cores: 2, kernel: "test".into() },
            percentiles: Vec::new(),
            broker_cpu_seconds: None,
            loadgen_cpu_seconds: None,
            steal_seconds: None,
            errors: 0,
            reads: None,
        }
    }
}
