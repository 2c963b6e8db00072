//! `rlhf pretrain`: next-token training of a GPT on a text file or the built-in corpus, with a
//! progress bar, JSON-lines metrics, a held-out loss, atomic checkpoints and exact resumption.
//!
//! A run's settings (data, model, batch shape, schedule, seed) are stored in each checkpoint's
//! training state; `--resume DIR` reads them back, so a resumed run continues bitwise-identically
//! to an uninterrupted one on the same thread count. Only `--steps`, `--out`, `--threads`,
//! `--device`, `--precision` and the reporting intervals may change on resume (a run resumed on
//! another device or precision continues from the same state, but not bitwise as it would have).
//!
//! `--device cuda` trains on a GPU, by default in bf16 mixed precision (`--precision f32` for
//! f32 compute): the model is initialised (or loaded) on the host exactly as on the CPU, then
//! moved; checkpoints are written from host copies and load anywhere.

use super::common::{progress_bar, with_threads, MetricsWriter};
use anyhow::{bail, Context};
use clap::Args;
use rlhf_data::corpus::{CorpusGenerator, TextChunks, DEFAULT_CHUNK_BYTES};
use rlhf_data::World;
use rlhf_model::checkpoint::{load_model, restore_trainer, save_checkpoint, TrainingState};
use rlhf_model::generate::{generate_text, SamplingConfig};
use rlhf_model::train::{lm_loss, EpochShuffler, TokenWindows, TrainConfig, Trainer};
use rlhf_model::{Gpt, GptConfig};
use rlhf_tensor::no_grad;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct PretrainArgs {
    /// UTF-8 text file to train on (`.gz` is decompressed); default: the built-in corpus.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Documents of the built-in corpus to generate (when --data is not given).
    #[arg(long, default_value_t = 20_000)]
    pub corpus_docs: usize,
    /// Model preset (tiny, small-cpu, gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a config.json path.
    #[arg(long, default_value = "small-cpu")]
    pub preset: String,
    /// Optimiser steps in total; the learning-rate schedule spans them. A resumed run may raise
    /// it, which stretches the rest of the schedule (no longer identical to a single run).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence (default: the model's context length).
    #[arg(long)]
    pub seq: Option<usize>,
    /// Micro-batches accumulated into each optimiser step.
    #[arg(long, default_value_t = 1)]
    pub accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 50)]
    pub warmup: u64,
    /// The cosine schedule ends at this fraction of the peak rate.
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f32,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f32,
    /// Fraction of the token stream (its end) held out for evaluation.
    #[arg(long, default_value_t = 0.05)]
    pub heldout_fraction: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Output directory: `checkpoint/` and `metrics.jsonl` go here.
    #[arg(long, default_value = "runs/pretrain")]
    pub out: PathBuf,
    /// Write a checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 100)]
    pub save_every: u64,
    /// Measure the held-out loss every N steps (and at the end).
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    /// Held-out micro-batches per evaluation.
    #[arg(long, default_value_t = 4)]
    pub eval_batches: usize,
    /// Stop after this step (checkpointing there) without changing the schedule, which still
    /// runs to --steps: an interrupted run that `--resume` continues exactly.
    #[arg(long)]
    pub stop_at: Option<u64>,
    /// Continue the run saved in this checkpoint directory.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Bytes of text sampled from the model at the end (0: none).
    #[arg(long, default_value_t = 200)]
    pub sample_tokens: usize,
    /// Prompt of the final sample.
    #[arg(long, default_value = "The ")]
    pub sample_prompt: String,
    /// No progress bar (one line per evaluation instead).
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: super::common::DeviceArgs,
}

/// What a run needs to be reproduced, saved in every checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct RunSettings {
    data: Option<PathBuf>,
    corpus_docs: usize,
    seq: usize,
    batch: usize,
    accum: usize,
    lr: f32,
    warmup: u64,
    min_lr_ratio: f32,
    grad_clip: f32,
    heldout_fraction: f64,
    seed: u64,
    steps: u64,
}

const DEFAULT_STEPS: u64 = 1000;

