//! `rlhf bench train-step` and `rlhf bench generate`: whole-model timings on random tokens
//! (warm-up, then the median of several runs), for comparison with tools/torch_train_step.py
//! in the same run (on the CPU, or on the same GPU with `--device cuda`).
//!
//! On a GPU each timed step ends with a stream synchronisation, so a step's time includes all
//! of its kernels (the optimiser's last launches too), and the model computes in bf16 mixed
//! precision unless `--precision f32` is given.

use super::common::{device_name, place_model, with_threads, DeviceArgs};
use anyhow::{bail, Context};
use clap::Args;
use rlhf_model::generate::{generate, SamplingConfig};
use rlhf_model::train::{LmBatch, TrainConfig, Trainer};
use rlhf_model::{Gpt, GptConfig, Precision};
use rlhf_tensor::{no_grad, Device, Rng, Tensor};
use serde_json::json;
use std::time::Instant;

#[derive(Args)]
pub struct TrainStepArgs {
    /// Model preset or config.json.
    #[arg(long, default_value = "small-cpu")]
    pub preset: String,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence (default: the model's context).
    #[arg(long)]
    pub seq: Option<usize>,
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed steps (after 2 warm-up steps); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Set every dropout probability of the model to this (the PyTorch reference scripts train
    /// without dropout); default: the preset's.
    #[arg(long)]
    pub dropout: Option<f32>,
    /// After the timed steps, one more step with every kernel launch timed by device events
    /// (GPU only): time per kernel entry point, against the step's wall time.
    #[arg(long)]
    pub profile: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args)]
pub struct GenerateBenchArgs {
    #[arg(long, default_value = "small-cpu")]
    pub preset: String,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// New tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub tokens: usize,
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed runs of each method; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn random_ids(rng: &mut Rng, vocab: usize, rows: usize, cols: usize) -> anyhow::Result<Tensor> {
    let ids: Vec<i64> = (0..rows * cols)
        .map(|_| rng.below(vocab as u64) as i64)
        .collect();
    Ok(Tensor::from_vec(ids, &[rows, cols])?)
}

/// One forward, backward and AdamW step per timed run.
pub fn train_step(args: TrainStepArgs) -> anyhow::Result<()> {
    if args.runs == 0 || args.batch == 0 {
        bail!("--runs and --batch must be at least 1");
    }
    if let Some(p) = args.dropout {
        if !(0.0..1.0).contains(&p) {
            bail!("--dropout {p} must be in [0, 1)");
        }
    }
    let device = args.device.device;
    if device != Device::Cpu && args.threads.is_some() {
        bail!("--threads applies to the CPU only");
    }
    if device == Device::Cpu && args.profile {
        bail!("--profile times GPU kernels: it needs --device cuda");
    }
    let precision = args.device.open()?;
    let threads = args.threads;
    with_threads(threads, move || {
        let mut config = GptConfig::from_preset_or_file(&args.preset)?;
        if let Some(p) = args.dropout {
            (config.embd_pdrop, config.attn_pdrop, config.resid_pdrop) = (p, p, p);
        }
        let seq = args.seq.unwrap_or(config.n_positions);
        if seq < 2 || seq > config.n_positions {
            bail!("--seq {seq} must be in 2..={}", config.n_positions);
        }
        let params = config.num_parameters();
        let mut model = Gpt::new(config.clone(), 0)?;
        place_model(&mut model, device, precision)?;
        let mut trainer =
            Trainer::new(model.named_parameters(), TrainConfig::new(3e-4, 0, 1000, 0));
        let mut rng = Rng::new(1);
        let batch = LmBatch::new(
            random_ids(&mut rng, config.vocab_size, args.batch, seq)?,
            None,
        );
        let mut times = Vec::with_capacity(args.runs);
        let mut losses = Vec::with_capacity(args.runs + 2);
        device.synchronize()?;
        for i in 0..args.runs + 2 {
            let t = Instant::now();
            let stats = trainer.train_step(&model, std::slice::from_ref(&batch))?;
            device.synchronize()?;
            if i >= 2 {
                times.push(t.elapsed().as_secs_f64());
            }
            losses.push(stats.loss);
        }
        let secs = median(times);
        let profile = args
            .profile
            .then(|| {
                profile_step(device, || {
                    trainer.train_step(&model, std::slice::from_ref(&batch))?;
                    Ok(())
                })
            })
            .transpose()?;
        let tokens_per_s = (args.batch * seq) as f64 / secs;
        let threads = rayon::current_num_threads();
        let card = device_name(device);
        if args.json {
            let mut line = json!({"op": "train_step", "impl": "rlhf", "preset": args.preset,
                   "batch": args.batch, "seq": seq, "threads": threads,
                   "tokens_per_s": tokens_per_s, "ms_per_step": secs * 1e3, "params": params,
                   "device": device.to_string(), "card": card,
                   "precision": precision.to_string(),
                   "loss_first": losses[0], "loss_last": losses[losses.len() - 1]});
            if let Some(p) = &profile {
                line["profile"] = p.to_json();
            }
            println!("{line}");
        } else {
            if let Some(p) = &profile {
                p.print(25);
            }
            let place = match device {
                Device::Cpu => format!("{threads} threads"),
                d => format!("{d} ({card}), {precision}"),
            };
            println!(
                "train step {} ({params} parameters) batch {} × seq {seq}, {place}: \
                 {:.1} ms per step, {tokens_per_s:.0} tokens/s (median of {}; loss {:.4} → {:.4})",
                args.preset,
                args.batch,
                secs * 1e3,
                args.runs,
                losses[0],
                losses[losses.len() - 1]
            );
        }
        Ok(())
    })
}

/// One profiled run of `step` on a GPU: its wall time and each kernel entry point's launches
/// and device time (rlhf_tensor::cuda::profile).
struct StepProfile {
    wall_ms: f64,
    kernels: Vec<rlhf_tensor::cuda::profile::KernelTime>,
}

impl StepProfile {
    fn kernel_ms(&self) -> f64 {
        self.kernels.iter().map(|k| k.ms).sum()
    }

