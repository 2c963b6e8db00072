//! `rlhf plot METRICS.jsonl --out FILE.png|.svg`: draws the curves a training run wrote.
//!
//! The input is JSON Lines, one object per line, each with a numeric `"step"` and any number of
//! other numeric fields (`loss`, `heldout_loss`, `lr`, `tokens_per_s`, reward, KL, ...). Every
//! numeric field becomes one panel with that metric against step; fields that are not numbers
//! (a phase name, say) and `null`s are skipped, so a line only needs the metrics it measured.
//! Blank lines are allowed; anything else that is not such an object is an error naming the file
//! and the 1-based line.
//!
//! Output format follows the extension: `.png` through plotters' bitmap backend, `.svg` through
//! its SVG backend. Text is laid out and (for PNG) rasterised with plotters' `ab_glyph` backend
//! from DejaVu Sans bytes compiled into the binary (the `dejavu` crate), so plotting needs no
//! system fonts and no fontconfig; the SVG names the family `sans-serif`, which any viewer has.

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use plotters::coord::Shift;
use plotters::prelude::*;

#[derive(Args)]
pub struct PlotArgs {
    /// Metrics file written by a run (JSON Lines, one object per line with "step").
    pub metrics: PathBuf,
    /// Image to write; the extension picks the format: .png or .svg.
    #[arg(long)]
    pub out: PathBuf,
    /// Only these metrics, in this order (comma-separated), instead of every numeric field.
    #[arg(long, value_delimiter = ',')]
    pub only: Option<Vec<String>>,
}

/// Metrics drawn first, in this order, when present; the rest follow in order of first appearance.
const PREFERRED_ORDER: [&str; 4] = ["loss", "heldout_loss", "lr", "tokens_per_s"];

/// Size of one panel in pixels (PNG) or user units (SVG).
const PANEL_W: u32 = 640;
const PANEL_H: u32 = 360;

/// One metric: its name and its (step, value) points, sorted by step.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageFormat {
    Png,
    Svg,
}

impl ImageFormat {
    fn from_path(path: &Path) -> anyhow::Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        match ext.as_deref() {
            Some("png") => Ok(Self::Png),
            Some("svg") => Ok(Self::Svg),
            Some(other) => bail!(
                "--out {}: unknown image format '.{other}'; use a .png or .svg file name",
                path.display()
            ),
            None => bail!(
                "--out {}: no file extension; use a .png or .svg file name",
                path.display()
            ),
        }
    }
}

pub fn run(args: PlotArgs) -> anyhow::Result<()> {
    // Check the output name before reading anything, so a typo costs nothing.
    let format = ImageFormat::from_path(&args.out)?;
    let text = std::fs::read_to_string(&args.metrics)
        .with_context(|| format!("reading metrics file {}", args.metrics.display()))?;
    let mut series = parse_metrics(&text, &args.metrics)?;
    if let Some(only) = &args.only {
        series = select(series, only, &args.metrics)?;
    }
    if series.is_empty() {
        bail!(
            "{}: no numeric metrics besides \"step\" to plot",
            args.metrics.display()
        );
    }
    draw(&series, &args.out, format)?;
    let points: usize = series.iter().map(|s| s.points.len()).sum();
    println!(
        "wrote {} ({} panels, {} points)",
        args.out.display(),
        series.len(),
        points
    );
    Ok(())
}

