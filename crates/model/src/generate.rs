//! Sampling from a [`Gpt`] with a KV cache: batches of prompts of different lengths; greedy,
//! temperature, top-k and top-p; stopping at a stop token (end-of-text), a token limit or the
//! context length; seeded and reproducible.
//!
//! # How a batch runs
//!
//! Every sequence keeps its own [`crate::KvCache`] and sits at its true positions (no left
//! padding, no position-id tricks, no attention mask). Each step feeds the still-running
//! sequences' newest tokens through [`Gpt::hidden_states_cached`]: the linear layers process all
//! of them in one matrix product per layer, attention runs per sequence against its own cache.
//! A sequence that stops leaves the batch, so no work is spent on finished sequences.
//!
//! # Devices
//!
//! The model may live on a GPU ([`Gpt::to_device`]): the forward and the caches' keys and
//! values stay there, and each step copies only the logits of the rows that predict a token
//! (one per running sequence, in f32) to the host, where sampling runs exactly as on the CPU.
//!
//! # Randomness
//!
//! Sequence i draws from its own generator, the i-th fork of `Rng::new(seed)`, one uniform
//! number per sampled token (greedy draws none). So the same seed, prompts and model give the
//! same tokens, and a sequence's tokens do not depend on how long the others run.
//!
//! # Log-probabilities
//!
//! [`Generation::logprobs`] holds log π(token | prefix) under the model's own distribution
//! (softmax of the raw logits, temperature 1), whatever the sampling settings: these are the
//! numbers PPO compares with the reference policy and recomputes in its training forward.

use crate::error::{ModelError, Result};
use crate::gpt::Gpt;
use crate::tokenizer::Tokenizer;
use rlhf_tensor::{no_grad, DType, Device, Rng, Tensor};

/// How to pick each next token.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingConfig {
    /// At most this many new tokens per sequence.
    pub max_new_tokens: usize,
    /// Take the most likely token (the first on ties) instead of sampling; the settings below
    /// are then ignored.
    pub greedy: bool,
    /// Logits are divided by this before sampling (> 0).
    pub temperature: f32,
    /// Keep only tokens whose logit is at least the k-th largest (ties at the boundary kept).
    pub top_k: Option<usize>,
    /// Keep the most likely tokens whose probabilities first reach `top_p` (after
    /// temperature and top-k), at least one token; in (0, 1].
    pub top_p: Option<f32>,
    /// Stop a sequence after it samples this token (the token is kept in the output).
    pub stop_token: Option<u32>,
    pub seed: u64,
}

impl Default for SamplingConfig {
    /// Plain sampling at temperature 1 (as InstructGPT's PPO rollouts), 64 tokens, no stop
    /// token, seed 0.
    fn default() -> Self {
        SamplingConfig {
            max_new_tokens: 64,
            greedy: false,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            stop_token: None,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    fn validate(&self, vocab: usize) -> Result<()> {
        let bad = |msg: String| Err(ModelError::invalid("generate", msg));
        let usable = self.temperature > 0.0 && self.temperature.is_finite();
        if !self.greedy && !usable {
            return bad(format!(
                "temperature {} must be positive and finite (use greedy for argmax)",
                self.temperature
            ));
        }
        if self.top_k == Some(0) {
            return bad("top_k must be at least 1".into());
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad(format!("top_p {p} must be in (0, 1]"));
            }
        }
        if let Some(s) = self.stop_token {
            if s as usize >= vocab {
                return bad(format!(
                    "stop token {s} is outside the vocabulary of {vocab}"
                ));
            }
        }
        Ok(())
    }
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// It sampled the stop token.
    Stop,
    /// It reached `max_new_tokens`.
    MaxTokens,
    /// Prompt plus response filled the model's context (`n_positions`).
    Context,
}

/// The result of [`generate`]: per sequence, the prompt, the new tokens (including the stop
/// token when one was sampled), their log-probabilities and why it stopped.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub prompts: Vec<Vec<u32>>,
    pub responses: Vec<Vec<u32>>,
    /// `log π(responses[i][j] | prompt, responses[i][..j])` at temperature 1.
    pub logprobs: Vec<Vec<f32>>,
    pub finish: Vec<FinishReason>,
}

