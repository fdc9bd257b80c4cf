//! Plots of a benchmark run, each as SVG and PNG (plotters): ns/packet against the Service
//! count per frame kind, end-to-end latency percentiles per path against the Service count
//! per mode, and the pod -> ClusterIP TCP_CRR comparison (latency per path, and ours' p50
//! divided by each other path's).
//!
//! Text is drawn with a TrueType font read at run time (plotters' `ab_glyph` backend, no
//! fontconfig): DejaVu Sans from Debian's `fonts-dejavu-core`, or the file named by
//! `LB_BENCH_FONT`.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report;
use crate::schema::{PartResult, Results, Row, CLUSTERIP_CASE};

/// Why a plot was not drawn.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable TrueType font (the message names the package to install).
    #[error("{0}")]
    Font(String),
    /// The part has no row this plot can use.
    #[error("no {0} data")]
    NoData(&'static str),
    /// plotters failed while drawing.
    #[error("drawing: {0}")]
    Draw(String),
    /// plotters failed while writing a file.
    #[error("{file}: {message}")]
    Write { file: String, message: String },
}

type Result<T> = std::result::Result<T, Error>;

const FONT: &str = "sans-serif";
const FONT_FILES: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers the font once; the error names the package to install.
fn font() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let candidates: Vec<PathBuf> = std::env::var_os("LB_BENCH_FONT")
            .map(PathBuf::from)
            .into_iter()
            .chain(FONT_FILES.iter().map(PathBuf::from))
            .collect();
        let file = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
            format!(
                "no TrueType font found (looked at {candidates:?}); install fonts-dejavu-core \
                 or set LB_BENCH_FONT"
            )
        })?;
        let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FONT, FontStyle::Normal, bytes)
            .map_err(|_| format!("{}: not a usable TrueType font", file.display()))
    })
    .clone()
    .map_err(Error::Font)
}

/// One figure, drawable on any backend.
trait Figure {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>;
}

struct PerPacket<'a>(&'a PartResult);
struct E2e<'a>(&'a PartResult);
struct ClusterIp<'a>(&'a PartResult);

impl Figure for PerPacket<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        per_packet(self.0, root)
    }
}

impl Figure for E2e<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        e2e(self.0, root)
    }
}

impl Figure for ClusterIp<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        clusterip(self.0, root)
    }
}

/// Whether `part` has a usable [`CLUSTERIP_CASE`] row.
fn has_clusterip(part: &PartResult) -> bool {
    part.rows
        .iter()
        .any(|r| r.case == CLUSTERIP_CASE && r.error.is_none() && r.get("p50_us").is_some())
}

/// Draws every plot the results have data for; one result per plot (its files, or why not).
pub fn all(results: &Results, out: &Path) -> Vec<Result<Vec<PathBuf>>> {
    let mut v = Vec::new();
    for part in &results.parts {
        if !part.rows.iter().any(|r| r.error.is_none()) {
            continue;
        }
        match part.part.as_str() {
            "per-packet" => v.push(both(out, "per_packet", (1100, 650), &PerPacket(part))),
            "e2e" => {
                v.push(both(out, "e2e_latency", (1500, 950), &E2e(part)));
                if has_clusterip(part) {
                    v.push(both(out, "clusterip_crr", (1400, 620), &ClusterIp(part)));
                }
            }
            _ => {}
        }
    }
    v
}

/// Draws `fig` into `NAME.svg` and `NAME.png`.
fn both(out: &Path, name: &str, size: (u32, u32), fig: &impl Figure) -> Result<Vec<PathBuf>> {
    font()?;
    let svg = out.join(format!("{name}.svg"));
    let png = out.join(format!("{name}.png"));
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        fig.draw(&root)?;
        root.present().map_err(|e| Error::Write {
            file: format!("{name}.svg"),
            message: e.to_string(),
        })?;
    }
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        fig.draw(&root)?;
        root.present().map_err(|e| Error::Write {
            file: format!("{name}.png"),
            message: e.to_string(),
        })?;
    }
    Ok(vec![svg, png])
}

