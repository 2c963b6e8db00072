//! Pieces every long-running subcommand shares: a rayon pool of the requested size, a JSON
//! lines metrics writer, the progress bar style, and `--device` / `--precision`.

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use rlhf_model::{Gpt, Precision};
use rlhf_tensor::Device;
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

/// Parses `--device`: `cpu`, `cuda` (device 0) or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device, String> {
    let lower = s.to_ascii_lowercase();
    match lower.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => Ok(Device::Cuda(0)),
        _ => lower
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("unknown device {s:?}: expected cpu, cuda or cuda:N")),
    }
}

/// Parses `--precision`: `f32` or `bf16`.
pub fn parse_precision(s: &str) -> Result<Precision, String> {
    Precision::parse(s).map_err(|e| e.to_string())
}

/// Makes sure `device` can be used before any work starts: a CUDA device that is missing (no
/// driver library, no such ordinal) is an error naming the flag, never a panic.
pub fn open_device(device: Device) -> anyhow::Result<()> {
    if device == Device::Cpu {
        return Ok(());
    }
    rlhf_tensor::cuda::device(match device {
        Device::Cuda(n) => n,
        Device::Cpu => unreachable!("handled above"),
    })
    .with_context(|| format!("--device {device}: cannot use this GPU"))?;
    Ok(())
}

/// The compute precision for `device`: the one asked for, else f32 on the CPU and bf16 mixed
/// precision on a GPU. bf16 on the CPU is an error (its kernels compute in f32).
pub fn precision_for(device: Device, asked: Option<Precision>) -> anyhow::Result<Precision> {
    let p = asked.unwrap_or(match device {
        Device::Cpu => Precision::F32,
        Device::Cuda(_) => Precision::Bf16,
    });
    if p == Precision::Bf16 && device == Device::Cpu {
        anyhow::bail!("--precision bf16 needs --device cuda: the CPU kernels compute in f32");
    }
    Ok(p)
}

/// The device's name for reports: `cpu`, or the card's marketing name.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(n) => rlhf_tensor::cuda::device(n)
            .map(|d| d.name().to_string())
            .unwrap_or_else(|_| device.to_string()),
    }
}

/// Moves `model` to `device` and sets its precision (after [`open_device`]).
pub fn place_model(model: &mut Gpt, device: Device, precision: Precision) -> anyhow::Result<()> {
    model
        .to_device(device)
        .with_context(|| format!("moving the model to {device}"))?;
    model.set_precision(precision)?;
    Ok(())
}

/// `--device` and `--precision`, shared by the subcommands that run a model.
#[derive(clap::Args, Clone, Debug)]
pub struct DeviceArgs {
    /// Where the model runs: cpu, cuda (GPU 0) or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// Compute precision: f32, or bf16 (mixed precision: bf16 weights and activations in
    /// compute, f32 accumulation, f32 master weights and optimiser state; CUDA only).
    /// Default: f32 on the CPU, bf16 on a GPU.
    #[arg(long, value_parser = parse_precision)]
    pub precision: Option<Precision>,
}

impl DeviceArgs {
    /// Checks the device is there and returns the precision to use on it.
    pub fn open(&self) -> anyhow::Result<Precision> {
        let precision = precision_for(self.device, self.precision)?;
        open_device(self.device)?;
        Ok(precision)
    }
}