/// The training text: a file streamed in chunks, or the built-in corpus.
fn load_text(s: &RunSettings) -> anyhow::Result<String> {
    match &s.data {
        Some(path) => {
            let mut text = String::new();
            for chunk in TextChunks::open(path, DEFAULT_CHUNK_BYTES)? {
                text.push_str(&chunk?);
            }
            Ok(text)
        }
        None => {
            let generator = CorpusGenerator::new(World::new(s.seed));
            let mut rng = rlhf_data::Rng::new(s.seed);
            let mut bytes = Vec::new();
            generator.write_documents(s.corpus_docs, &mut rng, &mut bytes)?;
            Ok(String::from_utf8(bytes).context("built-in corpus is not UTF-8")?)
        }
    }
}

/// Mean loss over the first `batches` micro-batches of held-out windows (weighted by targets).
fn heldout_loss(
    model: &Gpt,
    windows: &TokenWindows,
    batch: usize,
    batches: usize,
) -> anyhow::Result<f32> {
    let n = windows.len().min(batch * batches);
    let idx: Vec<usize> = (0..n).collect();
    let (mut total, mut weight) = (0.0f64, 0.0f64);
    no_grad(|| -> anyhow::Result<()> {
        for chunk in idx.chunks(batch.max(1)) {
            let b = windows.batch(chunk)?;
            let w = b.target_weight()?;
            total += f64::from(lm_loss(model, &b, None)?.item()?) * w;
            weight += w;
        }
        Ok(())
    })?;
    Ok((total / weight.max(1.0)) as f32)
}

pub fn run(args: PretrainArgs) -> anyhow::Result<()> {
    let threads = args.threads;
    with_threads(threads, move || train(args))
}

