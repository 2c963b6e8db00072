//! Training helpers: the masked next-token loss, per-token log-probabilities, a [`Trainer`] that
//! takes one optimiser step over several micro-batches (gradient accumulation), and seeded data
//! order ([`EpochShuffler`], [`TokenWindows`]).
//!
//! Determinism: dropout seeds are derived from (training seed, step, micro-batch) and the data
//! order from (data seed, epoch), so a run resumed from a checkpoint (optimizer moments, step,
//! shuffler position) continues exactly as an uninterrupted one.

use crate::error::{ModelError, Result};
use crate::gpt::Gpt;
use crate::weights::GptWeights;
use rlhf_tensor::optim::{AdamW, AdamWConfig, AdamWState, CosineSchedule};
use rlhf_tensor::{DType, Device, Parameter, Rng, Tensor};
use std::sync::Arc;

/// One micro-batch for language-model training: ids `[B, T]` and, optionally, a loss mask
/// `[B, T]` (f32, 1 where token t counts as a prediction target, 0 elsewhere: prompt tokens in
/// SFT, padding). Without a mask every token from position 1 on is a target.
#[derive(Clone, Debug)]
pub struct LmBatch {
    pub ids: Tensor,
    pub loss_mask: Option<Tensor>,
}

impl LmBatch {
    pub fn new(ids: Tensor, loss_mask: Option<Tensor>) -> LmBatch {
        LmBatch { ids, loss_mask }
    }

    /// The number (total weight) of target tokens: the mask summed over positions 1..T.
    pub fn target_weight(&self) -> Result<f64> {
        let (b, t) = batch_dims("LmBatch", &self.ids)?;
        Ok(match &self.loss_mask {
            None => (b * (t - 1)) as f64,
            Some(m) => {
                let v = m.to_f64_vec();
                (0..b)
                    .map(|i| v[i * t + 1..(i + 1) * t].iter().sum::<f64>())
                    .sum()
            }
        })
    }
}

fn batch_dims(op: &'static str, ids: &Tensor) -> Result<(usize, usize)> {
    if ids.rank() != 2 || ids.shape()[1] < 2 || ids.shape()[0] == 0 {
        return Err(ModelError::invalid(
            op,
            format!(
                "ids must be [batch ≥ 1, time ≥ 2] (a token and its successor), got {:?}",
                ids.shape()
            ),
        ));
    }
    Ok((ids.shape()[0], ids.shape()[1]))
}

/// Mean next-token cross-entropy of `batch`: the model reads `ids[:, :T-1]` and predicts
/// `ids[:, 1:]`; target t counts with weight `loss_mask[:, t]`. The loss is Σ w·nll / Σ w (0
/// when nothing counts).
pub fn lm_loss(model: &Gpt, batch: &LmBatch, dropout_seed: Option<u64>) -> Result<Tensor> {
    lm_loss_with(model, &model.weights(), batch, dropout_seed)
}

/// As [`lm_loss`] with explicit weights (for gradient checks).
pub fn lm_loss_with(
    model: &Gpt,
    w: &GptWeights<Tensor>,
    batch: &LmBatch,
    dropout_seed: Option<u64>,
) -> Result<Tensor> {
    let (_, t) = batch_dims("lm_loss", &batch.ids)?;
    if let Some(m) = &batch.loss_mask {
        if m.shape() != batch.ids.shape() {
            return Err(ModelError::invalid(
                "lm_loss",
                format!(
                    "loss mask {:?} does not match ids {:?}",
                    m.shape(),
                    batch.ids.shape()
                ),
            ));
        }
    }
    // Inputs, targets and mask are cut on the host (a no-op copy when they are there already).
    // Integer indices stay there: the GPU ops check host indices on the host and upload them,
    // with no wait for a device-side check. The float mask goes to the model's device.
    let device = model.device();
    let ids = batch.ids.to_device(Device::Cpu)?;
    let inputs = ids.narrow(1, 0, t - 1)?;
    let targets = ids.narrow(1, 1, t - 1)?;
    let hidden = model.hidden_states_with(w, &inputs, dropout_seed)?;
    // Under mixed precision the logits are bf16; the fused cross-entropy reads them in f32
    // (f32 log-sum-exp and sums) and returns an f32 loss. On a GPU their vocabulary may be
    // padded (see `loss_logits_with`); the targets are all below the real vocabulary size.
    let logits = model.loss_logits_with(w, &hidden)?;
    let weights = match &batch.loss_mask {
        Some(m) => Some(
            m.to_device(Device::Cpu)?
                .narrow(1, 1, t - 1)?
                .to_dtype(DType::F32)?
                .to_device(device)?,
        ),
        None => None,
    };
    Ok(logits.cross_entropy(&targets, None, weights.as_ref())?)
}

