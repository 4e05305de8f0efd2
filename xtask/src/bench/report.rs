//! Output of the benchmarks: Markdown tables, the marked sections of docs/benchmarks.md,
//! JSON files under bench-results/, the machine description and UTC timestamps.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::stats::Summary;
use crate::util;

/// A Markdown table under construction.
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Self {
        Self {
            header: header.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Add a row (missing cells are left empty, extra cells dropped).
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        let mut row: Vec<String> = cells.into_iter().map(Into::into).collect();
        row.resize(self.header.len(), String::new());
        self.rows.push(row);
    }

    /// GitHub-flavoured Markdown (pipes in cells escaped).
    pub fn render(&self) -> String {
        let esc = |c: &str| c.replace('|', "\\|");
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| {} |",
            self.header
                .iter()
                .map(|h| esc(h))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(out, "|{}", "---|".repeat(self.header.len()));
        for row in &self.rows {
            let _ = writeln!(
                out,
                "| {} |",
                row.iter().map(|c| esc(c)).collect::<Vec<_>>().join(" | ")
            );
        }
        out
    }
}

/// `median (min–max)` with `decimals` digits, e.g. `812 (790–845)`; `–` for none.
pub fn fmt_summary(s: Option<Summary>, decimals: usize) -> String {
    match s {
        None => "–".to_owned(),
        Some(s) if s.n == 1 => format!("{:.*}", decimals, s.median),
        Some(s) => format!(
            "{:.*} ({:.*}–{:.*})",
            decimals, s.median, decimals, s.min, decimals, s.max
        ),
    }
}

/// A ratio `a / b` as `1.23×`, or `–` when either is missing or b is zero.
pub fn fmt_ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 && a.is_finite() && b.is_finite() => {
            let r = a / b;
            if r >= 100.0 {
                format!("{r:.0}×")
            } else if r >= 10.0 {
                format!("{r:.1}×")
            } else {
                format!("{r:.2}×")
            }
        }
        _ => "–".to_owned(),
    }
}

/// The start and end markers of a scenario's section in docs/benchmarks.md.
pub fn markers(section: &str) -> (String, String) {
    (
        format!("<!-- bench:{section}:start -->"),
        format!("<!-- bench:{section}:end -->"),
    )
}

/// `doc` with the text between the markers of `section` replaced by `body`; when the
/// markers are missing, the section is appended at the end. A start marker without its end
/// marker (or in the wrong order) is an error, so nothing is silently eaten.
pub fn replace_section(doc: &str, section: &str, body: &str) -> Result<String> {
    let (start, end) = markers(section);
    let body = body.trim_matches('\n');
    match (doc.find(&start), doc.find(&end)) {
        (Some(s), Some(e)) if s < e => {
            let mut out = String::with_capacity(doc.len() + body.len());
            out.push_str(&doc[..s + start.len()]);
            out.push('\n');
            out.push_str(body);
            out.push('\n');
            out.push_str(&doc[e..]);
            Ok(out)
        }
        (None, None) => {
            let mut out = doc.trim_end_matches('\n').to_owned();
            if !out.is_empty() {
                out.push_str("\n\n");
            }
            let _ = write!(out, "{start}\n{body}\n{end}\n");
            Ok(out)
        }
        _ => anyhow::bail!(
            "the markers `{start}` and `{end}` are not both present, in that order; fix the \
             document by hand"
        ),
    }
}

/// Replace `section` of the Markdown file at `path` (created if missing).
pub fn update_doc(path: &Path, section: &str, body: &str) -> Result<()> {
    let doc = match fs::read_to_string(path) {
        Ok(doc) => doc,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    };
    let updated = replace_section(&doc, section, body)
        .with_context(|| format!("cannot update {}", path.display()))?;
    util::write_atomic(path, updated.as_bytes())
}

/// Write `value` as pretty JSON to `bench-results/<name>-<stamp>.json`; returns the path.
pub fn write_json(dir: &Path, name: &str, stamp: &str, value: &impl Serialize) -> Result<PathBuf> {
    let path = dir.join(format!("{name}-{stamp}.json"));
    let text = serde_json::to_string_pretty(value).context("cannot serialise the results")?;
    util::write_atomic(&path, text.as_bytes())?;
    Ok(path)
}

/// The machine the numbers come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPU model name from /proc/cpuinfo.
    pub cpu: String,
    /// Logical CPUs available to this process.
    pub cores: usize,
    /// Total memory in GiB (from /proc/meminfo).
    pub memory_gib: f64,
    /// `uname -sr`-like kernel string.
    pub os: String,
}