/// Parses a JSON Lines metrics file into one series per numeric field, in panel order.
/// `path` is only used in error messages.
pub fn parse_metrics(text: &str, path: &Path) -> anyhow::Result<Vec<Series>> {
    // Insertion-ordered map from metric name to its points; a Vec is fine for the handful of
    // metrics a run writes.
    let mut series: Vec<Series> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let where_ = || format!("{}:{line_no}", path.display());
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow!("{}: not valid JSON: {e}", where_()))?;
        let object = value.as_object().ok_or_else(|| {
            anyhow!(
                "{}: expected a JSON object with \"step\", found {}",
                where_(),
                json_kind(&value)
            )
        })?;
        let step = match object.get("step") {
            None => bail!("{}: missing \"step\"", where_()),
            Some(v) => v.as_f64().ok_or_else(|| {
                anyhow!(
                    "{}: \"step\" must be a number, found {}",
                    where_(),
                    json_kind(v)
                )
            })?,
        };
        for (key, v) in object {
            if key == "step" {
                continue;
            }
            // Non-numeric fields (labels, nulls for "not measured this step") are not curves.
            let Some(y) = v.as_f64() else { continue };
            match series.iter_mut().find(|s| s.name == *key) {
                Some(s) => s.points.push((step, y)),
                None => series.push(Series {
                    name: key.clone(),
                    points: vec![(step, y)],
                }),
            }
        }
    }
    for s in &mut series {
        // A resumed run may append steps it had already logged; sorting (stably, so the later
        // of two equal steps stays last) keeps each curve a function of step.
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    series.sort_by_key(|s| {
        PREFERRED_ORDER
            .iter()
            .position(|p| *p == s.name)
            .unwrap_or(PREFERRED_ORDER.len())
    });
    Ok(series)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn select(series: Vec<Series>, only: &[String], path: &Path) -> anyhow::Result<Vec<Series>> {
    let mut chosen = Vec::with_capacity(only.len());
    for name in only {
        let s = series.iter().find(|s| s.name == *name).ok_or_else(|| {
            let have: Vec<&str> = series.iter().map(|s| s.name.as_str()).collect();
            anyhow!(
                "--only {name}: {} has no numeric metric of that name (it has: {})",
                path.display(),
                have.join(", ")
            )
        })?;
        chosen.push(s.clone());
    }
    Ok(chosen)
}

/// Registers the embedded DejaVu Sans as plotters' "sans-serif" family, once per process.
fn register_fonts() -> anyhow::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        )
        .map_err(|_| anyhow!("embedded DejaVu Sans font failed to parse"));
    });
    result
}

fn draw(series: &[Series], out: &Path, format: ImageFormat) -> anyhow::Result<()> {
    register_fonts()?;
    // Two columns once there is more than one metric: wide enough to read, and a typical run's
    // four curves fit on one screen.
    let cols = if series.len() > 1 { 2 } else { 1 };
    let rows = series.len().div_ceil(cols);
    let size = (PANEL_W * cols as u32, PANEL_H * rows as u32);
    match format {
        ImageFormat::Png => {
            let root = BitMapBackend::new(out, size).into_drawing_area();
            draw_panels(&root, series, rows, cols)?;
            root.present()
                .map_err(|e| anyhow!("writing {}: {e}", out.display()))?;
        }
        ImageFormat::Svg => {
            let root = SVGBackend::new(out, size).into_drawing_area();
            draw_panels(&root, series, rows, cols)?;
            root.present()
                .map_err(|e| anyhow!("writing {}: {e}", out.display()))?;
        }
    }
    Ok(())
}

fn draw_panels<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    series: &[Series],
    rows: usize,
    cols: usize,
) -> anyhow::Result<()> {
    root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
    let panels = root.split_evenly((rows, cols));
    for (s, panel) in series.iter().zip(panels.iter()) {
        draw_series(panel, s).map_err(|e| anyhow!("plot: drawing '{}': {e}", s.name))?;
    }
    Ok(())
}

fn draw_series<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    s: &Series,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (x_range, y_range) = ranges(&s.points);
    let integral_steps = s.points.iter().all(|p| p.0.fract() == 0.0);
    let mut chart = ChartBuilder::on(area)
        .caption(&s.name, ("sans-serif", 24))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range, y_range)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .x_labels(6)
        .y_labels(6)
        .x_label_formatter(&|x| {
            if integral_steps {
                format!("{x:.0}")
            } else {
                format_tick(*x)
            }
        })
        .y_label_formatter(&|y| format_tick(*y))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let colour = BLUE;
    chart.draw_series(LineSeries::new(
        s.points.iter().copied(),
        colour.stroke_width(2),
    ))?;
    // With few points a line hides where the measurements are (and one point draws nothing).
    if s.points.len() <= 32 {
        chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
    }
    Ok(())
}

