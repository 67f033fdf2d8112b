//! Latency percentile curves as SVG (`--plot`): x is the percentile on the usual
//! "number of nines" scale (50%, 90%, 99%, 99.9%, ...), y the latency in microseconds on a log
//! scale, one curve per run.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

/// Percentile `q` (0..1) on the nines scale: -log10(1 - q).
fn nines(q: f64) -> f64 {
    -(1.0 - q).max(1e-7).log10()
}

/// The curve points of a histogram of nanoseconds: (nines, microseconds).
pub fn percentile_curve(histogram: &Histogram<u64>) -> Vec<(f64, f64)> {
    let mut points = Vec::new();
    let mut q = 0.0f64;
    while q < 0.999_999 && !histogram.is_empty() {
        let us = histogram.value_at_quantile(q) as f64 / 1000.0;
        points.push((nines(q), us.max(1.0)));
        // Evenly spaced on the nines scale.
        q = 1.0 - (1.0 - q) * 0.9;
    }
    if !histogram.is_empty() {
        points.push((nines(0.999_999), (histogram.max() as f64 / 1000.0).max(1.0)));
    }
    points
}

pub fn latency_percentiles(
    path: &Path,
    title: &str,
    curves: &[(String, &Histogram<u64>)],
) -> Result<(), String> {
    let series: Vec<(String, Vec<(f64, f64)>)> = curves
        .iter()
        .map(|(label, h)| (label.clone(), percentile_curve(h)))
        .collect();
    let y_max = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.1))
        .fold(10.0f64, f64::max)
        * 1.5;
    let error = |e: &dyn std::fmt::Display| format!("--plot {}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| error(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("latency by percentile: {title}"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..6f64, (1f64..y_max).log_scale())
        .map_err(|e| error(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (us)")
        .x_labels(7)
        .x_label_formatter(&|x| {
            let percent = 100.0 * (1.0 - 10f64.powf(-x));
            format!("{percent:.4}%")
                .trim_end_matches('0')
                .trim_end_matches('.')
                .to_string()
        })
        .draw()
        .map_err(|e| error(&e))?;
    for (i, (label, points)) in series.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| error(&e))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| error(&e))?;
    root.present().map_err(|e| error(&e))?;
    Ok(())
}

/// Throughput against group count (x: log2 of groups per node), one curve per shard count.
pub fn scaling(path: &Path, series: &[(String, Vec<(f64, f64)>)]) -> Result<(), String> {
    let error = |e: &dyn std::fmt::Display| format!("--plot {}: {e}", path.display());
    let x_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.0))
        .fold(1.0f64, f64::max)
        + 0.5;
    let y_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.2;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| error(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("acknowledged ops/s by groups per node", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.5f64..x_max, 0f64..y_max)
        .map_err(|e| error(&e))?;
    chart
        .configure_mesh()
        .x_desc("groups per node")
        .y_desc("ops/s")
        .x_label_formatter(&|x| format!("{:.0}", 2f64.powf(*x)))
        .draw()
        .map_err(|e| error(&e))?;
    for (i, (label, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| error(&e))?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|e| error(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| error(&e))?;
    root.present().map_err(|e| error(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curve_rises_through_the_percentiles_and_ends_at_the_max() {
        let mut h = Histogram::<u64>::new(3).unwrap();
        for v in 1..=10_000u64 {
            h.record(v * 1000).unwrap();
        }
        let curve = percentile_curve(&h);
        assert!(curve.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        let last = curve.last().unwrap();
        assert!((last.1 - 10_000.0).abs() < 20.0, "ends at the max: {last:?}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.svg");
        latency_percentiles(&path, "test", &[("a".into(), &h)]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("percentile"));
    }
}