/// log π(ids[:, t+1] | ids[:, ..=t]) for t in 0..T-1: `[B, T-1]` from logits `[B, T, V]` of
/// ids `[B, T]`, in f32 on the logits' device. Differentiable (PPO's ratio and KL terms).
pub fn token_logprobs(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = batch_dims("token_logprobs", ids)?;
    if logits.rank() != 3 || logits.shape()[..2] != [b, t] {
        return Err(ModelError::invalid(
            "token_logprobs",
            format!(
                "logits {:?} do not match ids {:?}",
                logits.shape(),
                ids.shape()
            ),
        ));
    }
    // f32 log-probabilities whatever the logits' dtype (bf16 logits are cast on their device).
    let lp = logits
        .narrow(1, 0, t - 1)?
        .to_dtype(DType::F32)?
        .log_softmax(-1)?;
    // Host indices: checked there and uploaded by gather_last, no device wait.
    let next = ids
        .to_device(Device::Cpu)?
        .narrow(1, 1, t - 1)?
        .contiguous()?
        .reshape_to(&[b, t - 1, 1])?;
    Ok(lp.gather_last(&next)?.squeeze(-1)?)
}

/// Settings of a [`Trainer`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainConfig {
    pub schedule: CosineSchedule,
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this before each step (`None`: no clipping).
    pub max_grad_norm: Option<f32>,
    /// Dropout seeds derive from this, the step and the micro-batch index.
    pub seed: u64,
}

impl TrainConfig {
    /// Warmup then cosine decay to 10% of `peak_lr` over `total_steps`, AdamW(0.9, 0.95,
    /// weight decay 0.1 on matrices), clipping at 1.0.
    pub fn new(peak_lr: f32, warmup_steps: u64, total_steps: u64, seed: u64) -> TrainConfig {
        TrainConfig {
            schedule: CosineSchedule {
                peak: peak_lr,
                warmup_steps,
                total_steps,
                floor_ratio: 0.1,
            },
            adamw: AdamWConfig::default(),
            max_grad_norm: Some(1.0),
            seed,
        }
    }
}

/// What one optimiser step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// The step just taken (0-based).
    pub step: u64,
    /// The loss over all micro-batches together (weighted by their target counts).
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    pub lr: f32,
    /// Target tokens (total loss weight) in the step.
    pub tokens: f64,
}

/// AdamW with a schedule, clipping and gradient accumulation over a fixed parameter list.
pub struct Trainer {
    optimizer: AdamW,
    config: TrainConfig,
}

/// A seed for (seed, a, b), well mixed so neighbouring steps get unrelated streams.
pub fn derive_seed(seed: u64, a: u64, b: u64) -> u64 {
    let mut r = Rng::new(seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17));
    let x = r.next_u64();
    Rng::new(x ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64()
}

