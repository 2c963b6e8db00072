//! The GPT-2 trunk and its tied language-model head.
//!
//! ```text
//! x = wte[ids] + wpe[positions]                  (dropout embd_pdrop)
//! for each block:
//!     x = x + c_proj(attention(c_attn(ln_1(x)))) (dropout attn_pdrop on the probabilities,
//!                                                 resid_pdrop on the branch)
//!     x = x + c_proj(gelu(c_fc(ln_2(x))))        (dropout resid_pdrop on the branch)
//! hidden = ln_f(x)
//! logits = hidden · wteᵀ                         (tied head: a transposed view, no copy)
//! ```
//!
//! Two forward paths share the blocks:
//!
//! - [`Gpt::hidden_states`] takes a rectangular batch `[B, T]` at positions `0..T` and runs
//!   attention for all sequences and heads in one call. Training, scoring and log-prob
//!   computation use it. Batches of different-length sequences are right-padded: attention is
//!   causal, so a real token never sees the padding after it, and the padded positions are
//!   masked out of losses. No attention mask is needed.
//! - [`Gpt::hidden_states_cached`] feeds new tokens for several sequences, each with its own
//!   [`KvCache`] of a different length ("ragged" batching). The linear layers run on all new
//!   tokens of all sequences at once (one matrix product per layer, as in a rectangular batch);
//!   only attention runs per sequence, against that sequence's own cache. So every sequence sits
//!   at its true positions `0..len` with no padding and no mask, and a prompt's logits do not
//!   depend on what else is in the batch. Generation uses it.
//!
//! ## Devices and precision
//!
//! A model lives on one [`Device`] ([`Gpt::to_device`]): its parameters are f32 there (the
//! master weights the optimiser updates), and token ids and positions are copied there by the
//! forward. Its [`Precision`] decides the compute dtype: with [`Precision::F32`] every op runs
//! in f32 (the only choice on the CPU, whose kernels compute in f32); with [`Precision::Bf16`]
//! (CUDA only) the forward casts each weight to bf16 with the tracked
//! [`Tensor::to_dtype`] where it is used (whose backward casts the gradient back to f32, so
//! parameters receive f32 gradients), and the activations are bf16 from the embedding sum on.
//! The kernels accumulate every product and reduction in f32 (GEMM, layer norm statistics,
//! softmax, the fused log-softmax of the loss), and the loss itself is f32. The embedding
//! tables are read in f32 and the looked-up rows cast: `wte` is also the LM head, and the two
//! uses must hand back gradients of one dtype for autograd to add them.
//!
//! On the CPU with f32 the forward records exactly the graph it did before devices existed
//! (every cast and copy is the identity there), so CPU results are bitwise unchanged.

use crate::config::GptConfig;
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::weights::{param_specs, BlockWeights, GptWeights, ParamKind};
use rlhf_tensor::{AttentionDropout, DType, Device, Parameter, Rng, Tensor};
use std::collections::HashMap;

/// The dtype a model computes in (its parameters stay f32 either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// Weights and activations f32: the CPU path, and a CUDA reference.
    #[default]
    F32,
    /// Mixed precision: weights cast to bf16 for each forward, bf16 activations, f32
    /// accumulation inside every kernel, f32 loss, f32 master weights and gradients. CUDA only.
    Bf16,
}

impl Precision {
    /// The dtype of weights and activations in compute.
    pub fn compute_dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }

    /// Parses `f32` or `bf16` (case-insensitive).
    pub fn parse(s: &str) -> Result<Precision> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(ModelError::invalid(
                "precision",
                format!("unknown precision {s:?}: expected f32 or bf16"),
            )),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// A GPT-2 language model: the trunk's parameters, its config, and where and in which dtype it
/// computes.
pub struct Gpt {
    config: GptConfig,
    params: GptWeights<Parameter>,
    device: Device,
    precision: Precision,
}

impl std::fmt::Debug for Gpt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Gpt(layers={}, heads={}, d={}, vocab={}, context={}, params={})",
            self.config.n_layer,
            self.config.n_head,
            self.config.n_embd,
            self.config.vocab_size,
            self.config.n_positions,
            self.config.num_parameters()
        )
    }
}

