//! `rlhf bench …`: timed kernels with warm-up and a median over several runs.
//!
//! Every result states its unit and what was counted: GEMM counts 2·m·n·k flops per call (one
//! multiply and one add per term), the peak counts 2 flops per lane of each FMA executed.
//!
//! With `--device cuda` a timed run ends with a stream synchronisation (GPU work is
//! asynchronous: without it the host clock would measure launches), and inputs rotate among
//! several sets so repeated runs do not read them from the L2 cache.

use super::common::parse_device;
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use rlhf_tensor::cpu::gemm::{sgemm_with, MatMut, MatRef};
use rlhf_tensor::cpu::{self, peak::fma_peak_flops, Isa};
use rlhf_tensor::{DType, Device, Tensor};
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// The engine's GEMM, C = A·B with row-major A (m×k), B (k×n) and C (m×n): f32 on the CPU;
    /// f32 or bf16 (f32 accumulation, bf16 output) on a GPU.
    Gemm(GemmArgs),
    /// Fused causal attention (flash style), forward and forward + backward, on [B, H, T, D].
    Attention(super::bench_attention::AttentionArgs),
    /// This machine's f32 FMA peak: one register-resident FMA loop per thread, all at once.
    Peak(CommonArgs),
    /// One GPT training step (forward, backward, AdamW) on random tokens.
    TrainStep(super::bench_model::TrainStepArgs),
    /// Decoding speed with the KV cache and, for comparison, by recomputing every step.
    Generate(super::bench_model::GenerateBenchArgs),
}

/// Options every kernel benchmark shares.
#[derive(Args, Clone)]
pub struct CommonArgs {
    /// Worker threads (a rayon pool of this size); default: one per CPU.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Instruction set: scalar, avx2 or avx512; default: the best this CPU has (or RLHF_CPU_ISA).
    #[arg(long)]
    pub isa: Option<String>,
    /// Timed runs; the median is reported.
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
    /// Print one JSON object per line instead of a readable line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct GemmArgs {
    #[arg(long)]
    pub m: usize,
    #[arg(long)]
    pub n: usize,
    #[arg(long)]
    pub k: usize,
    /// Element type: f32 (CPU and GPU) or bf16 (GPU only: the CPU computes in f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Where to run: cpu, cuda (GPU 0) or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// GPU kernel family: auto (the one designed to be fastest that takes the operands), tma
    /// (TMA-fed wgmma, Hopper only), wgmma (cp.async-fed wgmma, Hopper only), mma (mma.sync
    /// tensor cores) or simt. GPU only. Default: the process default, RLHF_GEMM_KERNEL if set,
    /// else auto.
    #[arg(long)]
    pub kernel: Option<String>,
    /// Block-tile width of the wgmma kernels: auto (per product), 128 or 256. GPU only.
    #[arg(long, default_value = "auto")]
    pub tile_n: String,
    #[command(flatten)]
    pub common: CommonArgs,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Gemm(args) => gemm(args),
        BenchCommand::Attention(args) => super::bench_attention::run(args),
        BenchCommand::Peak(args) => peak(args),
        BenchCommand::TrainStep(args) => super::bench_model::train_step(args),
        BenchCommand::Generate(args) => super::bench_model::generate_bench(args),
    }
}

/// The pool, ISA and thread count a benchmark runs with.
struct Setup {
    pool: rayon::ThreadPool,
    isa: Isa,
    threads: usize,
}

fn setup(args: &CommonArgs) -> anyhow::Result<Setup> {
    let isa = match &args.isa {
        None => cpu::isa(),
        Some(name) => {
            let isa = Isa::parse(name)
                .with_context(|| format!("--isa {name}: expected scalar, avx2 or avx512"))?;
            if !isa.is_available() {
                bail!("--isa {name}: this CPU does not support {isa:?}");
            }
            isa
        }
    };
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(t) = args.threads {
        builder = builder.num_threads(t);
    }
    let pool = builder.build().context("building the thread pool")?;
    let threads = pool.current_num_threads();
    Ok(Setup { pool, isa, threads })
}

/// Shortest time one timed run should last, so that timer resolution and one-off noise vanish.
const MIN_RUN: Duration = Duration::from_millis(50);
/// Warm-up before timing: caches, page faults, CPU frequency.
const WARM_UP: Duration = Duration::from_millis(200);

