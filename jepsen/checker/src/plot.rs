//! A latency plot as a self-contained SVG (written by hand, no
//! dependency): one dot per completed client operation at (invoke time in
//! s, latency in ms on a log scale), green for `ok`, red for `fail`,
//! orange for `info`; nemesis fault windows (see [`crate::history`] for
//! the `start …`/`stop …` convention) shaded, other nemesis records drawn
//! as dashed lines; axes with ticks, and a legend.

use std::fmt::Write as _;

use crate::history::{Function, Record};
use crate::ops::{client_ops, index_time, time_of, Outcome};

/// A fault window: from a `start NAME …` nemesis record to the matching
/// `stop NAME` (or the end of the history).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NemesisWindow {
    pub name: String,
    /// The whole `start …` value.
    pub description: String,
    pub start_index: u64,
    pub start_time: u64,
    pub end_index: Option<u64>,
    /// `None`: never stopped.
    pub end_time: Option<u64>,
}

/// A nemesis record that is not part of a window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NemesisPoint {
    pub index: u64,
    pub time: u64,
    pub value: String,
}

/// Pair `start NAME …` / `stop NAME` nemesis records into windows (a stop
/// closes the most recent open window of its name). Times are `time_ns`
/// (or record indices when the history has no times).
pub fn nemesis_windows(records: &[Record]) -> (Vec<NemesisWindow>, Vec<NemesisPoint>) {
    let by_index = index_time(records);
    let mut windows: Vec<NemesisWindow> = Vec::new();
    let mut points = Vec::new();
    for r in records.iter().filter(|r| r.f == Function::Nemesis) {
        let value = r.value.clone().unwrap_or_default();
        let t = time_of(r, by_index);
        if let Some(rest) = value.strip_prefix("start ") {
            let name = rest.split_whitespace().next().unwrap_or("").to_string();
            windows.push(NemesisWindow {
                name,
                description: value.clone(),
                start_index: r.index,
                start_time: t,
                end_index: None,
                end_time: None,
            });
            continue;
        }
        if let Some(rest) = value.strip_prefix("stop ") {
            let name = rest.split_whitespace().next().unwrap_or("");
            if let Some(w) = windows
                .iter_mut()
                .rev()
                .find(|w| w.end_time.is_none() && w.name == name)
            {
                w.end_index = Some(r.index);
                w.end_time = Some(t.max(w.start_time));
                continue;
            }
        }
        points.push(NemesisPoint {
            index: r.index,
            time: t,
            value,
        });
    }
    (windows, points)
}

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 520.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 220.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const OK: &str = "#2ca02c";
const FAIL: &str = "#d62728";
const INFO: &str = "#ff7f0e";
const PALETTE: [&str; 7] = [
    "#1f77b4", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
];

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' => {}
            c => out.push(c),
        }
    }
    out
}

/// A "nice" tick step (1, 2 or 5 × 10^k) giving about `target` ticks over `span`.
fn nice_step(span: f64, target: f64) -> f64 {
    let raw = (span / target).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * mag >= raw {
            return m * mag;
        }
    }
    10.0 * mag
}

fn fmt_tick(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()).clamp(0.0, 9.0) as usize
    };
    format!("{v:.decimals$}")
}