/// Per-call dropout: a generator seeded for this forward, drawing one fresh seed per dropout
/// site in a fixed order, so the same seed drops the same activations.
struct Dropout {
    rng: Option<Rng>,
}

impl Dropout {
    fn new(seed: Option<u64>) -> Dropout {
        Dropout {
            rng: seed.map(Rng::new),
        }
    }

    /// The attention dropout of the next site: a fresh seed for the fused kernels' hash, or
    /// None in evaluation mode or with p = 0.
    fn attention(&mut self, p: f32) -> Result<Option<AttentionDropout>> {
        match &mut self.rng {
            Some(rng) if p > 0.0 => Ok(Some(AttentionDropout::new(p, rng.next_u64())?)),
            _ => Ok(None),
        }
    }

    fn apply(&mut self, x: Tensor, p: f32) -> Result<Tensor> {
        match &mut self.rng {
            Some(rng) if p > 0.0 => Ok(x.dropout(p, rng.next_u64())?),
            _ => Ok(x),
        }
    }
}

/// The weight or bias `w` in the dtype of the activations `x` it meets: the tracked cast of
/// mixed precision (its backward casts the gradient back to the parameter's f32), and the
/// identity (no graph node) when the dtypes already agree.
fn like(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    Ok(w.to_dtype(x.dtype())?)
}

/// `x · W + b` with a Conv1D weight `[in, out]`.
fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(x.linear(&like(w, x)?, &like(b, x)?)?)
}

fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(x.layer_norm(&like(w, x)?, &like(b, x)?, eps)?)
}

fn mlp(x: &Tensor, w: &BlockWeights<Tensor>) -> Result<Tensor> {
    let h = linear(x, &w.c_fc_weight, &w.c_fc_bias)?.gelu()?;
    linear(&h, &w.mlp_c_proj_weight, &w.mlp_c_proj_bias)
}

impl Gpt {
    /// A model with GPT-2's initialisation, drawn from `seed`: weights N(0, initializer_range),
    /// residual projections (`c_proj`) N(0, initializer_range/√(2·n_layer)), biases 0,
    /// LayerNorm gains 1. Parameters are drawn in HF order from one generator.
    pub fn new(config: GptConfig, seed: u64) -> Result<Gpt> {
        config.validate()?;
        let mut rng = Rng::new(seed);
        let std = config.initializer_range;
        let proj_std = std / ((2 * config.n_layer) as f32).sqrt();
        let params = GptWeights::build(&config, |spec| -> Result<Parameter> {
            let t = match spec.kind {
                ParamKind::Embedding | ParamKind::Linear => {
                    Tensor::randn_with(&spec.shape, 0.0, std, &mut rng)
                }
                ParamKind::ResidualProjection => {
                    Tensor::randn_with(&spec.shape, 0.0, proj_std, &mut rng)
                }
                ParamKind::Bias | ParamKind::NormBias => Tensor::zeros(&spec.shape),
                ParamKind::NormWeight => Tensor::ones(&spec.shape),
            };
            Ok(Parameter::new(t))
        })?;
        Ok(Gpt::on_cpu(config, params))
    }

    fn on_cpu(config: GptConfig, params: GptWeights<Parameter>) -> Gpt {
        Gpt {
            config,
            params,
            device: Device::Cpu,
            precision: Precision::F32,
        }
    }

