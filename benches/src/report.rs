//! `benches/RESULTS.md` is made of sections, one per benchmark, each between
//! `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`. A run replaces only the
//! sections of the benchmarks it ran.

use std::{fmt::Write as _, path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

pub fn results_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("RESULTS.md")
}

/// What a reader needs to trust (or redo) a figure.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{cpu}, {cores} vCPU, Linux {kernel}")
}

pub fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// One benchmark's section.
pub struct Section {
    name: String,
    body: String,
}

impl Section {
    /// Starts a section with its heading, the command that reproduces it, the
    /// machine and the date.
    pub fn new(name: &str, title: &str) -> Self {
        let mut body = String::new();
        let _ = writeln!(body, "## {title}\n");
        let _ = writeln!(
            body,
            "Command: `cargo xtask bench -- --only {name}` · Machine: {} · Date: {}\n",
            machine(),
            today()
        );
        Self {
            name: name.into(),
            body,
        }
    }

    pub fn line(&mut self, s: impl AsRef<str>) -> &mut Self {
        self.body.push_str(s.as_ref());
        self.body.push('\n');
        self
    }

    /// A markdown table.
    pub fn table(&mut self, header: &[&str], rows: &[Vec<String>]) -> &mut Self {
        let _ = writeln!(self.body, "| {} |", header.join(" | "));
        let _ = writeln!(self.body, "|{}", "---|".repeat(header.len()));
        for r in rows {
            let _ = writeln!(self.body, "| {} |", r.join(" | "));
        }
        self.body.push('\n');
        self
    }

    /// Replaces this section in RESULTS.md (appending it if new) and prints it.
    pub fn write(&self) -> Result<()> {
        println!("{}", self.body);
        let path = results_path();
        let old = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            "# Benchmark results\n\nEach section is rewritten by the command it names; figures \
             are ratios to a baseline measured in the same run.\n"
                .into()
        });
        let start = format!("<!-- bench:{} -->", self.name);
        let end = format!("<!-- /bench:{} -->", self.name);
        let block = format!("{start}\n{}{end}", self.body);
        let new = match (old.find(&start), old.find(&end)) {
            (Some(s), Some(e)) if e > s => {
                format!("{}{block}{}", &old[..s], &old[e + end.len()..])
            }
            _ => format!("{}\n{block}\n", old.trim_end()),
        };
        std::fs::write(&path, new).with_context(|| format!("writing {}", path.display()))
    }
}

/// `x / base`, formatted for a table.
pub fn ratio(x: f64, base: f64) -> String {
    if base == 0.0 {
        "n/a".into()
    } else {
        format!("{:.2}", x / base)
    }
}