impl Machine {
    /// Read /proc (Linux); other systems get what std knows.
    pub fn detect() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let os = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|r| format!("{} {}", std::env::consts::OS, r.trim()))
            .unwrap_or_else(|_| std::env::consts::OS.to_owned());
        Self {
            cpu: cpu_model(&cpuinfo).unwrap_or_else(|| std::env::consts::ARCH.to_owned()),
            cores: std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(1),
            memory_gib: mem_total_kib(&meminfo).map_or(0.0, |k| k as f64 / 1024.0 / 1024.0),
            os,
        }
    }

    /// One line for the documents.
    pub fn describe(&self) -> String {
        format!(
            "{} cores ({}), {:.1} GiB RAM, {}",
            self.cores, self.cpu, self.memory_gib, self.os
        )
    }
}

/// The 1, 5 and 15-minute load averages (/proc/loadavg), as text.
pub fn load_average() -> Option<String> {
    let text = fs::read_to_string("/proc/loadavg").ok()?;
    let parts: Vec<&str> = text.split_whitespace().take(3).collect();
    (parts.len() == 3).then(|| parts.join(" / "))
}

/// The `model name` of /proc/cpuinfo.
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "model name").then(|| v.trim().to_owned())
    })
}

/// `MemTotal` of /proc/meminfo in KiB.
pub fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemTotal:")?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Now as (`2026-11-25T20:03:00Z`, `20261125-200300`).
pub fn now_stamps() -> (String, String) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_stamps(secs)
}

/// A Unix time as (`YYYY-MM-DDTHH:MM:SSZ`, `YYYYMMDD-HHMMSS`), UTC.
pub fn utc_stamps(secs: u64) -> (String, String) {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    (
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z"),
        format!("{y:04}{mo:02}{d:02}-{h:02}{m:02}{s:02}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_replaced_between_markers_only() -> Result<()> {
        let doc =
            "# T\n\nintro\n<!-- bench:ttft:start -->\nold\ntable\n<!-- bench:ttft:end -->\nafter\n";
        let out = replace_section(doc, "ttft", "new\n")?;
        assert_eq!(
            out,
            "# T\n\nintro\n<!-- bench:ttft:start -->\nnew\n<!-- bench:ttft:end -->\nafter\n"
        );
        // Idempotent, and other sections are untouched.
        assert_eq!(replace_section(&out, "ttft", "new")?, out);
        let two = format!("{out}<!-- bench:store:start -->\nx\n<!-- bench:store:end -->\n");
        let replaced = replace_section(&two, "store", "y")?;
        assert!(replaced.contains("<!-- bench:ttft:start -->\nnew\n"));
        assert!(replaced.contains("<!-- bench:store:start -->\ny\n<!-- bench:store:end -->"));
        Ok(())
    }

    #[test]
    fn missing_sections_are_appended_and_broken_markers_refused() -> Result<()> {
        assert_eq!(
            replace_section("# T\n", "agents", "body")?,
            "# T\n\n<!-- bench:agents:start -->\nbody\n<!-- bench:agents:end -->\n"
        );
        assert!(replace_section("<!-- bench:x:start -->\n", "x", "b").is_err());
        assert!(replace_section("<!-- bench:x:end --><!-- bench:x:start -->", "x", "b").is_err());
        Ok(())
    }

    #[test]
    fn tables_render_as_markdown() {
        let mut t = Table::new(["a", "b"]);
        t.row(["1", "x|y"]);
        t.row(["2"]);
        assert_eq!(
            t.render(),
            "| a | b |\n|---|---|\n| 1 | x\\|y |\n| 2 |  |\n"
        );
    }

    #[test]
    fn summaries_and_ratios_format() {
        let s = Summary::of(&[10.0, 12.0, 11.0]);
        assert_eq!(fmt_summary(s, 0), "11 (10–12)");
        assert_eq!(fmt_summary(Summary::of(&[1.5]), 1), "1.5");
        assert_eq!(fmt_summary(None, 1), "–");
        assert_eq!(fmt_ratio(Some(3.0), Some(2.0)), "1.50×");
        assert_eq!(fmt_ratio(Some(300.0), Some(2.0)), "150×");
        assert_eq!(fmt_ratio(Some(1.0), Some(0.0)), "–");
    }

    #[test]
    fn machine_fields_parse() {
        let cpu = "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t: x\n";
        assert_eq!(cpu_model(cpu).as_deref(), Some("AMD EPYC 9R14"));
        assert_eq!(
            mem_total_kib("MemTotal:       24573212 kB\nMemFree: 1 kB\n"),
            Some(24_573_212)
        );
        assert_eq!(cpu_model(""), None);
    }

    #[test]
    fn utc_stamps_match_known_dates() {
        assert_eq!(utc_stamps(0).0, "1970-01-01T00:00:00Z");
        assert_eq!(utc_stamps(951_782_400).0, "2000-02-29T00:00:00Z");
        let (iso, file) = utc_stamps(1_795_636_980);
        assert_eq!(iso, "2026-11-25T20:03:00Z");
        assert_eq!(file, "20261125-200300");
    }
}