    /// A model with the given weights (names as in [`Gpt::named_parameters`]; f32, bf16 or f16,
    /// converted to f32). Accepts checkpoints written by transformers: names with or without
    /// the `transformer.` prefix, and ignores the tied `lm_head.weight` and the causal-mask
    /// buffers (`attn.bias`, `attn.masked_bias`) older versions saved. Any other unknown name,
    /// a missing parameter or a wrong shape is an error naming it.
    pub fn from_named_tensors(config: GptConfig, tensors: HashMap<String, Tensor>) -> Result<Gpt> {
        config.validate()?;
        let mut by_name: HashMap<String, Tensor> = HashMap::with_capacity(tensors.len());
        for (name, t) in tensors {
            let canonical = if name.starts_with("transformer.") || name.starts_with("lm_head.") {
                name.clone()
            } else {
                format!("transformer.{name}")
            };
            if by_name.insert(canonical.clone(), t).is_some() {
                return Err(ModelError::invalid(
                    "load weights",
                    format!(
                        "{canonical} is given twice (with and without the transformer. prefix)"
                    ),
                ));
            }
        }
        let params = GptWeights::build(&config, |spec| -> Result<Parameter> {
            let t = by_name.remove(&spec.name).ok_or_else(|| {
                ModelError::invalid("load weights", format!("missing parameter {}", spec.name))
            })?;
            if t.shape() != spec.shape.as_slice() {
                return Err(ModelError::invalid(
                    "load weights",
                    format!(
                        "{} has shape {:?}, the config needs {:?}",
                        spec.name,
                        t.shape(),
                        spec.shape
                    ),
                ));
            }
            let t = match t.dtype() {
                DType::F32 => t,
                DType::BF16 | DType::F16 => t.to_dtype(DType::F32)?,
                other => {
                    return Err(ModelError::invalid(
                        "load weights",
                        format!("{} has dtype {other}; expected a float type", spec.name),
                    ))
                }
            };
            Ok(Parameter::new(t.contiguous()?.detach()))
        })?;
        if let Some(head) = by_name.remove("lm_head.weight") {
            let want = [config.vocab_size, config.n_embd];
            if head.shape() != want {
                return Err(ModelError::invalid(
                    "load weights",
                    format!(
                        "lm_head.weight has shape {:?}, expected {want:?} (tied to wte)",
                        head.shape()
                    ),
                ));
            }
        }
        by_name.retain(|n, _| !(n.ends_with(".attn.bias") || n.ends_with(".attn.masked_bias")));
        if !by_name.is_empty() {
            let mut names: Vec<_> = by_name.into_keys().collect();
            names.sort();
            return Err(ModelError::invalid(
                "load weights",
                format!("unexpected tensors: {}", names.join(", ")),
            ));
        }
        Ok(Gpt::on_cpu(config, params))
    }

    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    /// The device the parameters live on and the forward runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The compute precision (see the module docs).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Moves every parameter (f32) to `device`, keeping the parameter handles: optimisers and
    /// heads built from [`Gpt::named_parameters`] see the moved values. Accumulated gradients
    /// are cleared. Build a [`crate::Trainer`] after moving, so its optimiser state is created
    /// beside the parameters. A CUDA device that does not exist is an error, and the model is
    /// then left where it was. Moving to the CPU sets the precision to f32 (the CPU's only one).
    pub fn to_device(&mut self, device: Device) -> Result<()> {
        if device == self.device {
            return Ok(());
        }
        // Copy everything first, so a failure (no GPU, out of memory) changes nothing.
        let moved = self
            .params
            .named()
            .into_iter()
            .map(|(_, p)| Ok(p.tensor().detach().to_device(device)?.detach()))
            .collect::<Result<Vec<Tensor>>>()?;
        for ((_, p), t) in self.params.named().into_iter().zip(&moved) {
            p.set(t)?;
            p.zero_grad();
        }
        self.device = device;
        if device == Device::Cpu {
            self.precision = Precision::F32;
        }
        Ok(())
    }