    fn to_json(&self) -> serde_json::Value {
        json!({"wall_ms": self.wall_ms, "kernel_ms": self.kernel_ms(),
               "kernels": self.kernels.iter()
                   .map(|k| json!({"entry": k.entry, "calls": k.calls, "ms": k.ms}))
                   .collect::<Vec<_>>()})
    }

    /// The `top` entry points by time, then the rest summed, and the kernels' total against
    /// the wall time (the difference: launch gaps and host work the device waited for).
    fn print(&self, top: usize) {
        let total = self.kernel_ms();
        let launches: u64 = self.kernels.iter().map(|k| k.calls).sum();
        println!(
            "profiled step: {:.2} ms wall, {total:.2} ms in {launches} kernel launches \
             ({} entry points; device events around each launch)",
            self.wall_ms,
            self.kernels.len()
        );
        println!("{:>9} {:>6} {:>7}  entry point", "ms", "calls", "share");
        for k in self.kernels.iter().take(top) {
            println!(
                "{:>9.3} {:>6} {:>6.1}%  {}",
                k.ms,
                k.calls,
                100.0 * k.ms / total.max(f64::MIN_POSITIVE),
                k.entry
            );
        }
        let rest = &self.kernels[top.min(self.kernels.len())..];
        if !rest.is_empty() {
            let ms: f64 = rest.iter().map(|k| k.ms).sum();
            let calls: u64 = rest.iter().map(|k| k.calls).sum();
            println!(
                "{ms:>9.3} {calls:>6} {:>6.1}%  ({} more entry points)",
                100.0 * ms / total.max(f64::MIN_POSITIVE),
                rest.len()
            );
        }
    }
}

fn profile_step(
    device: Device,
    step: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<StepProfile> {
    use rlhf_tensor::cuda::profile;
    device.synchronize()?;
    profile::start();
    let t = Instant::now();
    let ran = step().and_then(|()| Ok(device.synchronize()?));
    let wall_ms = t.elapsed().as_secs_f64() * 1e3;
    // Stop even when the step failed, so that profiling never stays on.
    let kernels = profile::stop();
    ran?;
    Ok(StepProfile {
        wall_ms,
        kernels: kernels?,
    })
}

/// Greedy decoding of `tokens` new tokens after a one-token prompt, with the KV cache and by
/// recomputing the whole sequence for every token.
///
/// On a GPU each timed run ends with a stream synchronisation, and one untimed two-token run of
/// each method comes first (it loads the kernel modules, which the CPU does not need). Both
/// methods must choose the same greedy tokens, or the comparison means nothing: a difference is
/// an error, except under bf16 mixed precision, where the two methods' different shapes round
/// differently and a near-tie among a random model's logits may go either way; there the
/// difference is reported (`same_tokens: false`, a note on stderr) and the timings still are.
pub fn generate_bench(args: GenerateBenchArgs) -> anyhow::Result<()> {
    if args.runs == 0 || args.batch == 0 || args.tokens == 0 {
        bail!("--runs, --batch and --tokens must be at least 1");
    }
    let device = args.device.device;
    if device != Device::Cpu && args.threads.is_some() {
        bail!("--threads applies to the CPU only");
    }
    let precision = args.device.open()?;
    let threads = args.threads;
    with_threads(threads, move || {
        let config = GptConfig::from_preset_or_file(&args.preset)?;
        if args.tokens + 1 > config.n_positions {
            bail!(
                "--tokens {} does not fit the context of {}",
                args.tokens,
                config.n_positions
            );
        }
        let mut model = Gpt::new(config.clone(), 0)?;
        place_model(&mut model, device, precision)?;
        let prompts: Vec<Vec<u32>> = (0..args.batch).map(|i| vec![(i % 200) as u32]).collect();
        let cfg = SamplingConfig {
            max_new_tokens: args.tokens,
            greedy: true,
            ..Default::default()
        };
        // Without the cache: a full forward over the whole sequence for every new token.
        let recompute_run = |tokens: usize| -> anyhow::Result<Vec<Vec<i64>>> {
            let mut seqs: Vec<Vec<i64>> = prompts
                .iter()
                .map(|p| p.iter().map(|&x| i64::from(x)).collect())
                .collect();
            no_grad(|| -> anyhow::Result<()> {
                for _ in 0..tokens {
                    let len = seqs[0].len();
                    let flat: Vec<i64> = seqs.iter().flatten().copied().collect();
                    let logits =
                        model.logits(&Tensor::from_vec(flat, &[args.batch, len])?, None)?;
                    let last = logits
                        .narrow(1, len - 1, 1)?
                        .argmax(-1, false)?
                        .to_i64_vec()?;
                    for (s, &t) in seqs.iter_mut().zip(&last) {
                        s.push(t);
                    }
                }
                Ok(())
            })?;
            Ok(seqs)
        };
        if device != Device::Cpu {
            let warm = SamplingConfig {
                max_new_tokens: 2.min(args.tokens),
                ..cfg.clone()
            };
            generate(&model, &prompts, &warm)?;
            recompute_run(2.min(args.tokens))?;
            device.synchronize()?;
        }
        let mut cached = Vec::new();
        let mut cached_out = Vec::new();
        for _ in 0..args.runs {
            let t = Instant::now();
            let g = generate(&model, &prompts, &cfg)?;
            device.synchronize()?;
            cached.push(t.elapsed().as_secs_f64());
            cached_out = g.responses;
        }
        let mut recompute = Vec::new();
        let mut recompute_out = Vec::new();
        for _ in 0..args.runs {
            let t = Instant::now();
            let seqs = recompute_run(args.tokens)?;
            device.synchronize()?;
            recompute.push(t.elapsed().as_secs_f64());
            recompute_out = seqs;
        }
        // Both methods must pick the same greedy tokens, or the comparison means nothing.
        let agree = cached_out
            .iter()
            .zip(&recompute_out)
            .all(|(c, r)| c.iter().map(|&x| i64::from(x)).eq(r[1..].iter().copied()));
        let produced = (args.batch * args.tokens) as f64;
        let (c, r) = (median(cached), median(recompute));
        let threads = rayon::current_num_threads();
        let card = device_name(device);
        if args.json {
            println!(
                "{}",
                json!({"op": "generate", "preset": args.preset, "batch": args.batch, "tokens": args.tokens,
                       "threads": threads, "kv_cache_tokens_per_s": produced / c,
                       "recompute_tokens_per_s": produced / r, "speedup": r / c, "same_tokens": agree,
                       "device": device.to_string(), "card": card,
                       "precision": precision.to_string()})
            );
        } else {
            let place = match device {
                Device::Cpu => format!("{threads} threads"),
                d => format!("{d} ({card}), {precision}"),
            };
            println!(
                "generate {} batch {} × {} tokens, {place}: KV cache {:.0} tokens/s, \
                 recompute {:.0} tokens/s, {:.1}× (same tokens: {agree})",
                args.preset,
                args.batch,
                args.tokens,
                produced / c,
                produced / r,
                r / c
            );
        }
        if !agree {
            if precision == Precision::Bf16 {
                eprintln!(
                    "note: under bf16 the cached and recomputed decodings chose different \
                     tokens (a near-tie rounded differently); the timings stand"
                );
            } else {
                return Err(anyhow::anyhow!(
                    "cached and recomputed decoding chose different tokens"
                ))
                .context("bench generate");
            }
        }
        Ok(())
    })
}
