//! `--svg FILE`: sync duration and bytes on the wire against change rate and against volume size, and the bytes
//! blockmover's agents read and their peak RSS against volume size, drawn with plotters' SVG backend: six panels,
//! one colour per tool (blockmover's stateless, manifest and change-list rows apart), one dash pattern per volume
//! size or per sync.

use std::path::Path;

use anyhow::anyhow;
use plotters::coord::combinators::LogCoord;
use plotters::coord::ranged1d::Ranged;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

use super::report::{
    bytes, secs, trim_float, Report, SyncKind, SyncRow, BLOCKMOVER, CHANGELIST, DELAYED, MANIFEST,
    REFLINK,
};

/// One line of a panel: a tool and a variant of it (a volume size, or a kind of sync), its points sorted by x.
struct Line {
    tool: &'static str,
    variant: String,
    /// Position of the variant among the tool's variants, for its dash pattern.
    order: f64,
    points: Vec<(f64, f64)>,
}

/// Tools in a fixed order with a fixed colour each.
const TOOLS: [(&str, RGBColor); 7] = [
    (BLOCKMOVER, RGBColor(200, 30, 40)),
    (MANIFEST, RGBColor(30, 150, 60)),
    (CHANGELIST, RGBColor(130, 50, 170)),
    (REFLINK, RGBColor(0, 150, 160)),
    (DELAYED, RGBColor(120, 120, 120)),
    ("rsync", RGBColor(30, 100, 190)),
    ("volsync-rsync-tls", RGBColor(240, 140, 0)),
];

/// Dash pattern (dash, gap in pixels) of a tool's n-th variant; a gap of 0 draws a solid line.
const DASHES: [(u32, u32); 5] = [(10_000, 0), (12, 6), (5, 4), (20, 4), (2, 3)];