    /// Sets the compute precision. [`Precision::Bf16`] needs the model on a CUDA device (the
    /// CPU kernels compute in f32).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        check_precision(self.device, precision)?;
        self.precision = precision;
        Ok(())
    }

    /// The parameters with their HF names, in `GPT2LMHeadModel.named_parameters()` order.
    /// The handles share the model's parameters (an optimiser built from them updates the model).
    pub fn named_parameters(&self) -> Vec<(String, Parameter)> {
        self.params
            .named()
            .into_iter()
            .map(|(n, p)| (n, p.clone()))
            .collect()
    }

    pub fn parameters(&self) -> Vec<Parameter> {
        self.named_parameters()
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    }

    /// The current parameter values, untracked, by HF name (for checkpoints and copies).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .named()
            .into_iter()
            .map(|(n, p)| (n, p.tensor().detach()))
            .collect()
    }

    /// An independent model with the same config and current values (the frozen reference
    /// policy in RLHF, say). Values share storage until either model's optimiser replaces them;
    /// parameters are never written in place, so the two never affect each other.
    pub fn deep_clone(&self) -> Gpt {
        Gpt {
            config: self.config.clone(),
            params: self.params.map(|p| Parameter::new(p.tensor().detach())),
            device: self.device,
            precision: self.precision,
        }
    }

    /// Copies another model's values into this one (same config); e.g. EMA or reset. Values
    /// on another device are copied to this model's.
    pub fn copy_from(&self, other: &Gpt) -> Result<()> {
        for ((name, dst), (_, src)) in self.params.named().into_iter().zip(other.params.named()) {
            let value = src.tensor().detach().to_device(self.device)?.detach();
            dst.set(&value)
                .map_err(|e| ModelError::invalid("copy_from", format!("{name}: {e}")))?;
        }
        Ok(())
    }

    /// This forward's weights: the parameters' current values (tracked outside no-grad mode).
    pub fn weights(&self) -> GptWeights<Tensor> {
        self.params.map(|p| p.tensor())
    }

    /// Validates token ids against the vocabulary and returns them as i64.
    fn checked_ids(&self, op: &'static str, ids: &Tensor) -> Result<Vec<i64>> {
        let v = ids.to_i64_vec()?;
        if let Some((pos, &bad)) = v
            .iter()
            .enumerate()
            .find(|(_, &i)| i < 0 || i as usize >= self.config.vocab_size)
        {
            return Err(ModelError::invalid(
                op,
                format!(
                    "token id {bad} at flat position {pos} is outside the vocabulary of {}",
                    self.config.vocab_size
                ),
            ));
        }
        Ok(v)
    }

    /// Hidden states `[B, T, d]` (after the final LayerNorm) of token ids `[B, T]` (any integer
    /// dtype) at positions `0..T`. With `dropout_seed`, dropout is applied as in training, the
    /// same seed dropping the same activations; `None` is evaluation mode.
    pub fn hidden_states(&self, ids: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        self.hidden_states_with(&self.weights(), ids, dropout_seed)
    }

    /// As [`Gpt::hidden_states`] with explicit weights (gradient checks substitute their own
    /// tensors for some parameters).
    pub fn hidden_states_with(
        &self,
        w: &GptWeights<Tensor>,
        ids: &Tensor,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        let c = &self.config;
        if ids.rank() != 2 {
            return Err(ModelError::invalid(
                "hidden_states",
                format!("ids must be [batch, time], got shape {:?}", ids.shape()),
            ));
        }
        let (b, t) = (ids.shape()[0], ids.shape()[1]);
        if t == 0 || t > c.n_positions {
            return Err(ModelError::invalid(
                "hidden_states",
                format!(
                    "sequence length {t} must be in 1..={} (n_positions)",
                    c.n_positions
                ),
            ));
        }
        // Ids and positions stay on the host, already checked: the embedding uploads them
        // without the device-side check (and the wait for its result) that GPU-resident ids get.
        let ids = Tensor::from_vec(self.checked_ids("hidden_states", ids)?, &[b, t])?;
        check_precision(self.device, self.precision)?;
        let mut drop = Dropout::new(dropout_seed);
        let positions = Tensor::from_vec((0..t as i64).collect::<Vec<_>>(), &[t])?;
        let x = self.embed(w, &ids, &positions)?;
        let mut x = drop.apply(x, c.embd_pdrop)?;
        let h = c.n_head;
        for bw in &w.h {
            let a = layer_norm(&x, &bw.ln_1_weight, &bw.ln_1_bias, c.layer_norm_epsilon)?;
            let qkv = linear(&a, &bw.c_attn_weight, &bw.c_attn_bias)?;
            // The fused op splits and merges heads itself, drops attention probabilities
            // inside the kernels (no T×T matrix, with or without dropout), and its backward
            // writes d(qkv) in one buffer.
            let att =
                Tensor::causal_self_attention_dropout(&qkv, h, drop.attention(c.attn_pdrop)?)?;
            let att = linear(&att, &bw.attn_c_proj_weight, &bw.attn_c_proj_bias)?;
            x = x.add(&drop.apply(att, c.resid_pdrop)?)?;
            let m = mlp(
                &layer_norm(&x, &bw.ln_2_weight, &bw.ln_2_bias, c.layer_norm_epsilon)?,
                bw,
            )?;
            x = x.add(&drop.apply(m, c.resid_pdrop)?)?;
        }
        layer_norm(&x, &w.ln_f_weight, &w.ln_f_bias, c.layer_norm_epsilon)
    }

    /// Token plus position embeddings in the compute dtype. The tables are read as given (f32
    /// parameters) and the looked-up rows cast, so both uses of `wte` (here and the LM head)
    /// return f32 gradients to it.
    fn embed(&self, w: &GptWeights<Tensor>, ids: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let dtype = self.precision.compute_dtype();
        let tokens = Tensor::embedding(ids, &w.wte)?.to_dtype(dtype)?;
        let positions = Tensor::embedding(positions, &w.wpe)?.to_dtype(dtype)?;
        Ok(tokens.add(&positions)?)
    }

    /// Logits `[.., vocab]` of hidden states `[.., d]` through the tied head: hidden · wteᵀ,
    /// with wteᵀ a transposed view (the matmul reads it through its strides; nothing is copied).
    /// The logits have the hidden states' dtype (bf16 under mixed precision; the loss reads
    /// them in f32).
    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let wte = self.params.wte.tensor();
        Ok(hidden.matmul(&like(&wte, hidden)?.t()?)?)
    }

    /// As [`Gpt::lm_logits`] with explicit weights.
    pub fn lm_logits_with(w: &GptWeights<Tensor>, hidden: &Tensor) -> Result<Tensor> {
        Ok(hidden.matmul(&like(&w.wte, hidden)?.t()?)?)
    }

    /// Logits of `hidden` for a cross-entropy against targets below the vocabulary size: those
    /// of [`Gpt::lm_logits_with`], except for bf16 compute on a GPU with a vocabulary that is
    /// not a multiple of 8 (GPT-2's 50257). Then the bf16 head is padded with zero rows to a
    /// multiple of 128 and the padded columns' logits are set to −∞: the result is
    /// `[.., padded vocab]`, and its cross-entropy equals the unpadded one (the padded columns
    /// have probability 0 and receive zero gradient). Why: the two backward GEMMs read the
    /// logits' gradient as an operand with the vocabulary as leading dimension, and the
    /// tensor-core kernels need one that is a multiple of 8; with 50257 both would fall back
    /// to the SIMT kernel, the slowest part of a GPT-2 step.
    pub fn loss_logits_with(&self, w: &GptWeights<Tensor>, hidden: &Tensor) -> Result<Tensor> {
        let v = self.config.vocab_size;
        if hidden.device() == Device::Cpu || hidden.dtype() != DType::BF16 || v.is_multiple_of(8) {
            return Gpt::lm_logits_with(w, hidden);
        }
        let (padded, d) = (v.next_multiple_of(128), self.config.n_embd);
        let device = hidden.device();
        let zeros = Tensor::zeros(&[padded - v, d])
            .to_dtype(DType::BF16)?
            .to_device(device)?;
        let head = Tensor::concat(&[&like(&w.wte, hidden)?, &zeros], 0)?;
        let mut mask = vec![0.0f32; padded];
        mask[v..].fill(f32::NEG_INFINITY);
        let mask = Tensor::from_vec(mask, &[padded])?
            .to_dtype(DType::BF16)?
            .to_device(device)?;
        Ok(hidden.matmul(&head.t()?)?.add(&mask)?)
    }

    /// Logits `[B, T, vocab]` of ids `[B, T]`: [`Gpt::hidden_states`] then [`Gpt::lm_logits`].
    pub fn logits(&self, ids: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        self.lm_logits(&self.hidden_states(ids, dropout_seed)?)
    }

    /// Feeds `new_ids[i]` (one or more tokens) to sequence i, whose earlier tokens are in
    /// `caches[i]`, appending their keys and values to the cache. Returns the hidden states of
    /// the new tokens, all sequences packed in order: `[Σ len(new_ids[i]), d]`.
    ///
    /// Each sequence continues at its own position (`caches[i].len()`), so prompts of different
    /// lengths batch without padding. No dropout (evaluation mode); meant to run in
    /// [`rlhf_tensor::no_grad`].
    pub fn hidden_states_cached(
        &self,
        new_ids: &[&[u32]],
        caches: &mut [KvCache],
    ) -> Result<Tensor> {
        let c = &self.config;
        let op = "hidden_states_cached";
        if new_ids.len() != caches.len() || new_ids.is_empty() {
            return Err(ModelError::invalid(
                op,
                format!(
                    "{} token lists for {} caches (need the same, non-zero number)",
                    new_ids.len(),
                    caches.len()
                ),
            ));
        }
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        for (i, (ids, cache)) in new_ids.iter().zip(caches.iter()).enumerate() {
            if ids.is_empty() {
                return Err(ModelError::invalid(
                    op,
                    format!("sequence {i} has no new tokens"),
                ));
            }
            if cache.n_layer() != c.n_layer {
                return Err(ModelError::invalid(
                    op,
                    format!(
                        "cache {i} has {} layers, the model {}",
                        cache.n_layer(),
                        c.n_layer
                    ),
                ));
            }
            let end = cache.len() + ids.len();
            if end > c.n_positions {
                return Err(ModelError::invalid(
                    op,
                    format!(
                        "sequence {i} would reach {end} tokens, past the context of {}",
                        c.n_positions
                    ),
                ));
            }
            tokens.extend(ids.iter().map(|&t| i64::from(t)));
            positions.extend((cache.len()..end).map(|p| p as i64));
        }
        let n = tokens.len();
        let tokens = Tensor::from_vec(tokens, &[n])?;
        self.checked_ids(op, &tokens)?;
        check_precision(self.device, self.precision)?;
        // Host ids and positions, checked: uploaded by the embedding without a device wait.
        let positions = Tensor::from_vec(positions, &[n])?;
        let w = self.weights();
        let mut x = self.embed(&w, &tokens, &positions)?;
        let (h, dh, d) = (c.n_head, c.head_dim(), c.n_embd);
        for (layer, bw) in w.h.iter().enumerate() {
            let a = layer_norm(&x, &bw.ln_1_weight, &bw.ln_1_bias, c.layer_norm_epsilon)?;
            let qkv = linear(&a, &bw.c_attn_weight, &bw.c_attn_bias)?;
            let mut outs = Vec::with_capacity(new_ids.len());
            let mut row = 0;
            for (ids, cache) in new_ids.iter().zip(caches.iter_mut()) {
                let len = ids.len();
                // This sequence's rows [len, 3d] → [3, H, len, Dh].
                let part = qkv
                    .narrow(0, row, len)?
                    .reshape_to(&[len, 3, h, dh])?
                    .permute(&[1, 2, 0, 3])?;
                let q = part.narrow(0, 0, 1)?.squeeze(0)?;
                let k_new = part.narrow(0, 1, 1)?.squeeze(0)?;
                let v_new = part.narrow(0, 2, 1)?.squeeze(0)?;
                let (k, v) = cache.append(layer, &k_new, &v_new)?;
                let o = Tensor::causal_attention(&q, &k, &v)?;
                outs.push(o.permute(&[1, 0, 2])?.reshape_to(&[len, d])?);
                row += len;
            }
            let att = if outs.len() == 1 {
                outs.pop().expect("one output")
            } else {
                Tensor::concat(&outs.iter().collect::<Vec<_>>(), 0)?
            };
            x = x.add(&linear(&att, &bw.attn_c_proj_weight, &bw.attn_c_proj_bias)?)?;
            let m = mlp(
                &layer_norm(&x, &bw.ln_2_weight, &bw.ln_2_bias, c.layer_norm_epsilon)?,
                bw,
            )?;
            x = x.add(&m)?;
        }
        for (ids, cache) in new_ids.iter().zip(caches.iter_mut()) {
            cache.advance(ids.len());
        }
        layer_norm(&x, &w.ln_f_weight, &w.ln_f_bias, c.layer_norm_epsilon)
    }

    /// Fresh, empty caches for `n` sequences.
    pub fn new_caches(&self, n: usize) -> Vec<KvCache> {
        (0..n).map(|_| KvCache::new(self.config.n_layer)).collect()
    }

    /// Names and shapes this config's model has, in HF order (for checkpoint validation).
    pub fn expected_shapes(config: &GptConfig) -> Vec<(String, Vec<usize>)> {
        param_specs(config)
            .into_iter()
            .map(|s| (s.name, s.shape))
            .collect()
    }
}

