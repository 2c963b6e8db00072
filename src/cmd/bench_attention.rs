//! `rlhf bench attention`: the engine's fused causal attention (`Tensor::causal_attention`,
//! flash style: no T×T matrix is ever held) on q, k, v of shape [B, H, T, D], forward alone and
//! forward + backward, on the CPU or a GPU. One JSON line per pass with `--json`.
//!
//! FLOPs counted (the convention of tools/torch_gpu_bench.py, so the figures compare with
//! PyTorch's scaled_dot_product_attention): the forward is 2 matrix products (Q·Kᵀ and P·V) of
//! 2·T·T·D flops each per head, halved by the causal mask: 2·B·H·T²·D. The backward is 2.5
//! times that (five products: dV, dP, dS·K, dSᵀ·Q and the recomputed scores), so forward +
//! backward counts 3.5 × the forward. Work the kernels actually do beyond that (recomputation
//! of the softmax, the diagonal blocks' masked half) is not counted.
//!
//! `--dropout P` runs `Tensor::causal_attention_dropout` (dropout on the probabilities, fused
//! into the same kernels: the hashing is extra work on top of the same FLOP count), so the
//! cost of training-mode attention shows against the plain run.

use super::bench::{fill, median_seconds_per_rep};
use super::common::{device_name, open_device, parse_device, with_threads};
use anyhow::{bail, Context};
use clap::Args;
use rlhf_tensor::{no_grad, AttentionDropout, DType, Device, Parameter, Tensor};
use serde_json::json;

#[derive(Args)]
pub struct AttentionArgs {
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 12)]
    pub heads: usize,
    /// Sequence length T (queries and keys).
    #[arg(long, default_value_t = 1024)]
    pub seq: usize,
    /// Head dimension D.
    #[arg(long, default_value_t = 64)]
    pub head_dim: usize,
    /// f32 or bf16 (GPU only); default: f32 on the CPU, bf16 on a GPU.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Where to run: cpu, cuda (GPU 0) or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// Worker threads on the CPU (default: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed runs of each pass; the median is reported.
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
    /// Dropout probability on the attention probabilities (fused; 0: none).
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f32,
    #[arg(long)]
    pub json: bool,
}

/// One timed pass over an input set.
type Pass<'a> = &'a dyn Fn(&Inputs) -> anyhow::Result<()>;

/// One input set: q, k, v and an output gradient, all [B, H, T, D] on the device.
struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
}

pub fn run(args: AttentionArgs) -> anyhow::Result<()> {
    let (b, h, t, d) = (args.batch, args.heads, args.seq, args.head_dim);
    if b == 0 || h == 0 || t == 0 || d == 0 || args.runs == 0 {
        bail!("bench attention: --batch, --heads, --seq, --head-dim and --runs must be at least 1");
    }
    let drop = Some(
        AttentionDropout::new(args.dropout, 0x5eed)
            .with_context(|| format!("bench attention: --dropout {}", args.dropout))?,
    );
    let device = args.device;
    let dtype = match args
        .dtype
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None if device == Device::Cpu => DType::F32,
        None => DType::BF16,
        Some("f32") => DType::F32,
        Some("bf16") if device != Device::Cpu => DType::BF16,
        Some("bf16") => {
            bail!("bench attention: bf16 runs with --device cuda; the CPU computes in f32")
        }
        Some(other) => bail!("bench attention: dtype {other:?} is not supported (f32 or bf16)"),
    };
    if device != Device::Cpu && args.threads.is_some() {
        bail!("bench attention: --threads applies to the CPU only");
    }
    open_device(device)?;
    with_threads(args.threads, move || {
        let shape = [b, h, t, d];
        let n = shape.iter().product::<usize>();
        // Scaled so scores stay O(1) (softmax neither saturates nor flattens out).
        let upload = |seed: u32, scale: f32| -> anyhow::Result<Tensor> {
            Ok(Tensor::from_vec(fill(n, seed), &shape)?
                .mul_scalar(scale)?
                .to_dtype(dtype)?
                .to_device(device)?)
        };
        // On a GPU, three sets rotated (at the default size each set is 50 MB in bf16, about
        // the L2 of an H100); on the CPU one set (the caches are far smaller than one anyway).
        let n_sets = if device == Device::Cpu { 1 } else { 3 };
        let sets = (0..n_sets as u32)
            .map(|s| {
                Ok(Inputs {
                    q: upload(10 * s + 1, 2.0)?,
                    k: upload(10 * s + 2, 2.0)?,
                    v: upload(10 * s + 3, 1.0)?,
                    dout: upload(10 * s + 4, 1.0)?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let forward = |x: &Inputs| -> anyhow::Result<()> {
            no_grad(|| Tensor::causal_attention_dropout(&x.q, &x.k, &x.v, drop))?;
            Ok(())
        };
        let forward_backward = |x: &Inputs| -> anyhow::Result<()> {
            let (q, k, v) = (
                Parameter::new(x.q.clone()),
                Parameter::new(x.k.clone()),
                Parameter::new(x.v.clone()),
            );
            let out =
                Tensor::causal_attention_dropout(&q.tensor(), &k.tensor(), &v.tensor(), drop)?;
            out.backward_with(x.dout.clone())?;
            if q.grad().is_none() || k.grad().is_none() || v.grad().is_none() {
                bail!("bench attention: the backward produced no gradient");
            }
            Ok(())
        };
        let fwd_flops = 2.0 * (b * h) as f64 * (t as f64).powi(2) * d as f64;
        let passes: [(&str, Pass, f64); 2] = [
            ("fwd", &forward, fwd_flops),
            ("fwd_bwd", &forward_backward, 3.5 * fwd_flops),
        ];
        let card = device_name(device);
        for (pass, f, flops) in passes {
            // Once untimed, so an unsupported case is an error here rather than in the timing.
            f(&sets[0]).with_context(|| format!("bench attention ({pass})"))?;
            device.synchronize()?;
            let mut result = Ok(());
            let mut i = 0usize;
            let secs = median_seconds_per_rep(args.runs, |reps| {
                for _ in 0..reps {
                    if let Err(e) = f(&sets[i % sets.len()]) {
                        result = Err(e);
                    }
                    i += 1;
                }
                if let Err(e) = device.synchronize() {
                    result = Err(e.into());
                }
            });
            result.with_context(|| format!("bench attention ({pass})"))?;
            let tflops = flops / secs / 1e12;
            let threads = (device == Device::Cpu).then(rayon::current_num_threads);
            if args.json {
                println!(
                    "{}",
                    json!({"op": "attention", "pass": pass, "causal": true, "batch": b,
                           "heads": h, "seq": t, "head_dim": d, "dtype": dtype.to_string(),
                           // As written (0.1, not the f32's 0.10000000149…).
                           "dropout": args.dropout.to_string().parse::<f64>().unwrap_or(f64::NAN),
                           "device": device.to_string(), "card": card, "threads": threads,
                           "ms": secs * 1e3, "tflops": tflops})
                );
            } else {
                println!(
                    "attention {pass} causal B={b} H={h} T={t} D={d} {dtype} dropout {} on {device} \
                     ({card}{}): {:.3} ms, {tflops:.2} TFLOP/s (2·B·H·T²·D flops forward, \
                     3.5× that forward + backward; median of {})",
                    args.dropout,
                    threads
                        .map(|n| format!(", {n} threads"))
                        .unwrap_or_default(),
                    secs * 1e3,
                    args.runs
                );
            }
        }
        Ok(())
    })
}