/// Right-padded tensors of a batch of prompt + response sequences.
#[derive(Clone, Debug)]
pub struct PaddedSequences {
    /// `[B, L]` i64 ids: prompt, response, then padding.
    pub ids: Tensor,
    /// `[B, L]` f32: 1 on prompt and response tokens, 0 on padding.
    pub attention_mask: Tensor,
    /// `[B, L]` f32: 1 on response tokens only.
    pub response_mask: Tensor,
    /// `[B, L]` f32: each response token's log-probability at its position, 0 elsewhere.
    pub logprobs: Tensor,
    pub prompt_lens: Vec<usize>,
    pub response_lens: Vec<usize>,
}

impl Generation {
    /// Responses as right-padded tensors: ids `[B, R]` (i64, `pad` after the end),
    /// log-probabilities `[B, R]` (0 on padding) and the mask of real tokens `[B, R]`
    /// (1 real, 0 padding), R the longest response (at least 1).
    pub fn padded_responses(&self, pad: u32) -> Result<(Tensor, Tensor, Tensor)> {
        let b = self.responses.len();
        let r = self
            .responses
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(0)
            .max(1);
        let (mut ids, mut lp, mut mask) = (
            vec![i64::from(pad); b * r],
            vec![0.0f32; b * r],
            vec![0.0f32; b * r],
        );
        for (i, (toks, lps)) in self.responses.iter().zip(&self.logprobs).enumerate() {
            for (j, (&t, &l)) in toks.iter().zip(lps).enumerate() {
                ids[i * r + j] = i64::from(t);
                lp[i * r + j] = l;
                mask[i * r + j] = 1.0;
            }
        }
        Ok((
            Tensor::from_vec(ids, &[b, r])?,
            Tensor::from_vec(lp, &[b, r])?,
            Tensor::from_vec(mask, &[b, r])?,
        ))
    }

    /// Prompt + response sequences right-padded with `pad` (the layout the training forward
    /// scores: positions 0..len, padding after the end where causal attention never sees it).
    pub fn padded_sequences(&self, pad: u32) -> Result<PaddedSequences> {
        let b = self.prompts.len();
        let lens: Vec<usize> = self
            .prompts
            .iter()
            .zip(&self.responses)
            .map(|(p, r)| p.len() + r.len())
            .collect();
        let l = lens.iter().copied().max().unwrap_or(0).max(1);
        let mut ids = vec![i64::from(pad); b * l];
        let (mut att, mut resp, mut lp) = (
            vec![0.0f32; b * l],
            vec![0.0f32; b * l],
            vec![0.0f32; b * l],
        );
        for i in 0..b {
            let (p, r) = (&self.prompts[i], &self.responses[i]);
            for (j, &t) in p.iter().chain(r).enumerate() {
                ids[i * l + j] = i64::from(t);
                att[i * l + j] = 1.0;
            }
            for (j, &x) in self.logprobs[i].iter().enumerate() {
                resp[i * l + p.len() + j] = 1.0;
                lp[i * l + p.len() + j] = x;
            }
        }
        Ok(PaddedSequences {
            ids: Tensor::from_vec(ids, &[b, l])?,
            attention_mask: Tensor::from_vec(att, &[b, l])?,
            response_mask: Tensor::from_vec(resp, &[b, l])?,
            logprobs: Tensor::from_vec(lp, &[b, l])?,
            prompt_lens: self.prompts.iter().map(Vec::len).collect(),
            response_lens: self.responses.iter().map(Vec::len).collect(),
        })
    }
}

/// log Σ exp of a row, in f64.
fn log_sum_exp(row: &[f32]) -> f64 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let s: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
    m + s.ln()
}

/// Picks the next token from one row of logits; returns it and its log-probability under the
/// raw logits. Consumes one uniform draw from `rng` unless greedy.
pub fn sample_token(logits: &[f32], cfg: &SamplingConfig, rng: &mut Rng) -> Result<(u32, f32)> {
    if logits.is_empty() || logits.iter().any(|x| x.is_nan() || *x == f32::INFINITY) {
        return Err(ModelError::invalid(
            "sample",
            "logits are empty or contain NaN/+inf (a diverged model?)",
        ));
    }
    let lse = log_sum_exp(logits);
    let token = if cfg.greedy {
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        best
    } else {
        sample_filtered(logits, cfg, rng)
    };
    Ok((token as u32, (logits[token] as f64 - lse) as f32))
}

