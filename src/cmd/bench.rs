//! `rlhf bench …`: timed kernels with warm-up and a median over several runs.
//!
//! Every result states its unit and what was counted: GEMM counts 2·m·n·k flops per call (one
//! multiply and one add per term), the peak counts 2 flops per lane of each FMA executed.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use rlhf_tensor::cpu::gemm::{sgemm_with, MatMut, MatRef};
use rlhf_tensor::cpu::{self, peak::fma_peak_flops, Isa};
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// The engine's f32 GEMM, C = A·B with row-major A (m×k), B (k×n) and C (m×n).
    Gemm(GemmArgs),
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
    /// Element type; only f32 exists for now.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[command(flatten)]
    pub common: CommonArgs,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Gemm(args) => gemm(args),
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
fn median_seconds_per_rep(runs: usize, mut f: impl FnMut(u64)) -> f64 {
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

fn gemm(args: GemmArgs) -> anyhow::Result<()> {
    if !args.dtype.eq_ignore_ascii_case("f32") {
        bail!(
            "bench gemm: dtype {:?} is not supported; only f32 exists for now",
            args.dtype
        );
    }
    let (m, n, k) = (args.m, args.n, args.k);
    if m == 0 || n == 0 || k == 0 {
        bail!("bench gemm: m, n and k must be at least 1 (got {m}, {n}, {k})");
    }
    let s = setup(&args.common)?;
    // Deterministic values in [-1, 1): the timing does not depend on them, but denormals and
    // NaNs could, so avoid both.
    let fill = |len: usize, seed: u32| -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                let h = i
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed)
                    .rotate_left(13);
                (h >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    };
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
