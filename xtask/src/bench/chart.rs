//! The TTFT chart (docs/img/ttft.svg), drawn with plotters' SVG backend.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::Target;
use crate::util;

/// One line of the chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Whose figures (sets the colour).
    pub target: Target,
    /// 0 cold, 1 warm RAM, 2 warm disk (sets the marker and dash).
    pub style: usize,
    /// (prompt tokens, TTFT ms).
    pub points: Vec<(f64, f64)>,
}

/// docs/img/ttft.svg.
pub fn ttft_path() -> PathBuf {
    util::workspace_root()
        .join("docs")
        .join("img")
        .join("ttft.svg")
}

fn colour(target: Target) -> RGBColor {
    match target {
        Target::Ours => RGBColor(0x1f, 0x77, 0xb4),
        Target::LlamaCpp => RGBColor(0xd6, 0x27, 0x28),
        Target::MlxLm => RGBColor(0x2c, 0xa0, 0x2c),
    }
}

/// Draw TTFT (ms, log scale) against prompt length (tokens, log scale).
pub fn ttft(path: &Path, series: &[Series]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in &all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if all.is_empty() || y0 <= 0.0 {
        return Err(anyhow!("no positive TTFT figures to draw"));
    }
    let tmp = util::temp_sibling(path);
    {
        let root = SVGBackend::new(&tmp, (900, 560)).into_drawing_area();
        let e = |err: DrawingAreaErrorKind<_>| anyhow!("drawing the chart: {err:?}");
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Time to first token vs prompt length (SmolLM2-135M, 2-core CPU)",
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(
                (x0 * 0.85..x1 * 1.15).log_scale(),
                (y0 * 0.6..y1 * 1.6).log_scale(),
            )
            .map_err(|err| anyhow!("drawing the chart: {err:?}"))?;
        chart
            .configure_mesh()
            .x_desc("prompt tokens")
            .y_desc("TTFT, ms (log scale)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(|err| anyhow!("drawing the chart: {err:?}"))?;
        for s in series.iter().filter(|s| !s.points.is_empty()) {
            let c = colour(s.target);
            let style = ShapeStyle {
                color: c.to_rgba(),
                filled: true,
                stroke_width: if s.style == 0 { 3 } else { 2 },
            };
            let points = s.points.clone();
            let anno = match s.style {
                0 => chart.draw_series(LineSeries::new(points.clone(), style)),
                1 => chart.draw_series(DashedLineSeries::new(points.clone(), 8, 4, style)),
                _ => chart.draw_series(DashedLineSeries::new(points.clone(), 2, 4, style)),
            }
            .map_err(|err| anyhow!("drawing the chart: {err:?}"))?;
            anno.label(s.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            match s.style {
                0 => chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, style))),
                1 => chart.draw_series(points.iter().map(|&p| TriangleMarker::new(p, 5, style))),
                _ => chart.draw_series(points.iter().map(|&p| Cross::new(p, 4, style))),
            }
            .map_err(|err| anyhow!("drawing the chart: {err:?}"))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|err| anyhow!("drawing the chart: {err:?}"))?;
        root.present()
            .map_err(|err| anyhow!("writing the chart: {err:?}"))?;
    }
    std::fs::rename(&tmp, path).map_err(|err| anyhow!("cannot write {}: {err}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_an_svg_with_every_series() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-chart-{}", std::process::id()));
        let path = dir.join("ttft.svg");
        let series = vec![
            Series {
                name: "semantic cold".into(),
                target: Target::Ours,
                style: 0,
                points: vec![(512.0, 2000.0), (1024.0, 5000.0)],
            },
            Series {
                name: "semantic warm RAM".into(),
                target: Target::Ours,
                style: 1,
                points: vec![(512.0, 90.0), (1024.0, 95.0)],
            },
            Series {
                name: "llama.cpp warm disk".into(),
                target: Target::LlamaCpp,
                style: 2,
                points: vec![(512.0, 40.0)],
            },
        ];
        ttft(&path, &series)?;
        let svg = std::fs::read_to_string(&path)?;
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("semantic warm RAM"));
        assert!(ttft(&path, &[]).is_err());
        util::remove_path(&dir)?;
        Ok(())
    }
}