fn train(args: PretrainArgs) -> anyhow::Result<()> {
    // A missing GPU is reported before any data is prepared.
    let precision = args.device.open()?;
    // Model, settings and (when resuming) the saved state.
    let (mut model, settings, state) = match &args.resume {
        Some(dir) => {
            let model = load_model(dir)?;
            let state = rlhf_model::checkpoint::load_training_state(dir)?
                .with_context(|| format!("{}: no training state to resume from", dir.display()))?;
            let mut settings: RunSettings = serde_json::from_value(state.extra.clone())
                .with_context(|| {
                    format!("{}: training state has no run settings", dir.display())
                })?;
            if let Some(steps) = args.steps {
                settings.steps = steps;
            }
            (model, settings, Some(dir.clone()))
        }
        None => {
            let config = GptConfig::from_preset_or_file(&args.preset)?;
            let seq = args.seq.unwrap_or(config.n_positions);
            if seq > config.n_positions || seq < 2 {
                bail!(
                    "--seq {seq} must be in 2..={} (the model's context)",
                    config.n_positions
                );
            }
            if args.batch == 0 || args.accum == 0 {
                bail!("--batch and --accum must be at least 1");
            }
            if !(0.0..1.0).contains(&args.heldout_fraction) {
                bail!("--heldout-fraction must be in [0, 1)");
            }
            let settings = RunSettings {
                data: args.data.clone(),
                corpus_docs: args.corpus_docs,
                seq,
                batch: args.batch,
                accum: args.accum,
                lr: args.lr,
                warmup: args.warmup,
                min_lr_ratio: args.min_lr_ratio,
                grad_clip: args.grad_clip,
                heldout_fraction: args.heldout_fraction,
                seed: args.seed,
                steps: args.steps.unwrap_or(DEFAULT_STEPS),
            };
            (Gpt::new(config, args.seed)?, settings, None)
        }
    };
    // Initialised or loaded on the host, then moved: the same starting weights on every device.
    super::common::place_model(&mut model, args.device.device, precision)?;
    let tokenizer = model.config().build_tokenizer()?;

    // Data: tokens, split into training and held-out windows.
    let text = load_text(&settings)?;
    let tokens = tokenizer.encode(&text);
    let heldout_len = ((tokens.len() as f64) * settings.heldout_fraction) as usize;
    let split = tokens.len() - heldout_len;
    let train_windows = TokenWindows::new(tokens[..split].to_vec(), settings.seq)
        .context("the training text is too short for one sequence")?;
    let heldout_windows = if heldout_len >= settings.seq {
        Some(TokenWindows::new(tokens[split..].to_vec(), settings.seq)?)
    } else {
        None
    };

    // Optimiser and data order, restored exactly on resume.
    let mut config = TrainConfig::new(settings.lr, settings.warmup, settings.steps, settings.seed);
    config.schedule.floor_ratio = settings.min_lr_ratio;
    config.max_grad_norm = (settings.grad_clip > 0.0).then_some(settings.grad_clip);
    let mut trainer = Trainer::new(model.named_parameters(), config);
    let mut shuffler = match &state {
        Some(dir) => {
            let saved = restore_trainer(dir, &mut trainer)?;
            let pos = saved.data.context("checkpoint has no data position")?;
            EpochShuffler::at(train_windows.len(), settings.seed, pos)?
        }
        None => EpochShuffler::new(train_windows.len(), settings.seed)?,
    };

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut metrics = MetricsWriter::append(&args.out.join("metrics.jsonl"))?;
    let checkpoint_dir = args.out.join("checkpoint");
    let params = model.config().num_parameters();
    let start = trainer.step();
    if start >= settings.steps {
        bail!(
            "the run is already at step {start} of {}; raise --steps to continue",
            settings.steps
        );
    }
    eprintln!(
        "pretrain: {params} parameters on {} ({precision}), {} training windows of {} tokens, {} \
         held out, steps {start}..{}",
        super::common::device_name(model.device()),
        train_windows.len(),
        settings.seq,
        heldout_windows.as_ref().map_or(0, |w| w.len()),
        settings.steps
    );
    let bar = (!args.quiet).then(|| progress_bar(settings.steps, start));
    let run_start = Instant::now();
    let mut tokens_seen = 0.0f64;
    let end = args.stop_at.unwrap_or(settings.steps).min(settings.steps);
    for step in start..end {
        let t0 = Instant::now();
        let idx = shuffler.next_batch(settings.batch * settings.accum);
        let micro = idx
            .chunks(settings.batch)
            .map(|c| train_windows.batch(c))
            .collect::<Result<Vec<_>, _>>()?;
        let stats = trainer.train_step(&model, &micro)?;
        let secs = t0.elapsed().as_secs_f64();
        let batch_tokens = (idx.len() * settings.seq) as f64;
        tokens_seen += batch_tokens;
        let done = step + 1;
        let mut record = json!({
            "step": done,
            "loss": stats.loss,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "tokens_per_s": batch_tokens / secs,
            "elapsed_s": run_start.elapsed().as_secs_f64(),
        });
        let last = done == end;
        if let Some(h) = &heldout_windows {
            if done % args.eval_every.max(1) == 0 || last {
                let l = heldout_loss(&model, h, settings.batch, args.eval_batches)?;
                record["heldout_loss"] = json!(l);
                if args.quiet {
                    eprintln!("step {done}: loss {:.4}, held-out {l:.4}", stats.loss);
                }
            }
        }
        metrics.write(&record)?;
        if let Some(bar) = &bar {
            bar.set_position(done);
            bar.set_message(format!(
                "loss {:.4} lr {:.2e} {:.0} tok/s{}",
                stats.loss,
                stats.lr,
                tokens_seen / run_start.elapsed().as_secs_f64(),
                record
                    .get("heldout_loss")
                    .map(|h| format!(" held-out {:.4}", h.as_f64().unwrap_or(f64::NAN)))
                    .unwrap_or_default()
            ));
        }
        if done % args.save_every.max(1) == 0 || last {
            let state = TrainingState {
                optimizer: trainer.optimizer_state()?,
                data: Some(shuffler.position()),
                rng: None,
                extra: serde_json::to_value(&settings)?,
            };
            save_checkpoint(&checkpoint_dir, &model, Some(&state))?;
        }
    }
    if let Some(bar) = bar {
        bar.finish();
    }
    eprintln!("checkpoint: {}", checkpoint_dir.display());
    if args.sample_tokens > 0 {
        print_sample(
            &model,
            tokenizer.as_ref(),
            &args.sample_prompt,
            args.sample_tokens,
            settings.seed,
        )?;
    }
    Ok(())
}

fn print_sample(
    model: &Gpt,
    tokenizer: &dyn rlhf_model::Tokenizer,
    prompt: &str,
    tokens: usize,
    seed: u64,
) -> anyhow::Result<()> {
    let max = model
        .config()
        .n_positions
        .saturating_sub(tokenizer.encode(prompt).len());
    let cfg = SamplingConfig {
        max_new_tokens: tokens.min(max),
        temperature: 0.8,
        stop_token: Some(tokenizer.eos_token_id()),
        seed,
        ..Default::default()
    };
    let (texts, _) = generate_text(model, tokenizer, &[prompt], &cfg)?;
    println!("--- sample ---\n{prompt}{}", texts[0]);
    Ok(())
}