/// Axis ranges covering all points with a little headroom; a flat or single-point series gets a
/// range around its value so plotters has a non-empty interval to map.
fn ranges(points: &[(f64, f64)]) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let span = |values: &mut dyn Iterator<Item = f64>, pad_frac: f64| {
        let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        if hi > lo {
            let pad = (hi - lo) * pad_frac;
            (lo - pad)..(hi + pad)
        } else {
            let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
            (lo - pad)..(hi + pad)
        }
    };
    let x = span(&mut points.iter().map(|p| p.0), 0.0);
    let y = span(&mut points.iter().map(|p| p.1), 0.05);
    (x, y)
}

/// Tick labels readable across the magnitudes metrics take: learning rates around 1e-4,
/// losses around 1, tokens/s in the thousands.
fn format_tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".to_string()
    } else if !(1e-3..1e6).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        // Enough significant digits to tell neighbouring ticks apart, without trailing zeros.
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<Vec<Series>> {
        parse_metrics(text, Path::new("m.jsonl"))
    }

    #[test]
    fn series_in_preferred_then_first_seen_order_sorted_by_step() {
        let text = r#"{"step": 2, "kl": 0.5, "loss": 2.0, "phase": "train"}
{"step": 1, "loss": 3.0, "lr": 0.001, "heldout_loss": null}

{"step": 3, "heldout_loss": 2.5, "kl": 0.25}
"#;
        let s = parse(text).unwrap();
        let names: Vec<&str> = s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["loss", "heldout_loss", "lr", "kl"]);
        assert_eq!(s[0].points, [(1.0, 3.0), (2.0, 2.0)]);
        assert_eq!(s[1].points, [(3.0, 2.5)]);
        assert_eq!(s[3].points, [(2.0, 0.5), (3.0, 0.25)]);
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let cases = [
            (
                "{\"step\":1,\"loss\":1}\n{\"step\":2,",
                "m.jsonl:2: not valid JSON",
            ),
            ("\n\n[1, 2]\n", "m.jsonl:3: expected a JSON object"),
            ("{\"loss\": 1.0}\n", "m.jsonl:1: missing \"step\""),
            (
                "{\"step\":1}\n{\"step\":\"two\"}\n",
                "m.jsonl:2: \"step\" must be a number, found a string",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err:?} should start with {want:?}");
        }
    }

    #[test]
    fn select_keeps_order_and_rejects_unknown_names() {
        let s = parse("{\"step\":1,\"loss\":1,\"lr\":0.1,\"kl\":0.2}\n").unwrap();
        let chosen = select(s.clone(), &["kl".into(), "loss".into()], Path::new("m")).unwrap();
        let names: Vec<&str> = chosen.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["kl", "loss"]);
        let err = select(s, &["reward".into()], Path::new("m"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("reward") && err.contains("loss, lr, kl"),
            "{err}"
        );
    }

    #[test]
    fn out_extension_picks_format() {
        assert_eq!(
            ImageFormat::from_path(Path::new("a/b.PNG")).unwrap(),
            ImageFormat::Png
        );
        assert_eq!(
            ImageFormat::from_path(Path::new("b.svg")).unwrap(),
            ImageFormat::Svg
        );
        let err = ImageFormat::from_path(Path::new("b.jpg"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("'.jpg'"), "{err}");
        assert!(ImageFormat::from_path(Path::new("plot")).is_err());
    }

    #[test]
    fn ranges_are_never_empty() {
        let (x, y) = ranges(&[(5.0, 0.0)]);
        assert!(x.start < x.end && y.start < y.end);
        let (x, y) = ranges(&[(1.0, 2.0), (3.0, 2.0)]);
        assert_eq!(x, 1.0..3.0);
        assert!(y.start < 2.0 && y.end > 2.0);
    }

    #[test]
    fn tick_labels() {
        assert_eq!(format_tick(0.0), "0");
        assert_eq!(format_tick(3e-4), "3.00e-4");
        assert_eq!(format_tick(2.5), "2.5");
        assert_eq!(format_tick(6912.4), "6912");
        assert_eq!(format_tick(-0.125), "-0.125");
    }
}