impl Trainer {
    /// A trainer over `params` (e.g. [`Gpt::named_parameters`]; the names key the optimiser
    /// state in checkpoints). For a model on a GPU, move it first ([`Gpt::to_device`]): the
    /// optimiser keeps its f32 moments beside the parameters it is given.
    pub fn new(params: Vec<(String, Parameter)>, config: TrainConfig) -> Trainer {
        Trainer {
            optimizer: AdamW::new(params, config.adamw),
            config,
        }
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Steps taken so far (the next step's index).
    pub fn step(&self) -> u64 {
        self.optimizer.steps()
    }

    /// The optimiser's moments and step, for a checkpoint.
    pub fn optimizer_state(&self) -> Result<AdamWState> {
        Ok(self.optimizer.state()?)
    }

    /// Restores [`Trainer::optimizer_state`].
    pub fn load_optimizer_state(&mut self, state: &AdamWState) -> Result<()> {
        Ok(self.optimizer.load_state(state)?)
    }

    /// The dropout seed of micro-batch `micro` in step `step`.
    pub fn dropout_seed(&self, step: u64, micro: usize) -> u64 {
        derive_seed(self.config.seed, step, micro as u64)
    }

    /// One language-model step: forward and backward over each micro-batch (with dropout),
    /// then clipping and an AdamW step at the scheduled learning rate. Gradients are weighted
    /// so the step equals one over the concatenated micro-batches: micro-batch i's loss is
    /// scaled by (its target tokens) / (all target tokens).
    pub fn train_step(&mut self, model: &Gpt, micro_batches: &[LmBatch]) -> Result<StepStats> {
        let weights = micro_batches
            .iter()
            .map(LmBatch::target_weight)
            .collect::<Result<Vec<_>>>()?;
        self.step_with(&weights, |i, seed| {
            lm_loss(model, &micro_batches[i], Some(seed))
        })
    }

    /// The general form of [`Trainer::train_step`] for other losses (reward model, PPO):
    /// `loss(i, dropout_seed)` returns micro-batch i's mean loss, `weights[i]` how much it
    /// counts (e.g. its token or pair count). Backward runs on each scaled loss in turn.
    pub fn step_with(
        &mut self,
        weights: &[f64],
        mut loss: impl FnMut(usize, u64) -> Result<Tensor>,
    ) -> Result<StepStats> {
        if weights.is_empty() {
            return Err(ModelError::invalid("train_step", "no micro-batches"));
        }
        let total: f64 = weights.iter().sum();
        let step = self.optimizer.steps();
        self.optimizer.zero_grad();
        let mut loss_sum = 0.0f64;
        for (i, &w) in weights.iter().enumerate() {
            if w == 0.0 {
                continue;
            }
            let l = loss(i, self.dropout_seed(step, i))?;
            let scale = if total > 0.0 { w / total } else { 0.0 };
            l.mul_scalar(scale as f32)?.backward()?;
            // Read after the backward is queued: on a GPU, reading the loss waits for the
            // device, which then has the whole backward to run meanwhile.
            loss_sum += f64::from(l.item()?) * scale;
        }
        // Clipping and the update in one (on a GPU: no host round trip in between); a
        // non-finite norm takes no step.
        let lr = self.config.schedule.lr(step);
        let max = self.config.max_grad_norm.unwrap_or(f32::INFINITY);
        let grad_norm = self.optimizer.step_clipped(lr, max)?;
        self.optimizer.zero_grad();
        if !grad_norm.is_finite() {
            return Err(ModelError::invalid(
                "train_step",
                format!("gradient norm is {grad_norm} at step {step}; the step was not taken"),
            ));
        }
        Ok(StepStats {
            step,
            loss: loss_sum as f32,
            grad_norm,
            lr,
            tokens: total,
        })
    }
}

/// A seeded order over `n` examples: a fresh permutation each epoch (Fisher–Yates from a seed
/// derived from (seed, epoch)), read in batches. Its state is just (epoch, position), so a
/// checkpoint restores it exactly.
#[derive(Clone, Debug)]
pub struct EpochShuffler {
    n: usize,
    seed: u64,
    epoch: u64,
    pos: usize,
    perm: Vec<usize>,
}

/// Where an [`EpochShuffler`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub pos: usize,
}

impl EpochShuffler {
    pub fn new(n: usize, seed: u64) -> Result<EpochShuffler> {
        EpochShuffler::at(n, seed, DataPosition { epoch: 0, pos: 0 })
    }

    /// A shuffler resumed at `position`.
    pub fn at(n: usize, seed: u64, position: DataPosition) -> Result<EpochShuffler> {
        if n == 0 {
            return Err(ModelError::invalid(
                "EpochShuffler",
                "no examples to shuffle",
            ));
        }
        if position.pos > n {
            return Err(ModelError::invalid(
                "EpochShuffler",
                format!("position {} is past the {n} examples", position.pos),
            ));
        }
        Ok(EpochShuffler {
            n,
            seed,
            epoch: position.epoch,
            pos: position.pos,
            perm: Self::permutation(n, seed, position.epoch),
        })
    }

    fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
        let mut rng = Rng::new(derive_seed(seed, epoch, 0x5348_5546));
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            p.swap(i, j);
        }
        p
    }

    pub fn position(&self) -> DataPosition {
        DataPosition {
            epoch: self.epoch,
            pos: self.pos,
        }
    }

    /// The next `k` example indices, continuing into the next epoch's permutation at the end.
    pub fn next_batch(&mut self, k: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(k);
        while out.len() < k {
            if self.pos == self.n {
                self.epoch += 1;
                self.pos = 0;
                self.perm = Self::permutation(self.n, self.seed, self.epoch);
            }
            let take = (k - out.len()).min(self.n - self.pos);
            out.extend_from_slice(&self.perm[self.pos..self.pos + take]);
            self.pos += take;
        }
        out
    }
}

/// A token stream cut into training windows of `seq_len` tokens; consecutive windows overlap
/// by one token, so every token after the first is a prediction target exactly once per epoch.
#[derive(Clone, Debug)]
pub struct TokenWindows {
    tokens: Arc<[u32]>,
    seq_len: usize,
}

impl TokenWindows {
    pub fn new(tokens: impl Into<Arc<[u32]>>, seq_len: usize) -> Result<TokenWindows> {
        let tokens = tokens.into();
        if seq_len < 2 || tokens.len() < seq_len {
            return Err(ModelError::invalid(
                "TokenWindows",
                format!(
                    "need windows of at least 2 tokens and a stream at least that long, got \
                     seq_len {seq_len} over {} tokens",
                    tokens.len()
                ),
            ));
        }
        Ok(TokenWindows { tokens, seq_len })
    }

    /// Number of whole windows.
    pub fn len(&self) -> usize {
        (self.tokens.len() - 1) / (self.seq_len - 1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Window `i`: tokens `i·(seq_len-1) .. i·(seq_len-1) + seq_len`.
    pub fn window(&self, i: usize) -> Option<&[u32]> {
        let start = i.checked_mul(self.seq_len - 1)?;
        self.tokens.get(start..start + self.seq_len)
    }

    /// The windows at `indices` as an `[indices.len(), seq_len]` i64 batch.
    pub fn batch(&self, indices: &[usize]) -> Result<LmBatch> {
        let mut ids = Vec::with_capacity(indices.len() * self.seq_len);
        for &i in indices {
            let w = self.window(i).ok_or_else(|| {
                ModelError::invalid(
                    "TokenWindows::batch",
                    format!("window {i} of {}", self.len()),
                )
            })?;
            ids.extend(w.iter().map(|&t| i64::from(t)));
        }
        Ok(LmBatch::new(
            Tensor::from_vec(ids, &[indices.len(), self.seq_len])?,
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffler_is_a_seeded_permutation_and_resumes() {
        let mut s = EpochShuffler::new(10, 3).unwrap();
        let mut first: Vec<usize> = s.next_batch(4);
        first.extend(s.next_batch(6));
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_ne!(first, (0..10).collect::<Vec<_>>());
        // Crossing an epoch boundary, then resuming from the saved position.
        let _ = s.next_batch(7);
        let pos = s.position();
        assert_eq!(pos, DataPosition { epoch: 1, pos: 7 });
        let mut resumed = EpochShuffler::at(10, 3, pos).unwrap();
        assert_eq!(s.next_batch(5), resumed.next_batch(5));
        let mut other = EpochShuffler::new(10, 4).unwrap();
        assert_ne!(other.next_batch(10), first);
    }

    #[test]
    fn windows_overlap_by_one() {
        let w = TokenWindows::new((0..10u32).collect::<Vec<_>>(), 4).unwrap();
        assert_eq!(w.len(), 3);
        assert_eq!(w.window(1).unwrap(), &[3, 4, 5, 6]);
        assert!(w.window(3).is_none());
        let b = w.batch(&[2, 0]).unwrap();
        assert_eq!(b.ids.to_i64_vec().unwrap(), vec![6, 7, 8, 9, 0, 1, 2, 3]);
        assert!(w.batch(&[3]).is_err());
    }
}