fn err<E: std::fmt::Debug>(e: E) -> Error {
    Error::Draw(format!("{e:?}"))
}

/// A colour per series, readable on white.
fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(23, 190, 207),
    ];
    C[i % C.len()]
}

fn path_color(path: &str) -> RGBColor {
    match path {
        "direct" => RGBColor(90, 90, 90),
        "ours" => RGBColor(31, 119, 180),
        "ours-tc" => RGBColor(23, 190, 207),
        "iptables-end" => RGBColor(214, 39, 40),
        "iptables-middle" => RGBColor(255, 127, 14),
        "nftables" => RGBColor(44, 160, 44),
        _ => RGBColor(148, 103, 189),
    }
}

fn x_label(x: &f64) -> String {
    report::count(x.round() as u64)
}

/// The log-scale x range covering `ns`.
fn x_range(ns: &[u64]) -> std::ops::Range<f64> {
    let max = ns.iter().copied().max().unwrap_or(1).max(1) as f64;
    0.5..max * 2.0
}

fn per_packet<DB: DrawingBackend>(part: &PartResult, root: &DrawingArea<DB, Shift>) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let ok: Vec<&Row> = part
        .rows
        .iter()
        .filter(|r| r.error.is_none() && r.get("ns_per_packet").is_some())
        .collect();
    if ok.is_empty() {
        return Err(Error::NoData("per-packet"));
    }
    let ct = |r: &Row| r.params.get("ct_entries").is_some_and(|c| c != "0");
    let ns: Vec<u64> = ok.iter().map(|r| r.services).collect();
    let ymax = ok
        .iter()
        .filter_map(|r| r.get("ns_per_packet").map(|s| s.max))
        .fold(0.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Per-packet datapath cost (BPF_PROG_RUN, JIT): median, bars = min–max",
            (FONT, 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range(&ns).log_scale(), 0.0..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("Services programmed (10 endpoints each), log scale")
        .y_desc("ns per packet")
        .x_label_formatter(&x_label)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(RGBColor(238, 238, 238))
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 16))
        .draw()
        .map_err(err)?;
    let cases = report_order(ok.iter().map(|r| r.case.clone()));
    let points = |case: &str, metric: &str, with_ct: bool| {
        let mut pts: Vec<(f64, f64, f64, f64)> = ok
            .iter()
            .filter(|r| r.case == case && ct(r) == with_ct)
            .filter_map(|r| {
                r.get(metric)
                    .map(|s| (r.services as f64, s.median, s.min, s.max))
            })
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        pts
    };
    for (i, case) in cases.iter().enumerate() {
        let c = color(i);
        let pts = points(case, "ns_per_packet", false);
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.1)),
                c.stroke_width(2),
            ))
            .map_err(err)?
            .label(case.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|p| Circle::new((p.0, p.1), 4, c.filled())))
            .map_err(err)?;
        chart
            .draw_series(
                pts.iter()
                    .map(|p| PathElement::new(vec![(p.0, p.2), (p.0, p.3)], c.stroke_width(1))),
            )
            .map_err(err)?;
        // The 1M-conntrack configuration: crosses just right of its N.
        let filled = points(case, "ns_per_packet", true);
        chart
            .draw_series(
                filled
                    .iter()
                    .map(|p| Cross::new((p.0 * 1.3, p.1), 6, c.stroke_width(2))),
            )
            .map_err(err)?;
        // The SYN row's estimate without the per-call overhead, dashed.
        let adj = points(case, "adjusted_ns", false);
        if !adj.is_empty() {
            chart
                .draw_series(DashedLineSeries::new(
                    adj.iter().map(|p| (p.0, p.1)),
                    6,
                    4,
                    c.stroke_width(2),
                ))
                .map_err(err)?
                .label("↳ same, minus the per-call overhead (dashed)")
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 8, y)], c.stroke_width(2))
                });
            let adj_ct = points(case, "adjusted_ns", true);
            chart
                .draw_series(
                    adj_ct
                        .iter()
                        .map(|p| Cross::new((p.0 * 1.3, p.1), 5, c.stroke_width(1))),
                )
                .map_err(err)?;
        }
    }
    // A legend entry only: an invisible point far below the plot (not so far that its pixel
    // coordinate overflows an i32).
    chart
        .draw_series(std::iter::once(Cross::new(
            (0.6, -10.0 * ymax.max(1.0)),
            0,
            WHITE,
        )))
        .map_err(err)?
        .label("×: same frame with 1M conntrack entries loaded")
        .legend(|(x, y)| Cross::new((x + 10, y), 5, BLACK.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// Distinct values in order of first appearance.
fn report_order(it: impl Iterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for x in it {
        if !v.contains(&x) {
            v.push(x);
        }
    }
    v
}

fn e2e<DB: DrawingBackend>(part: &PartResult, root: &DrawingArea<DB, Shift>) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(
            "End-to-end latency per path (netns lab): p50 solid, p99 dashed; median of interleaved rounds",
            (FONT, 22),
        )
        .map_err(err)?;
    // The pod -> ClusterIP case has a figure of its own.
    let ok: Vec<&Row> = part
        .rows
        .iter()
        .filter(|r| r.error.is_none() && r.get("p50_us").is_some() && r.case != CLUSTERIP_CASE)
        .collect();
    let modes = report_order(ok.iter().map(|r| r.case.clone()));
    if modes.is_empty() {
        return Err(Error::NoData("e2e latency"));
    }
    let panels = root.split_evenly((2, modes.len()));
    let (top, bottom) = panels.split_at(modes.len());
    for (panel, mode) in bottom.iter().zip(&modes) {
        ratio_panel(&ok, mode, panel)?;
    }
    for (panel, mode) in top.iter().zip(&modes) {
        let rows: Vec<&Row> = ok.iter().copied().filter(|r| &r.case == mode).collect();
        latency_panel(&rows, mode, panel)?;
    }
    Ok(())
}

/// p50 (solid) and p99 (dashed) per path of `rows` (one case) against the Service count.
fn latency_panel<DB: DrawingBackend>(
    rows: &[&Row],
    caption: &str,
    panel: &DrawingArea<DB, Shift>,
) -> Result<()> {
    let ns: Vec<u64> = rows.iter().map(|r| r.services).collect();
    let ymax = rows
        .iter()
        .filter_map(|r| r.get("p99_us").map(|s| s.median))
        .fold(0.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(panel)
        .caption(caption, (FONT, 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range(&ns).log_scale(), 0.0..ymax.max(1.0))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("Services, log scale")
        .y_desc("µs per transaction")
        .x_label_formatter(&x_label)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(RGBColor(238, 238, 238))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(err)?;
    for path in report_order(rows.iter().map(|r| r.path.clone())) {
        let c = path_color(&path);
        let series = |metric: &str| {
            let mut pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.path == path)
                .filter_map(|r| r.get(metric).map(|s| (r.services as f64, s.median)))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            pts
        };
        chart
            .draw_series(LineSeries::new(series("p50_us"), c.stroke_width(3)).point_size(4))
            .map_err(err)?
            .label(path.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        chart
            .draw_series(DashedLineSeries::new(
                series("p99_us"),
                8,
                5,
                c.stroke_width(2),
            ))
            .map_err(err)?;
        chart
            .draw_series(
                series("p99_us")
                    .into_iter()
                    .map(|p| TriangleMarker::new(p, 4, c.filled())),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// p50 per path of `rows` (one case) against the Service count, each point with a bar from
/// the lowest to the highest round; the paths of one N are drawn side by side.
fn p50_panel<DB: DrawingBackend>(
    rows: &[&Row],
    ns: &[u64],
    panel: &DrawingArea<DB, Shift>,
) -> Result<()> {
    let ymax = rows
        .iter()
        .filter_map(|r| r.get("p50_us").map(|s| s.max))
        .fold(0.0, f64::max)
        * 1.15;
    let paths = report_order(rows.iter().map(|r| r.path.clone()));
    let r = x_range(ns);
    let mut chart = ChartBuilder::on(panel)
        .caption(
            "p50 µs per connection (bars: lowest to highest round)",
            (FONT, 20),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((r.start..r.end * 1.6).log_scale(), 0.0..ymax.max(1.0))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("Services, log scale")
        .y_desc("µs per connection")
        .x_label_formatter(&x_label)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(RGBColor(238, 238, 238))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(err)?;
    for (i, path) in paths.iter().enumerate() {
        let c = path_color(path);
        // Side by side: path i at N × 1.12^i.
        let shift = 1.12f64.powi(i as i32);
        let pts: Vec<(f64, f64, f64, f64)> = ns
            .iter()
            .filter_map(|&n| {
                let s = rows
                    .iter()
                    .find(|r| r.services == n && &r.path == path)?
                    .get("p50_us")?;
                Some((n as f64 * shift, s.median, s.min, s.max))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.1)),
                c.stroke_width(2),
            ))
            .map_err(err)?
            .label(path.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        chart
            .draw_series(pts.iter().map(|p| Circle::new((p.0, p.1), 5, c.filled())))
            .map_err(err)?;
        chart
            .draw_series(
                pts.iter()
                    .map(|p| PathElement::new(vec![(p.0, p.2), (p.0, p.3)], c.stroke_width(2))),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// The pod -> ClusterIP TCP_CRR figure: p50 per path (left), and ours' p50 divided by
/// each other path's, paired per round (right), with the issue's ≤ 1.03× target for ours ÷
/// direct.
fn clusterip<DB: DrawingBackend>(part: &PartResult, root: &DrawingArea<DB, Shift>) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(
            "Pod -> ClusterIP on the same node, TCP_CRR (netns lab): median of interleaved rounds",
            (FONT, 22),
        )
        .map_err(err)?;
    let rows: Vec<&Row> = part
        .rows
        .iter()
        .filter(|r| r.case == CLUSTERIP_CASE && r.error.is_none() && r.get("p50_us").is_some())
        .collect();
    if rows.is_empty() {
        return Err(Error::NoData("pod -> ClusterIP"));
    }
    let panels = root.split_evenly((1, 2));
    let mut ns: Vec<u64> = rows.iter().map(|r| r.services).collect();
    ns.sort_unstable();
    ns.dedup();
    p50_panel(&rows, &ns, &panels[0])?;
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for path in report_order(rows.iter().map(|r| r.path.clone())) {
        if path == "ours" {
            continue;
        }
        let pts: Vec<(f64, f64)> = ns
            .iter()
            .filter_map(|&n| report::clusterip_ours_over(part, n, &path).map(|v| (n as f64, v)))
            .collect();
        series.push((path, pts));
    }
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(1.2, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&panels[1])
        .caption("ours p50 ÷ each path's p50 (paired rounds)", (FONT, 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range(&ns).log_scale(), 0.0..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("Services, log scale")
        .y_desc("ours ÷ path")
        .x_label_formatter(&x_label)
        .y_label_formatter(&|y| format!("{y:.1}×"))
        .light_line_style(RGBColor(238, 238, 238))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(err)?;
    let r = x_range(&ns);
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(r.start, 1.0), (r.end, 1.0)],
            RGBColor(90, 90, 90).stroke_width(1),
        )))
        .map_err(err)?;
    let target = report::CLUSTERIP_TARGET;
    chart
        .draw_series(DashedLineSeries::new(
            vec![(r.start, target), (r.end, target)],
            6,
            4,
            BLACK.stroke_width(1),
        ))
        .map_err(err)?
        .label(format!("target for ours ÷ direct: ≤ {target:.2}×"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(1)));
    for (path, pts) in series {
        let c = path_color(&path);
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(3)))
            .map_err(err)?
            .label(format!("ours ÷ {path}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 4, c.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// p50 of each path divided by the direct path's, per N: the ratio of paired rounds, which a
/// change in the machine's load affects much less than the absolute numbers.
fn ratio_panel<DB: DrawingBackend>(
    ok: &[&Row],
    mode: &str,
    panel: &DrawingArea<DB, Shift>,
) -> Result<()> {
    let rows: Vec<&&Row> = ok.iter().filter(|r| r.case == mode).collect();
    let ns: Vec<u64> = rows.iter().map(|r| r.services).collect();
    let direct = |n: u64| {
        rows.iter()
            .find(|r| r.services == n && r.path == "direct")
            .and_then(|r| r.get("p50_us"))
    };
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for path in report_order(rows.iter().map(|r| r.path.clone())) {
        if path == "direct" {
            continue;
        }
        let mut pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.path == path)
            .filter_map(|r| {
                let d = direct(r.services)?;
                let v = report::ratio(r.get("p50_us")?, d)?;
                Some((r.services as f64, v))
            })
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        series.push((path, pts));
    }
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(2.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(panel)
        .caption(format!("{mode}: p50 ÷ direct (paired rounds)"), (FONT, 18))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range(&ns).log_scale(), 0.0..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("Services, log scale")
        .y_desc("× the direct path")
        .x_label_formatter(&x_label)
        .y_label_formatter(&|y| format!("{y:.1}×"))
        .light_line_style(RGBColor(238, 238, 238))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(err)?;
    let r = x_range(&ns);
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(r.start, 1.0), (r.end, 1.0)],
            RGBColor(90, 90, 90).stroke_width(1),
        )))
        .map_err(err)?;
    for (path, pts) in series {
        let c = path_color(&path);
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(3)))
            .map_err(err)?;
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 4, c.filled())))
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Stat;
    use crate::sysinfo::Meta;

    /// Small numbers too: the legend-only point must stay within plotters' pixel range.
    #[test]
    fn draws_both_plots() {
        let pp = |n: u64, ns: f64| {
            Row::new("per-packet", "no service match", "ours (XDP)", n)
                .param("ct_entries", 0)
                .metric("ns_per_packet", "ns", Stat::of(&[ns, ns + 1.0]))
        };
        let e2e = |path: &str, n: u64| {
            Row::new("e2e", "TCP_CRR", path, n)
                .metric("p50_us", "µs", Stat::of(&[10.0, 11.0]))
                .metric("p99_us", "µs", Stat::of(&[20.0, 21.0]))
        };
        let results = Results {
            meta: Meta::default(),
            parts: vec![
                PartResult {
                    part: "per-packet".into(),
                    rows: vec![pp(1, 9.0), pp(1000, 10.0)],
                    ..Default::default()
                },
                PartResult {
                    part: "e2e".into(),
                    rows: ["direct", "ours"]
                        .iter()
                        .flat_map(|p| [e2e(p, 1), e2e(p, 1000)])
                        .collect(),
                    ..Default::default()
                },
            ],
        };
        let dir = std::env::temp_dir().join(format!("lb-bench-plot-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let drawn = all(&results, &dir);
        assert_eq!(drawn.len(), 2);
        check_drawn(drawn);
        // With pod -> ClusterIP rows: a third figure, and the e2e one still draws (without
        // them).
        let mut with = results.clone();
        with.parts[1].rows.extend(
            ["direct", "ours", "nftables", "iptables-end"]
                .iter()
                .flat_map(|p| {
                    [1, 1000].map(|n| Row {
                        case: CLUSTERIP_CASE.into(),
                        ..e2e(p, n)
                    })
                }),
        );
        let drawn = all(&with, &dir);
        assert_eq!(drawn.len(), 3);
        check_drawn(drawn);
        if font().is_ok() {
            assert!(dir.join("clusterip_crr.png").is_file());
            assert!(dir.join("clusterip_crr.svg").is_file());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn check_drawn(drawn: Vec<Result<Vec<PathBuf>>>) {
        for r in drawn {
            match r {
                Ok(files) => assert!(files.iter().all(|f| f.is_file()), "{files:?}"),
                // No font on this machine: nothing to draw with.
                Err(Error::Font(e)) => eprintln!("skipped: {e}"),
                Err(e) => panic!("{e}"),
            }
        }
    }
}
