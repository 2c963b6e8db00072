//! `rlhf generate`: sample continuations from a checkpoint with the KV cache, on the CPU or a
//! GPU (`--device cuda`; the forward and the caches stay on the GPU, sampling runs on the host).

use super::common::with_threads;
use anyhow::{bail, Context};
use clap::Args;
use rlhf_model::checkpoint::load_model;
use rlhf_model::generate::{generate_text, SamplingConfig};
use serde_json::json;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint directory (config.json + model.safetensors).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A prompt (repeatable).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// Prompts from a file: one per line, or JSON lines with a "prompt" field (.jsonl).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// New tokens per prompt at most.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Always take the most likely token.
    #[arg(long)]
    pub greedy: bool,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep going past end-of-text instead of stopping there.
    #[arg(long)]
    pub no_stop: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub threads: Option<usize>,
    /// One JSON object per prompt (text, token ids, log-probabilities, why it stopped).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: super::common::DeviceArgs,
}

fn read_prompts(args: &GenerateArgs) -> anyhow::Result<Vec<String>> {
    let mut prompts = args.prompt.clone();
    if let Some(path) = &args.prompts {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read prompts from {}", path.display()))?;
        let jsonl = path.extension().is_some_and(|e| e == "jsonl");
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            if jsonl {
                let v: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
                let p = v.get("prompt").and_then(|p| p.as_str()).with_context(|| {
                    format!("{}:{}: no string field \"prompt\"", path.display(), i + 1)
                })?;
                prompts.push(p.to_string());
            } else {
                prompts.push(line.to_string());
            }
        }
    }
    if prompts.is_empty() {
        bail!("no prompts: give --prompt TEXT or --prompts FILE");
    }
    Ok(prompts)
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let threads = args.threads;
    with_threads(threads, move || {
        let prompts = read_prompts(&args)?;
        let precision = args.device.open()?;
        let mut model = load_model(&args.checkpoint)?;
        super::common::place_model(&mut model, args.device.device, precision)?;
        let tokenizer = model.config().build_tokenizer()?;
        let cfg = SamplingConfig {
            max_new_tokens: args.max_tokens,
            greedy: args.greedy,
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            stop_token: (!args.no_stop).then(|| tokenizer.eos_token_id()),
            seed: args.seed,
        };
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let (texts, generation) = generate_text(&model, tokenizer.as_ref(), &refs, &cfg)?;
        for (i, text) in texts.iter().enumerate() {
            if args.json {
                println!(
                    "{}",
                    json!({
                        "prompt": prompts[i],
                        "completion": text,
                        "tokens": generation.responses[i],
                        "logprobs": generation.logprobs[i],
                        "finish": format!("{:?}", generation.finish[i]),
                    })
                );
            } else {
                println!("{}{}", prompts[i], text);
                if i + 1 < texts.len() {
                    println!("---");
                }
            }
        }
        Ok(())
    })
}