/// Calls `f` (which does `reps` repetitions per call and returns an amount of work) until warm,
/// then times `runs` runs, each long enough, and returns the median seconds per repetition.
pub(super) fn median_seconds_per_rep(runs: usize, mut f: impl FnMut(u64)) -> f64 {
    // Warm up, and learn how many repetitions make one run last at least MIN_RUN.
    let mut reps = 1u64;
    let start = Instant::now();
    loop {
        let t = Instant::now();
        f(reps);
        let took = t.elapsed();
        if took >= MIN_RUN && start.elapsed() >= WARM_UP {
            break;
        }
        if took < MIN_RUN {
            reps = reps.saturating_mul(2);
        }
    }
    let mut secs: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f(reps);
            t.elapsed().as_secs_f64() / reps as f64
        })
        .collect();
    secs.sort_by(f64::total_cmp);
    secs[secs.len() / 2]
}

/// Deterministic values in [-1, 1): the timing does not depend on them, but denormals, NaNs
/// and zeros could (METHOD.md saw a GPU GEMM run faster on zeros), so avoid all three.
pub(super) fn fill(len: usize, seed: u32) -> Vec<f32> {
    (0..len as u32)
        .map(|i| {
            let h = i
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed)
                .rotate_left(13);
            (h >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

fn gemm(args: GemmArgs) -> anyhow::Result<()> {
    let (m, n, k) = (args.m, args.n, args.k);
    if m == 0 || n == 0 || k == 0 {
        bail!("bench gemm: m, n and k must be at least 1 (got {m}, {n}, {k})");
    }
    let kernel: Option<rlhf_tensor::cuda::GemmKernel> =
        args.kernel.as_deref().map(str::parse).transpose()?;
    let tile_n = match args.tile_n.as_str() {
        "auto" => None,
        t => match t.parse::<usize>() {
            Ok(v) if rlhf_tensor::cuda::WGMMA_TILE_NS.contains(&v) => Some(v),
            _ => bail!("bench gemm: --tile-n {t:?}: expected auto, 128 or 256"),
        },
    };
    if let Device::Cuda(_) = args.device {
        let run = || rlhf_tensor::cuda::with_gemm_tile_n(tile_n, || gemm_cuda(&args));
        return match kernel {
            Some(k) => rlhf_tensor::cuda::with_gemm_kernel(k, run),
            None => run(),
        };
    }
    if kernel.is_some_and(|k| k != rlhf_tensor::cuda::GemmKernel::Auto) || tile_n.is_some() {
        bail!("bench gemm: --kernel and --tile-n apply to --device cuda only");
    }
    if !args.dtype.eq_ignore_ascii_case("f32") {
        bail!(
            "bench gemm: dtype {:?} is not supported on the CPU, which computes in f32 \
             (bf16 GEMM runs with --device cuda)",
            args.dtype
        );
    }
    let s = setup(&args.common)?;
    let a = fill(m * k, 1);
    let b = fill(k * n, 2);
    let mut c = vec![0.0f32; m * n];
    let mut result = Ok(());
    let secs = s.pool.install(|| {
        median_seconds_per_rep(args.common.runs, |reps| {
            for _ in 0..reps {
                let r = sgemm_with(
                    s.isa,
                    1.0,
                    MatRef::row_major(&a, m, k),
                    MatRef::row_major(&b, k, n),
                    0.0,
                    MatMut::row_major(&mut c, m, n),
                );
                if let Err(e) = r {
                    result = Err(e);
                }
            }
        })
    });
    result.context("bench gemm")?;
    std::hint::black_box(&c);
    let gflops = 2.0 * m as f64 * n as f64 * k as f64 / secs / 1e9;
    if args.common.json {
        let line = serde_json::json!({
            "op": "gemm", "m": m, "n": n, "k": k, "dtype": "f32", "threads": s.threads,
            "isa": format!("{:?}", s.isa).to_lowercase(), "seconds": secs, "gflops": gflops,
        });
        println!("{line}");
    } else {
        println!(
            "gemm f32 m={m} n={n} k={k} threads={} isa={:?}: {:.3} ms per call, {gflops:.1} GFLOP/s \
             (2·m·n·k flops, median of {} runs)",
            s.threads,
            s.isa,
            secs * 1e3,
            args.common.runs
        );
    }
    Ok(())
}

/// The GEMM on a GPU through the Tensor API (`matmul`, the engine's own kernels): the same
/// call a model's linear layer makes, output allocation included.
fn gemm_cuda(args: &GemmArgs) -> anyhow::Result<()> {
    let device = args.device;
    let dtype = match args.dtype.to_ascii_lowercase().as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => bail!("bench gemm: dtype {other:?} is not supported on a GPU (f32 or bf16)"),
    };
    if args.common.threads.is_some() || args.common.isa.is_some() {
        bail!("bench gemm: --threads and --isa apply to the CPU only");
    }
    if args.common.runs == 0 {
        bail!("--runs must be at least 1");
    }
    super::common::open_device(device)?;
    let (m, n, k) = (args.m, args.n, args.k);
    // Three input pairs, rotated: at 4096³ in bf16 they hold 192 MiB, far more than the L2.
    let upload = |len: usize, seed: u32, shape: &[usize]| -> anyhow::Result<Tensor> {
        Ok(Tensor::from_vec(fill(len, seed), shape)?
            .to_dtype(dtype)?
            .to_device(device)?)
    };
    let sets = (0..3u32)
        .map(|s| {
            Ok((
                upload(m * k, 1 + 2 * s, &[m, k])?,
                upload(k * n, 2 + 2 * s, &[k, n])?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // One product first, so an unsupported case is an error here rather than inside the timing.
    sets[0].0.matmul(&sets[0].1).context("bench gemm")?;
    device.synchronize()?;
    let mut result = Ok(());
    let mut i = 0usize;
    let secs = median_seconds_per_rep(args.common.runs, |reps| {
        for _ in 0..reps {
            let (a, b) = &sets[i % sets.len()];
            i += 1;
            if let Err(e) = a.matmul(b) {
                result = Err(e);
            }
        }
        if let Err(e) = device.synchronize() {
            result = Err(e);
        }
    });
    result.context("bench gemm")?;
    let gflops = 2.0 * m as f64 * n as f64 * k as f64 / secs / 1e9;
    let card = super::common::device_name(device);
    let name = format!("{dtype}");
    // The family in force: --kernel, else RLHF_GEMM_KERNEL, else auto.
    let kernel = rlhf_tensor::cuda::gemm_kernel()?.name();
    if args.common.json {
        let line = serde_json::json!({
            "op": "gemm", "m": m, "n": n, "k": k, "dtype": name, "device": device.to_string(),
            "card": card, "kernel": kernel, "tile_n": args.tile_n, "seconds": secs,
            "gflops": gflops,
        });
        println!("{line}");
    } else {
        println!(
            "gemm {name} m={m} n={n} k={k} on {device} ({card}), kernel {}: {:.3} ms per call, \
             {:.1} TFLOP/s (2·m·n·k flops, f32 accumulation, median of {} runs)",
            kernel,
            secs * 1e3,
            gflops / 1e3,
            args.common.runs
        );
    }
    Ok(())
}

fn peak(args: CommonArgs) -> anyhow::Result<()> {
    let s = setup(&args)?;
    // Each repetition: every pool thread runs this many FMA rounds at once.
    const ITERS: u64 = 100_000;
    let mut flops_per_rep = 0.0;
    let secs = median_seconds_per_rep(args.runs, |reps| {
        let flops: f64 = s
            .pool
            .broadcast(|_| fma_peak_flops(s.isa, ITERS * reps))
            .into_iter()
            .sum();
        flops_per_rep = flops / reps as f64;
    });
    let gflops = flops_per_rep / secs / 1e9;
    if args.json {
        let line = serde_json::json!({
            "op": "peak", "threads": s.threads,
            "isa": format!("{:?}", s.isa).to_lowercase(), "gflops": gflops,
        });
        println!("{line}");
    } else {
        println!(
            "peak f32 threads={} isa={:?}: {gflops:.1} GFLOP/s (2 flops per FMA lane, all threads \
             at once, median of {} runs)",
            s.threads, s.isa, args.runs
        );
    }
    Ok(())
}