/// Temperature, top-k and top-p, then an inverse-CDF draw in token-id order.
fn sample_filtered(logits: &[f32], cfg: &SamplingConfig, rng: &mut Rng) -> usize {
    let inv_t = 1.0 / f64::from(cfg.temperature);
    let mut keep = vec![true; logits.len()];
    if let Some(k) = cfg.top_k.filter(|&k| k < logits.len()) {
        let mut sorted: Vec<f32> = logits.to_vec();
        // The k-th largest value; everything at or above it stays (HF's rule, ties included).
        sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let kth = sorted[k - 1];
        for (kp, &x) in keep.iter_mut().zip(logits) {
            *kp = x >= kth;
        }
    }
    let m = logits
        .iter()
        .zip(&keep)
        .filter(|(_, &k)| k)
        .map(|(&x, _)| x)
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<f64> = logits
        .iter()
        .zip(&keep)
        .map(|(&x, &k)| {
            if k {
                ((x as f64 - m) * inv_t).exp()
            } else {
                0.0
            }
        })
        .collect();
    if let Some(p) = cfg.top_p.filter(|&p| p < 1.0) {
        let total: f64 = probs.iter().sum();
        let mut order: Vec<usize> = (0..probs.len()).filter(|&i| probs[i] > 0.0).collect();
        // Most likely first; equal probabilities by token id, so the order is fully determined.
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let mut cum = 0.0;
        let mut cut = order.len();
        for (n, &i) in order.iter().enumerate() {
            cum += probs[i] / total;
            if cum >= f64::from(p) {
                cut = n + 1;
                break;
            }
        }
        for &i in &order[cut..] {
            probs[i] = 0.0;
        }
    }
    let total: f64 = probs.iter().sum();
    let u = rng.next_f64() * total;
    let mut acc = 0.0;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            acc += p;
            last = i;
            if u < acc {
                return i;
            }
        }
    }
    // Rounding can leave u just above the final sum: the last kept token.
    last
}

/// Generates a continuation of each prompt (token ids, each non-empty and at most the model's
/// context long). Runs in no-grad mode.
pub fn generate(model: &Gpt, prompts: &[Vec<u32>], cfg: &SamplingConfig) -> Result<Generation> {
    let c = model.config();
    cfg.validate(c.vocab_size)?;
    if prompts.is_empty() {
        return Err(ModelError::invalid("generate", "no prompts"));
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(ModelError::invalid(
                "generate",
                format!("prompt {i} is empty"),
            ));
        }
        if p.len() > c.n_positions {
            return Err(ModelError::invalid(
                "generate",
                format!(
                    "prompt {i} has {} tokens, more than the context of {}",
                    p.len(),
                    c.n_positions
                ),
            ));
        }
    }
    let b = prompts.len();
    let mut master = Rng::new(cfg.seed);
    let mut rngs: Vec<Rng> = (0..b).map(|_| master.fork()).collect();
    let mut out = Generation {
        prompts: prompts.to_vec(),
        responses: vec![Vec::new(); b],
        logprobs: vec![Vec::new(); b],
        finish: vec![FinishReason::MaxTokens; b],
    };
    // Sequences still running (their index), their caches and the tokens to feed them next.
    let mut active: Vec<usize> = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        if cfg.max_new_tokens == 0 {
            out.finish[i] = FinishReason::MaxTokens;
        } else if p.len() >= c.n_positions {
            out.finish[i] = FinishReason::Context;
        } else {
            active.push(i);
        }
    }
    let mut caches = model.new_caches(active.len());
    let mut inputs: Vec<Vec<u32>> = active.iter().map(|&i| prompts[i].clone()).collect();
    no_grad(|| -> Result<()> {
        while !active.is_empty() {
            let feed: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
            let hidden = model.hidden_states_cached(&feed, &mut caches)?;
            // Only each sequence's last new token predicts the next one.
            let last = if hidden.dim(0)? == active.len() {
                hidden
            } else {
                let mut rows = Vec::with_capacity(active.len());
                let mut end = 0i64;
                for x in &inputs {
                    end += x.len() as i64;
                    rows.push(end - 1);
                }
                let rows = Tensor::from_vec(rows, &[active.len()])?.to_device(hidden.device())?;
                Tensor::embedding(&rows, &hidden)?
            };
            // Sampling runs on the host: only these rows' logits cross the bus, in f32.
            let logits = model
                .lm_logits(&last)?
                .to_dtype(DType::F32)?
                .to_device(Device::Cpu)?;
            let logits = logits.f32_data()?;
            let v = c.vocab_size;
            let mut still = Vec::with_capacity(active.len());
            let mut next_inputs = Vec::with_capacity(active.len());
            let mut kept_caches = Vec::with_capacity(active.len());
            for (slot, (&i, cache)) in active.iter().zip(caches.drain(..)).enumerate() {
                let row = &logits[slot * v..(slot + 1) * v];
                let (tok, lp) = sample_token(row, cfg, &mut rngs[i])?;
                out.responses[i].push(tok);
                out.logprobs[i].push(lp);
                let total = prompts[i].len() + out.responses[i].len();
                let reason = if cfg.stop_token == Some(tok) {
                    Some(FinishReason::Stop)
                } else if out.responses[i].len() >= cfg.max_new_tokens {
                    Some(FinishReason::MaxTokens)
                } else if total >= c.n_positions {
                    Some(FinishReason::Context)
                } else {
                    None
                };
                match reason {
                    Some(r) => out.finish[i] = r,
                    None => {
                        still.push(i);
                        next_inputs.push(vec![tok]);
                        kept_caches.push(cache);
                    }
                }
            }
            active = still;
            inputs = next_inputs;
            caches = kept_caches;
        }
        Ok(())
    })?;
    Ok(out)
}