/// Writes the chart of `report` to `path`.
pub fn write_svg(report: &Report, path: &Path) -> anyhow::Result<()> {
    let incremental: Vec<&SyncRow> = report
        .syncs
        .iter()
        .filter(|r| r.kind == SyncKind::Incremental && r.change_percent.is_some())
        .collect();
    let by_rate = |value: fn(&SyncRow) -> f64| {
        let mut lines = Vec::new();
        for r in &incremental {
            let point = (r.change_percent.unwrap_or_default(), value(r));
            let variant = bytes(r.volume_bytes);
            add(&mut lines, r.tool, variant, r.volume_bytes as f64, point);
        }
        finish(lines)
    };
    let by_size = |value: fn(&SyncRow) -> f64| {
        let mut lines = Vec::new();
        for r in report.syncs.iter().filter(|r| value(r) > 0.0) {
            let (variant, order) = match (r.kind, r.change_percent) {
                (SyncKind::Incremental, Some(p)) => (format!("incremental {}%", trim_float(p)), p),
                (kind, _) => (kind.name().to_owned(), -1.0),
            };
            let point = (r.volume_bytes as f64 / (1 << 20) as f64, value(r));
            add(&mut lines, r.tool, variant, order, point);
        }
        finish(lines)
    };
    let duration = |r: &SyncRow| r.duration_secs;
    let wire = |r: &SyncRow| (r.wire_sent + r.wire_received) as f64;
    let read = |r: &SyncRow| {
        (r.bytes_read_source.unwrap_or(0) + r.bytes_read_destination.unwrap_or(0)) as f64
    };
    let rss = |r: &SyncRow| r.rss_source.max(r.rss_destination).unwrap_or(0) as f64;

    let root = SVGBackend::new(path, (1400, 1750)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let title = format!(
        "blockmover bench: {}; change: {}",
        report.volume, report.change
    );
    let root = root.titled(&title, ("sans-serif", 17)).map_err(plot_err)?;
    let panels = root.split_evenly((3, 2));
    let rate_axis = "change rate (% of 4 KiB blocks, log)";
    let size_axis = "volume size (MiB, log)";
    let p = &panels;
    let dur_title = "incremental sync duration vs change rate";
    panel(
        &p[0],
        dur_title,
        rate_axis,
        "seconds (log)",
        &by_rate(duration),
        Y::Seconds,
    )?;
    let wire_title = "incremental bytes on the wire (both ways) vs change rate";
    panel(
        &p[1],
        wire_title,
        rate_axis,
        "bytes (log)",
        &by_rate(wire),
        Y::Bytes,
    )?;
    let dur_title = "sync duration vs volume size";
    panel(
        &p[2],
        dur_title,
        size_axis,
        "seconds (log)",
        &by_size(duration),
        Y::Seconds,
    )?;
    let wire_title = "bytes on the wire (both ways) vs volume size";
    panel(
        &p[3],
        wire_title,
        size_axis,
        "bytes (log)",
        &by_size(wire),
        Y::Bytes,
    )?;
    let read_title = "bytes blockmover's agents read (source + destination) vs volume size";
    panel(
        &p[4],
        read_title,
        size_axis,
        "bytes (log)",
        &by_size(read),
        Y::Bytes,
    )?;
    let rss_title = "peak RSS of the larger agent vs volume size";
    panel(
        &p[5],
        rss_title,
        size_axis,
        "bytes (log)",
        &by_size(rss),
        Y::Bytes,
    )?;
    root.present().map_err(plot_err)?;
    Ok(())
}

fn add(lines: &mut Vec<Line>, tool: &'static str, variant: String, order: f64, point: (f64, f64)) {
    match lines
        .iter_mut()
        .find(|l| l.tool == tool && l.variant == variant)
    {
        Some(line) => line.points.push(point),
        None => lines.push(Line {
            tool,
            variant,
            order,
            points: vec![point],
        }),
    }
}

/// Sorts lines by tool then variant, and each line's points by x.
fn finish(mut lines: Vec<Line>) -> Vec<Line> {
    let rank = |tool: &str| {
        TOOLS
            .iter()
            .position(|t| t.0 == tool)
            .unwrap_or(TOOLS.len())
    };
    lines.sort_by(|a, b| {
        (rank(a.tool), a.order)
            .partial_cmp(&(rank(b.tool), b.order))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    for line in &mut lines {
        line.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    lines
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("cannot draw the chart: {e}")
}

/// The span of the positive `values` (None if there is none).
fn span(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values
        .filter(|v| *v > 0.0)
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    (lo <= hi).then_some((lo, hi))
}

/// A range around `values` that a log axis can take, with some room either side, and `headroom` (a fraction of
/// the axis) left free above them.
fn log_range(values: impl Iterator<Item = f64>, headroom: f64) -> std::ops::Range<f64> {
    let Some((lo, hi)) = span(values) else {
        return 0.1..10.0;
    };
    let (lo, hi) = (lo / 1.5, hi * 1.5);
    lo..lo * (hi / lo).powf(1.0 / (1.0 - headroom))
}

/// The share of a panel's height the legend of `lines` takes (about 17 px a line in a ~480 px plot), kept free
/// above the data so that the legend hides none of it.
fn legend_share(lines: &[Line]) -> f64 {
    ((lines.len() as f64 * 17.0 + 20.0) / 480.0).min(0.6)
}

/// What a panel's y axis shows (both on a log axis).
#[derive(Clone, Copy)]
enum Y {
    Seconds,
    Bytes,
}

/// One panel: x and y on log axes.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    lines: &[Line],
    y: Y,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let x = log_range(lines.iter().flat_map(|l| &l.points).map(|p| p.0), 0.0);
    let headroom = legend_share(lines);
    let ys = lines.iter().flat_map(|l| &l.points).map(|p| p.1);
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(75);
    let x_fmt = |v: &f64| trim_float(*v);
    let y_fmt = |v: &f64| match y {
        Y::Seconds => secs(*v),
        Y::Bytes => bytes(*v as u64),
    };
    let mut chart = builder
        .build_cartesian_2d(x.log_scale(), log_range(ys, headroom).log_scale())
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .draw()
        .map_err(plot_err)?;
    draw_lines(&mut chart, lines)
}

/// Each line in its tool's colour and its variant's dash pattern, its points marked, and the legend.
fn draw_lines<'a, DB, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<LogCoord<f64>, Y>>,
    lines: &[Line],
) -> anyhow::Result<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    Y: Ranged<ValueType = f64>,
{
    let mut variant_of_tool = 0;
    for (i, line) in lines.iter().enumerate() {
        variant_of_tool = match i {
            0 => 0,
            _ if lines[i - 1].tool == line.tool => variant_of_tool + 1,
            _ => 0,
        };
        let color = TOOLS
            .iter()
            .find(|t| t.0 == line.tool)
            .map_or(BLACK, |t| t.1);
        let style = color.stroke_width(2);
        let (dash, gap) = DASHES[variant_of_tool % DASHES.len()];
        chart
            .draw_series(DashedLineSeries::new(
                line.points.iter().copied(),
                dash,
                gap,
                style,
            ))
            .map_err(plot_err)?
            .label(format!("{} {}", line.tool, line.variant))
            .legend(move |(x, y)| {
                DashedPathElement::new(vec![(x, y), (x + 28, y)], dash.min(28), gap, style)
            });
        chart
            .draw_series(
                line.points
                    .iter()
                    .map(|&p| Circle::new(p, 3, color.filled())),
            )
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(plot_err)
}
