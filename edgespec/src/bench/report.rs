//! Results: the JSON document, the markdown table and the PNG plots (via `bench/plot.py`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

/// One measured run of one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    /// 1-based run number.
    pub run: usize,
    /// When it started.
    pub started_unix_s: f64,
    /// 1-minute load average when it started (a loaded machine shows here).
    pub loadavg: f64,
    /// Aggregate numbers of the run (tokens_per_s, forwards_per_token, acceptance, ...).
    pub metrics: BTreeMap<String, f64>,
    /// Raw per-request / per-stream numbers.
    pub detail: Value,
}

/// One configuration (a series at one x) with all its runs.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigResult {
    /// Unique name, e.g. `rtt=50ms adaptive+pipelined`.
    pub name: String,
    /// Series (variant) name, e.g. `adaptive+pipelined`.
    pub series: String,
    /// Position on the scenario's x axis (RTT in ms, streams, or 0).
    pub x: f64,
    /// What was configured.
    pub params: Value,
    /// Every run.
    pub runs: Vec<RunRecord>,
    /// Median of every metric over the runs.
    pub median: BTreeMap<String, f64>,
    /// Ratios against the baseline measured in the same invocation (keys say against what).
    pub ratios: BTreeMap<String, f64>,
}

/// A headline result, with the target where it has one.
#[derive(Debug, Clone, Serialize)]
pub struct SummaryLine {
    /// What is compared.
    pub what: String,
    /// The measured value (a ratio unless said otherwise).
    pub value: Option<f64>,
    /// The target, in words.
    pub target: Option<String>,
    /// Whether the target is met.
    pub pass: Option<bool>,
}

/// A table column: a key of `median` or (prefixed `ratio:`) of `ratios`.
#[derive(Debug, Clone, Serialize)]
pub struct Column {
    /// `median` key, or `ratio:<key>`.
    pub key: String,
    /// Header text.
    pub header: String,
    /// Decimal places.
    pub digits: usize,
}

/// A plot `bench/plot.py` draws: the median `metric` of every series against x (bars when the
/// scenario has a single x), with min–max whiskers over the runs.
#[derive(Debug, Clone, Serialize)]
pub struct PlotSpec {
    /// PNG file name (in the output directory).
    pub file: String,
    /// `median` key (or `ratio:<key>`).
    pub metric: String,
    /// Y axis label.
    pub ylabel: String,
    /// Title.
    pub title: String,
}

/// The whole result of one `edgespec bench` invocation.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// When the report was written.
    pub created_unix_s: f64,
    /// Machine facts.
    pub host: Value,
    /// Invocation parameters.
    pub params: Value,
    /// Meaning of `x` (empty: no x axis).
    pub x_label: String,
    /// Series the ratios are taken against.
    pub baseline: String,
    /// Every configuration.
    pub configs: Vec<ConfigResult>,
    /// Headline comparisons.
    pub summary: Vec<SummaryLine>,
    /// Table layout.
    pub columns: Vec<Column>,
    /// Plots to draw.
    pub plots: Vec<PlotSpec>,
    /// Caveats (method, what a number means).
    pub notes: Vec<String>,
}

impl Column {
    pub(crate) fn new(key: &str, header: &str, digits: usize) -> Self {
        Self {
            key: key.into(),
            header: header.into(),
            digits,
        }
    }
}

impl PlotSpec {
    pub(crate) fn new(file: &str, metric: &str, ylabel: &str, title: &str) -> Self {
        Self {
            file: file.into(),
            metric: metric.into(),
            ylabel: ylabel.into(),
            title: title.into(),
        }
    }
}

impl ConfigResult {
    /// A metric by column key (`ratio:` prefix reads `ratios`).
    pub fn value(&self, key: &str) -> Option<f64> {
        match key.strip_prefix("ratio:") {
            Some(k) => self.ratios.get(k).copied(),
            None => self.median.get(key).copied(),
        }
    }
}

impl SummaryLine {
    pub(crate) fn ratio(what: String, value: Option<f64>, target: Option<f64>) -> Self {
        Self {
            what,
            value,
            target: target.map(|t| format!("≥ {t:.2}")),
            pass: match (value, target) {
                (Some(v), Some(t)) => Some(v >= t),
                _ => None,
            },
        }
    }
}