/// Encodes text prompts, generates, and decodes each response (the stop token, when sampled,
/// is left out of the text).
pub fn generate_text(
    model: &Gpt,
    tokenizer: &dyn Tokenizer,
    prompts: &[&str],
    cfg: &SamplingConfig,
) -> Result<(Vec<String>, Generation)> {
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| tokenizer.encode(p)).collect();
    let g = generate(model, &ids, cfg)?;
    let texts = g
        .responses
        .iter()
        .map(|r| {
            let r = match (r.last(), cfg.stop_token) {
                (Some(&l), Some(s)) if l == s => &r[..r.len() - 1],
                _ => &r[..],
            };
            tokenizer.decode(r)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((texts, g))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [0.0f32, 3.0, 1.0, 2.9, -5.0];
        let mut rng = Rng::new(1);
        let k2 = SamplingConfig {
            top_k: Some(2),
            ..Default::default()
        };
        let p = SamplingConfig {
            top_p: Some(0.5),
            ..Default::default()
        };
        for _ in 0..200 {
            let (t, _) = sample_token(&logits, &k2, &mut rng).unwrap();
            assert!(t == 1 || t == 3, "{t}");
            // p(1) ≈ 0.47 < 0.5, so the nucleus is {1, 3}.
            let (t, _) = sample_token(&logits, &p, &mut rng).unwrap();
            assert!(t == 1 || t == 3, "{t}");
        }
        let greedy = SamplingConfig {
            greedy: true,
            ..Default::default()
        };
        let (t, lp) = sample_token(&logits, &greedy, &mut rng).unwrap();
        assert_eq!(t, 1);
        let want = 3.0 - log_sum_exp(&logits);
        assert!((f64::from(lp) - want).abs() < 1e-6);
        assert!(sample_token(&[0.0, f32::NAN], &greedy, &mut rng).is_err());
    }

    #[test]
    fn sampling_frequencies_follow_the_tempered_distribution() {
        let logits = [0.0f32, 1.0, 2.0];
        let cfg = SamplingConfig {
            temperature: 2.0,
            ..Default::default()
        };
        let mut rng = Rng::new(7);
        let mut counts = [0usize; 3];
        let n = 30_000;
        for _ in 0..n {
            counts[sample_token(&logits, &cfg, &mut rng).unwrap().0 as usize] += 1;
        }
        let z: f64 = (0..3).map(|i| (i as f64 / 2.0).exp()).sum();
        for (i, &c) in counts.iter().enumerate() {
            let want = (i as f64 / 2.0).exp() / z;
            let got = c as f64 / n as f64;
            assert!((got - want).abs() < 0.015, "{i}: {got} vs {want}");
        }
    }
}
