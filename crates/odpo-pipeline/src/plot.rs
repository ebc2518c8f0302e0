//! Reward-vs-KL scatter plots as PNG (plotters' bitmap backend), one colour per series, with each
//! series' frontier (the points no other point of the series beats on both reward and KL) joined.
//!
//! Text needs a font file and plotters is built without system-font lookup (`ab_glyph`, no
//! fontconfig), so the font is read at run time from `$ODPO_PLOT_FONT` or DejaVu Sans at its Debian
//! path (package `fonts-dejavu-core`). Without a font the plot is drawn without any text.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::error::{PipelineError, Result};

/// Where fonts are looked for, after `$ODPO_PLOT_FONT`.
const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
];

/// One set of points in a plot.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Legend name.
    pub name: String,
    /// (KL, reward) points.
    pub points: Vec<(f64, f64)>,
    /// Draw the series' frontier through its points.
    pub frontier: bool,
}

/// The frontier of `points`: sorted by KL, each point kept when its reward beats every point of lower KL.
pub fn frontier(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut sorted: Vec<(f64, f64)> = points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
    let mut out: Vec<(f64, f64)> = Vec::new();
    for p in sorted {
        if out.last().is_none_or(|last| p.1 > last.1) {
            out.push(p);
        }
    }
    out
}

/// Registers a font once; whether one was found.
fn font_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let env = std::env::var("ODPO_PLOT_FONT").ok();
        for path in env.iter().map(String::as_str).chain(FONT_PATHS) {
            if let Ok(bytes) = std::fs::read(path) {
                // plotters keeps fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        tracing::warn!("no font found (set ODPO_PLOT_FONT or install fonts-dejavu-core); plots are drawn without text");
        false
    })
}

/// A white 900×620 canvas with reward-vs-KL axes spanning `points` (plus 8% each side), the title and
/// axis names when `text`.
fn axes<'a, 'b>(root: &'a DrawingArea<BitMapBackend<'b>, Shift>, title: &str, text: bool, points: &[(f64, f64)], y_desc: &str) -> std::result::Result<ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>, String> {
    let e = |e: &dyn std::fmt::Debug| format!("{e:?}");
    let finite: Vec<&(f64, f64)> = points.iter().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    let (mut x0, mut x1, mut y0, mut y1) = finite.iter().fold((0.0f64, f64::MIN, f64::MAX, f64::MIN), |(a, b, c, d), &&(x, y)| (a.min(x), b.max(x), c.min(y), d.max(y)));
    if finite.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let (dx, dy) = ((x1 - x0).max(1e-3) * 0.08, (y1 - y0).max(1e-3) * 0.08);
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut builder = ChartBuilder::on(root);
    builder.margin(20);
    if text {
        builder.caption(title, ("sans-serif", 20)).x_label_area_size(45).y_label_area_size(60);
    }
    let mut chart = builder.build_cartesian_2d((x0 - dx)..(x1 + dx), (y0 - dy)..(y1 + dy)).map_err(|x| e(&x))?;
    if text {
        chart.configure_mesh().x_desc("KL(policy || reference), sequence estimate").y_desc(y_desc).draw().map_err(|x| e(&x))?;
    }
    Ok(chart)
}

/// Draws `series` into a PNG at `path`; returns whether text (title, axes, legend) could be drawn.
pub fn scatter(path: &Path, title: &str, series: &[Series]) -> Result<bool> {
    let err = |e: String| PipelineError::Plot { path: path.to_path_buf(), message: e };
    let text = font_available();
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    let root = BitMapBackend::new(path, (900, 620)).into_drawing_area();
    let mut chart = axes(&root, title, text, &all, "mean reward").map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let drawn = chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 5, color.filled()))).map_err(|e| err(format!("{e:?}")))?;
        if text {
            drawn.label(s.name.clone()).legend(move |(x, y)| Circle::new((x, y), 5, color.filled()));
        }
        if s.frontier && s.points.len() > 1 {
            chart.draw_series(LineSeries::new(frontier(&s.points), color.stroke_width(2))).map_err(|e| err(format!("{e:?}")))?;
        }
    }
    if text {
        chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).position(SeriesLabelPosition::LowerRight).draw().map_err(|e| err(format!("{e:?}")))?;
    }
    root.present().map_err(|e| err(format!("{e:?}")))?;
    Ok(text)
}

/// One method's frontier over seeds: its runs as dots, the mean envelope as a line, a shaded band.
#[derive(Clone, Debug, PartialEq)]
pub struct Band {
    /// Legend name.
    pub name: String,
    /// Every run's (KL, reward).
    pub points: Vec<(f64, f64)>,
    /// `(KL, mean, low, high)` along the envelope.
    pub curve: Vec<(f64, f64, f64, f64)>,
}

/// Draws `bands` and the SFT model's point `(0, sft)` into a PNG at `path`; returns whether text could
/// be drawn.
pub fn bands(path: &Path, title: &str, sft: f64, bands: &[Band]) -> Result<bool> {
    let err = |e: String| PipelineError::Plot { path: path.to_path_buf(), message: e };
    let text = font_available();
    let mut all: Vec<(f64, f64)> = vec![(0.0, sft)];
    for b in bands {
        all.extend(b.points.iter().copied());
        all.extend(b.curve.iter().flat_map(|c| [(c.0, c.2), (c.0, c.3)]));
    }
    all.retain(|(x, y)| x.is_finite() && y.is_finite());
    let root = BitMapBackend::new(path, (900, 620)).into_drawing_area();
    let mut chart = axes(&root, title, text, &all, "mean true reward").map_err(err)?;
    for (i, b) in bands.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mut outline: Vec<(f64, f64)> = b.curve.iter().map(|c| (c.0, c.3)).collect();
        outline.extend(b.curve.iter().rev().map(|c| (c.0, c.2)));
        if outline.len() > 2 {
            chart.draw_series(std::iter::once(Polygon::new(outline, color.mix(0.18).filled()))).map_err(|e| err(format!("{e:?}")))?;
        }
        chart.draw_series(b.points.iter().map(|&p| Circle::new(p, 2, color.mix(0.5).filled()))).map_err(|e| err(format!("{e:?}")))?;
        let line = chart.draw_series(LineSeries::new(b.curve.iter().map(|c| (c.0, c.1)), color.stroke_width(3))).map_err(|e| err(format!("{e:?}")))?;
        if text {
            line.label(b.name.clone()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
        }
    }
    chart.draw_series(std::iter::once(Circle::new((0.0, sft), 6, BLACK.filled()))).map_err(|e| err(format!("{e:?}")))?;
    if text {
        chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).position(SeriesLabelPosition::LowerRight).draw().map_err(|e| err(format!("{e:?}")))?;
    }
    root.present().map_err(|e| err(format!("{e:?}")))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontier_keeps_undominated_points() {
        let pts = [(1.0, 1.0), (0.5, 2.0), (2.0, 1.5), (3.0, 3.0), (0.1, 0.5)];
        assert_eq!(frontier(&pts), vec![(0.1, 0.5), (0.5, 2.0), (3.0, 3.0)]);
    }
}
