//! Pieces every long-running subcommand shares: a rayon pool of the requested size, a JSON
//! lines metrics writer, and the progress bar style.

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Runs `f` inside a rayon pool of `threads` threads (all cores when `None`).
pub fn with_threads<R: Send>(
    threads: Option<usize>,
    f: impl FnOnce() -> anyhow::Result<R> + Send,
) -> anyhow::Result<R> {
    match threads {
        None => f(),
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .context("cannot start the thread pool")?
            .install(f),
    }
}

/// Appends one JSON object per line to a metrics file, flushing each line so a crash loses
/// nothing already reported.
pub struct MetricsWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsWriter {
    /// Opens `path` for appending (a resumed run continues the same file), creating its folder.
    pub fn append(path: &Path) -> anyhow::Result<MetricsWriter> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open metrics file {}", path.display()))?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    pub fn write(&mut self, record: &serde_json::Value) -> anyhow::Result<()> {
        writeln!(self.out, "{record}")
            .and_then(|_| self.out.flush())
            .with_context(|| format!("cannot write metrics to {}", self.path.display()))
    }
}

/// A step counter with the figures that matter after the bar.
pub fn progress_bar(total: u64, done: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_position(done);
    bar
}