/// The latency plot of `records` as an SVG document.
pub fn latency_svg(records: &[Record]) -> String {
    let by_index = index_time(records);
    // Seconds per time unit, and the unit names.
    let (scale_x, scale_y, x_label, y_label) = if by_index {
        (1.0, 1.0, "time (record index)", "latency (records, log)")
    } else {
        (1e-9, 1e-6, "time (s)", "latency (ms, log)")
    };
    let ops = client_ops(records).ops;
    // (x, latency, outcome)
    let mut dots: Vec<(f64, f64, Outcome)> = Vec::new();
    for op in &ops {
        let Some(done) = op.complete_time else {
            continue;
        };
        let lat = done.saturating_sub(op.invoke_time) as f64 * scale_y;
        dots.push((op.invoke_time as f64 * scale_x, lat, op.outcome));
    }
    let (windows, points) = nemesis_windows(records);
    let t_end = records
        .iter()
        .map(|r| time_of(r, by_index) as f64 * scale_x)
        .fold(0.0f64, f64::max);
    let x_max = if t_end > 0.0 { t_end } else { 1.0 };
    let min_lat = if by_index { 0.1 } else { 1e-3 };
    let lats = dots.iter().map(|d| d.1.max(min_lat));
    let lo = lats.clone().fold(f64::INFINITY, f64::min);
    let hi = lats.fold(0.0f64, f64::max);
    let (y_lo, y_hi) = if lo.is_finite() && hi > 0.0 {
        let a = lo.log10().floor();
        let b = hi.log10().ceil();
        (a, if b > a { b } else { a + 1.0 })
    } else {
        (0.0, 3.0)
    };
    let pw = WIDTH - LEFT - RIGHT;
    let ph = HEIGHT - TOP - BOTTOM;
    let sx = |x: f64| LEFT + (x / x_max).clamp(0.0, 1.0) * pw;
    let sy = |lat: f64| {
        let l = lat.max(min_lat).log10();
        TOP + ph - ((l - y_lo) / (y_hi - y_lo)).clamp(0.0, 1.0) * ph
    };

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="22" text-anchor="middle" font-size="15">Operation latency ({} ops, {} nemesis windows)</text>"#,
        LEFT + pw / 2.0,
        dots.len(),
        windows.len()
    );

    // Nemesis windows and points.
    let mut names: Vec<&str> = Vec::new();
    for w in &windows {
        if !names.contains(&w.name.as_str()) {
            names.push(&w.name);
        }
    }
    let colour_of = |name: &str| {
        let i = names.iter().position(|n| *n == name).unwrap_or(0);
        PALETTE.get(i % PALETTE.len()).copied().unwrap_or("#7f7f7f")
    };
    for w in &windows {
        let x0 = sx(w.start_time as f64 * scale_x);
        let x1 = sx(w.end_time.map_or(x_max, |t| t as f64 * scale_x));
        let _ = writeln!(
            s,
            r#"<rect x="{x0:.1}" y="{TOP:.1}" width="{:.1}" height="{ph:.1}" fill="{}" fill-opacity="0.15"><title>{} (#{}..{})</title></rect>"#,
            (x1 - x0).max(1.0),
            colour_of(&w.name),
            esc(&w.description),
            w.start_index,
            w.end_index.map_or("end".to_string(), |i| format!("#{i}"))
        );
    }
    for p in &points {
        let x = sx(p.time as f64 * scale_x);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP:.1}" x2="{x:.1}" y2="{:.1}" stroke="#555" stroke-dasharray="3,3"><title>{} (#{})</title></line>"##,
            TOP + ph,
            esc(&p.value),
            p.index
        );
    }

    // Grid, ticks and axes.
    let step = nice_step(x_max, 8.0);
    let mut k = 0u32;
    loop {
        let v = f64::from(k) * step;
        if v > x_max * (1.0 + 1e-9) || k > 100 {
            break;
        }
        let x = sx(v);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP:.1}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="black"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + ph,
            TOP + ph,
            TOP + ph + 5.0,
            TOP + ph + 18.0,
            fmt_tick(v, step)
        );
        k += 1;
    }
    let mut d = y_lo;
    while d <= y_hi + 1e-9 {
        let y = sy(10f64.powf(d));
        let label = fmt_tick(10f64.powf(d), 10f64.powf(d.min(0.0)));
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><line x1="{:.1}" y1="{y:.1}" x2="{LEFT:.1}" y2="{y:.1}" stroke="black"/><text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"##,
            LEFT + pw,
            LEFT - 5.0,
            LEFT - 8.0,
            y + 4.0
        );
        d += 1.0;
    }
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT:.1}" y="{TOP:.1}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{x_label}</text>"#,
        LEFT + pw / 2.0,
        HEIGHT - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">{y_label}</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );

    // Dots: ok first, so the rarer fail and info stay visible on top.
    let mut counts = [0usize; 3];
    for (pass, colour) in [(0usize, OK), (1, INFO), (2, FAIL)] {
        let _ = writeln!(s, r#"<g fill="{colour}" fill-opacity="0.7">"#);
        for (x, lat, outcome) in &dots {
            let which = match outcome {
                Outcome::Ok => 0,
                Outcome::Fail => 2,
                Outcome::Info | Outcome::Pending => 1,
            };
            if which != pass {
                continue;
            }
            if let Some(c) = counts.get_mut(which) {
                *c += 1;
            }
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="2"/>"#,
                sx(*x),
                sy(*lat)
            );
        }
        let _ = writeln!(s, "</g>");
    }

    // Legend.
    let lx = LEFT + pw + 20.0;
    let mut ly = TOP + 10.0;
    let [n_ok, n_info, n_fail] = counts;
    for (label, colour, n) in [
        ("ok", OK, n_ok),
        ("fail", FAIL, n_fail),
        ("info", INFO, n_info),
    ] {
        let _ = writeln!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="5" fill="{colour}"/><text x="{:.1}" y="{:.1}">{label} ({n})</text>"#,
            lx + 5.0,
            ly,
            lx + 16.0,
            ly + 4.0
        );
        ly += 20.0;
    }
    for name in &names {
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="10" height="10" fill="{}" fill-opacity="0.3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            ly - 5.0,
            colour_of(name),
            lx + 16.0,
            ly + 4.0,
            esc(name)
        );
        ly += 20.0;
    }
    if !points.is_empty() {
        let _ = writeln!(
            s,
            r##"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#555" stroke-dasharray="3,3"/><text x="{:.1}" y="{:.1}">other nemesis</text>"##,
            ly,
            lx + 10.0,
            ly,
            lx + 16.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}