/// Bf16 compute only on a GPU: the CPU kernels compute in f32.
fn check_precision(device: Device, precision: Precision) -> Result<()> {
    if precision == Precision::Bf16 && device == Device::Cpu {
        return Err(ModelError::invalid(
            "precision",
            "bf16 compute runs on CUDA devices only (the CPU kernels compute in f32); move the \
             model with to_device first, or use f32",
        ));
    }
    Ok(())
}

/// Builds a right-padded `[B, T_max]` i64 id tensor from token lists, with `pad` after each
/// sequence, and a `[B, T_max]` f32 mask that is 1 on real tokens and 0 on padding.
pub fn pad_batch(seqs: &[Vec<u32>], pad: u32) -> Result<(Tensor, Tensor)> {
    let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
    if seqs.is_empty() || t == 0 {
        return Err(ModelError::invalid("pad_batch", "no tokens to batch"));
    }
    let mut ids = Vec::with_capacity(seqs.len() * t);
    let mut mask = Vec::with_capacity(seqs.len() * t);
    for s in seqs {
        ids.extend(s.iter().map(|&x| i64::from(x)));
        ids.extend(std::iter::repeat_n(i64::from(pad), t - s.len()));
        mask.extend(std::iter::repeat_n(1.0f32, s.len()));
        mask.extend(std::iter::repeat_n(0.0f32, t - s.len()));
    }
    Ok((
        Tensor::from_vec(ids, &[seqs.len(), t])?,
        Tensor::from_vec(mask, &[seqs.len(), t])?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_parses_and_bf16_needs_a_gpu() {
        assert_eq!(Precision::parse("BF16").unwrap(), Precision::Bf16);
        assert_eq!(Precision::parse("f32").unwrap(), Precision::F32);
        assert_eq!(Precision::Bf16.to_string(), "bf16");
        assert!(Precision::parse("f16").is_err());
        let mut m = Gpt::new(GptConfig::preset("tiny").unwrap(), 0).unwrap();
        let msg = m.set_precision(Precision::Bf16).unwrap_err().to_string();
        assert!(msg.contains("CUDA devices only"), "{msg}");
        assert_eq!(m.precision(), Precision::F32);
        m.set_precision(Precision::F32).unwrap();
    }

    #[test]
    fn moving_to_a_missing_gpu_is_an_error_that_changes_nothing() {
        let mut m = Gpt::new(GptConfig::preset("tiny").unwrap(), 0).unwrap();
        let before = m.named_tensors();
        match m.to_device(Device::Cuda(1 << 20)) {
            Ok(()) => panic!("no machine has that many GPUs"),
            Err(e) => assert!(matches!(e, ModelError::Tensor(_)), "{e}"),
        }
        assert_eq!(m.device(), Device::Cpu);
        for ((name, a), (_, b)) in before.iter().zip(m.named_tensors()) {
            assert_eq!(b.device(), Device::Cpu, "{name}");
            assert!(a.shares_storage(&b), "{name}");
        }
        m.to_device(Device::Cpu).unwrap();
    }

    #[test]
    fn attention_dropout_is_active_only_in_training() {
        // The training forward (a dropout seed) drops attention probabilities through the
        // fused op; evaluation (no seed) and p = 0 leave them alone.
        let mut drop = Dropout::new(Some(5));
        let a = drop.attention(0.1).unwrap().expect("training drops");
        assert_eq!(a.p(), 0.1);
        // One seed per site, in order: the next site gets another one.
        assert_ne!(drop.attention(0.1).unwrap().unwrap().seed(), a.seed());
        assert!(drop.attention(0.0).unwrap().is_none());
        assert!(Dropout::new(None).attention(0.1).unwrap().is_none());
        assert!(Dropout::new(Some(1)).attention(1.0).is_err());
    }
}