impl Report {
    /// The markdown table (one row per configuration, medians over runs) and the summary.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let runs = self.configs.iter().map(|c| c.runs.len()).max().unwrap_or(0);
        let _ = writeln!(
            s,
            "### {} — medians of {} run(s); baseline: {}\n",
            self.scenario, runs, self.baseline
        );
        let mut header = String::from("| config |");
        let mut rule = String::from("|---|");
        if !self.x_label.is_empty() {
            let _ = write!(header, " {} |", self.x_label);
            rule.push_str("---:|");
        }
        for c in &self.columns {
            let _ = write!(header, " {} |", c.header);
            rule.push_str("---:|");
        }
        let _ = writeln!(s, "{header}\n{rule}");
        for cfg in &self.configs {
            let mut row = format!("| {} |", cfg.series);
            if !self.x_label.is_empty() {
                let _ = write!(row, " {} |", cfg.x);
            }
            for c in &self.columns {
                match cfg.value(&c.key) {
                    Some(v) => {
                        let _ = write!(row, " {:.*} |", c.digits, v);
                    }
                    None => row.push_str(" – |"),
                }
            }
            let _ = writeln!(s, "{row}");
        }
        if !self.summary.is_empty() {
            let _ = writeln!(
                s,
                "\n| comparison | value | target | met |\n|---|---:|---|---|"
            );
            for l in &self.summary {
                let v = l.value.map_or("–".to_string(), |v| format!("{v:.2}"));
                let t = l.target.clone().unwrap_or_else(|| "–".into());
                let p = match l.pass {
                    Some(true) => "yes",
                    Some(false) => "NO",
                    None => "–",
                };
                let _ = writeln!(s, "| {} | {v} | {t} | {p} |", l.what);
            }
        }
        if !self.notes.is_empty() {
            s.push('\n');
        }
        for n in &self.notes {
            let _ = writeln!(s, "- {n}");
        }
        s
    }
}

/// Writes `<out>/<scenario>[-tag].json` and `.md`, and the plots; returns the files written.
pub(crate) fn write(
    report: &Report,
    out: &Path,
    tag: Option<&str>,
    plots: bool,
) -> Result<Vec<PathBuf>> {
    let stem = match tag {
        Some(t) if !t.is_empty() => format!("{}-{t}", report.scenario),
        _ => report.scenario.clone(),
    };
    let json = out.join(format!("{stem}.json"));
    let md = out.join(format!("{stem}.md"));
    std::fs::write(&json, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    std::fs::write(&md, report.markdown()).with_context(|| format!("writing {}", md.display()))?;
    let mut files = vec![json.clone(), md];
    if plots {
        match draw_plots(&json, out, &stem) {
            Ok(mut pngs) => files.append(&mut pngs),
            Err(e) => eprintln!("warning: no plots ({e:#}); the JSON and table are complete"),
        }
    }
    Ok(files)
}

/// Where matplotlib is installed for the plots when the system Python lacks it.
fn pytools_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache/edgespec/pytools/matplotlib")
}

fn python_has_matplotlib(pythonpath: &str) -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import matplotlib"])
        .env("PYTHONPATH", pythonpath)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn draw_plots(json: &Path, out: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let script = super::plot_script().context("bench/plot.py not found")?;
    let tools = pytools_dir();
    let mut pythonpath = tools.display().to_string();
    if let Some(p) = std::env::var_os("PYTHONPATH") {
        pythonpath = format!("{pythonpath}:{}", p.to_string_lossy());
    }
    if !python_has_matplotlib(&pythonpath) {
        eprintln!("installing matplotlib into {} ...", tools.display());
        let st = std::process::Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--target"])
            .arg(&tools)
            .arg("matplotlib")
            .status()
            .context("running python3 -m pip")?;
        if !st.success() || !python_has_matplotlib(&pythonpath) {
            anyhow::bail!("matplotlib is not available");
        }
    }
    let output = std::process::Command::new("python3")
        .arg(&script)
        .arg(json)
        .arg(out)
        .arg(stem)
        .env("PYTHONPATH", &pythonpath)
        .env("MPLBACKEND", "Agg")
        .output()
        .context("running bench/plot.py")?;
    if !output.status.success() {
        anyhow::bail!(
            "plot.py failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.ends_with(".png"))
        .map(PathBuf::from)
        .collect())
}
