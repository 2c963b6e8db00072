//! Causal self-attention: softmax(Q·Kᵀ/√d + causal mask)·V.
//!
//! [`Tensor::causal_attention`] runs the fused CPU kernel (flash-attention style: blocks of
//! queries and keys with an online softmax, so no T×T matrix per head is ever held) and its
//! fused backward. [`Tensor::causal_attention_reference`] composes the same maths from matmul,
//! masked_fill and softmax; tests hold the two equal, forward and backward.
//!
//! Queries may be fewer than keys (decoding with a KV cache): query i of Tq sits at absolute
//! position Tk - Tq + i and sees keys 0..=that position.
//!
//! Dropout on the probabilities (`*_dropout`, training with `attn_pdrop > 0`) is fused into the
//! same kernels, CPU and CUDA: which elements drop is a hash of the seed and each element's
//! (head, query, key) indices ([`AttentionDropout`]), so the backward re-derives the mask
//! instead of storing it, and the reference, the fused CPU kernel and the GPU kernels drop the
//! same elements. The head index is the row-major flattening of the leading dims (b·H + h).

use crate::cpu::attention::{
    causal_attention_backward, causal_attention_forward, AttentionDropout, AttentionShape,
};
use crate::cpu::pool::Pooled;
use crate::{Error, Result, Tensor};
use rayon::prelude::*;

/// Checks q [.., Tq, D] against k, v [.., Tk, D] and returns (leading dims, shape).
fn attention_shape(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Vec<usize>, AttentionShape)> {
    let bad = |other: &Tensor| Error::ShapeMismatch {
        op: "causal_attention",
        lhs: q.shape().to_vec(),
        rhs: other.shape().to_vec(),
    };
    let r = q.rank();
    if r < 2 {
        return Err(Error::invalid(
            "causal_attention",
            format!("q must be [.., T, D], got {:?}", q.shape()),
        ));
    }
    for t in [k, v] {
        if t.rank() != r
            || t.shape()[..r - 2] != q.shape()[..r - 2]
            || t.shape()[r - 1] != q.shape()[r - 1]
        {
            return Err(bad(t));
        }
    }
    if k.shape() != v.shape() {
        return Err(bad(v));
    }
    let (tq, tk, d) = (q.shape()[r - 2], k.shape()[r - 2], q.shape()[r - 1]);
    if tq > tk {
        return Err(Error::invalid(
            "causal_attention",
            format!("{tq} queries but only {tk} keys"),
        ));
    }
    let lead = q.shape()[..r - 2].to_vec();
    let bh = lead.iter().product();
    Ok((lead, AttentionShape { bh, tq, tk, d }))
}

impl Tensor {
    /// Fused causal attention over the last two dims (batch and head dims lead), scale 1/√D.
    ///
    /// On a CUDA device this runs kernels/flash_attention.cu (the `cuda` module of this file
    /// says which kernel, the head dims it supports and the fallback for other head dims).
    pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        Tensor::causal_attention_dropout(q, k, v, None)
    }

    /// [`Tensor::causal_attention`] with dropout on the probabilities (`None`: none), fused:
    /// still no T×T matrix. The element dropped for (head, query i, key j) depends only on the
    /// seed and those indices ([`AttentionDropout`]), on every device.
    pub fn causal_attention_dropout(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        drop: Option<AttentionDropout>,
    ) -> Result<Tensor> {
        let (_, shape) = attention_shape(q, k, v)?;
        #[cfg(feature = "cuda")]
        if let Some(dev) = super::cuda_inputs("causal_attention", &[q, k, v])? {
            return cuda::causal_attention(&dev, q, k, v, shape.d, drop);
        }
        let scale = 1.0 / (shape.d.max(1) as f32).sqrt();
        if q.numel() == 0 {
            // Nothing to attend with (no heads, no queries or zero-width heads): an empty or
            // zero-width result, and zero gradients, without calling the kernel.
            let out = Tensor::zeros(q.shape());
            let shapes = (q.shape().to_vec(), k.shape().to_vec(), v.shape().to_vec());
            return Ok(Tensor::record(
                out,
                "causal_attention",
                &[q, k, v],
                move |_| {
                    Ok(vec![
                        Some(Tensor::zeros(&shapes.0)),
                        Some(Tensor::zeros(&shapes.1)),
                        Some(Tensor::zeros(&shapes.2)),
                    ])
                },
            ));
        }
        let (qc, kc, vc) = (
            q.contiguous()?.detach(),
            k.contiguous()?.detach(),
            v.contiguous()?.detach(),
        );
        let mut out = crate::cpu::pool::zeroed(q.numel());
        let mut lse = crate::cpu::pool::zeroed(shape.bh * shape.tq);
        causal_attention_forward(
            shape,
            scale,
            drop,
            &qc.f32_data()?,
            &kc.f32_data()?,
            &vc.f32_data()?,
            &mut out,
            &mut lse,
        )?;
        let out = Tensor::f32_owned(out, q.shape());
        let saved_out = out.clone();
        Ok(Tensor::record(
            out,
            "causal_attention",
            &[q, k, v],
            move |g| {
                let g = g.contiguous()?;
                let (mut dq, mut dk, mut dv) = (
                    crate::cpu::pool::zeroed(qc.numel()),
                    crate::cpu::pool::zeroed(kc.numel()),
                    crate::cpu::pool::zeroed(vc.numel()),
                );
                causal_attention_backward(
                    shape,
                    scale,
                    drop,
                    &qc.f32_data()?,
                    &kc.f32_data()?,
                    &vc.f32_data()?,
                    &saved_out.f32_data()?,
                    &lse,
                    &g.f32_data()?,
                    &mut dq,
                    &mut dk,
                    &mut dv,
                )?;
                Ok(vec![
                    Some(Tensor::f32_owned(dq, qc.shape())),
                    Some(Tensor::f32_owned(dk, kc.shape())),
                    Some(Tensor::f32_owned(dv, vc.shape())),
                ])
            },
        ))
    }

    /// The same attention composed from primitives (holds the full score matrix): the
    /// reference the fused kernel is tested against.
    pub fn causal_attention_reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        Tensor::causal_attention_reference_dropout(q, k, v, None)
    }

    /// [`Tensor::causal_attention_dropout`] composed from primitives: the softmax times an
    /// explicit [.., Tq, Tk] keep mask (0 or 1), times 1/(1-p), then the product with v.
    pub fn causal_attention_reference_dropout(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        drop: Option<AttentionDropout>,
    ) -> Result<Tensor> {
        let (lead, s) = attention_shape(q, k, v)?;
        let scale = 1.0 / (s.d.max(1) as f32).sqrt();
        let mut mask = vec![0u8; s.tq * s.tk];
        for i in 0..s.tq {
            for j in (s.tk - s.tq + i + 1)..s.tk {
                mask[i * s.tk + j] = 1;
            }
        }
        let mask = Tensor::from_vec(mask, &[s.tq, s.tk])?;
        let scores = q.matmul(&k.t()?)?.mul_scalar(scale)?;
        let scores = scores.masked_fill(&mask, f32::NEG_INFINITY)?;
        let probs = scores.softmax(-1)?;
        let Some(drop) = drop.filter(AttentionDropout::is_active) else {
            return probs.matmul(v);
        };
        let mut keep = Vec::with_capacity(s.bh * s.tq * s.tk);
        for bh in 0..s.bh {
            for i in 0..s.tq {
                let row = drop.row(bh, i);
                keep.extend((0..s.tk).map(|j| if row.keeps(j) { 1.0 } else { 0.0 }));
            }
        }
        let mut shape = lead;
        shape.extend([s.tq, s.tk]);
        // 0/1 is exact in every dtype; the scale is applied by mul_scalar in f32 (1/(1-p)
        // itself is not a bf16 value), so a bf16 reference is not biased by its rounding.
        let keep = Tensor::f32_owned(keep, &shape)
            .to_dtype(probs.dtype())?
            .to_device(probs.device())?;
        probs.mul(&keep)?.mul_scalar(drop.scale())?.matmul(v)
    }
}

/// Copies one row of head values; the 16-wide pieces have a compile-time length, so they
/// compile to vector moves instead of a memcpy call per (typically 64-float) row.
#[inline]
fn copy_row(dst: &mut [f32], src: &[f32]) {
    let (d16, d_tail) = dst.as_chunks_mut::<16>();
    let (s16, s_tail) = src.as_chunks::<16>();
    for (d, s) in d16.iter_mut().zip(s16) {
        *d = *s;
    }
    d_tail.copy_from_slice(s_tail);
}

/// Rows of `dh` values move between the token-major layout [B, T, S, H, Dh] (a fused QKV
/// projection with S = 3, or merged heads [B, T, H·Dh] with S = 1) and S head-major buffers
/// [B, H, T, Dh]. Each batch element owns one contiguous chunk of every buffer, so the batch
/// elements run in parallel.
fn per_batch<T: Send>(chunks: Vec<Vec<T>>, b: usize) -> Vec<Vec<T>> {
    // chunks[s][bi] → jobs[bi][s]
    let mut jobs: Vec<Vec<T>> = (0..b).map(|_| Vec::new()).collect();
    for part in chunks {
        for (bi, c) in part.into_iter().enumerate() {
            jobs[bi].push(c);
        }
    }
    jobs
}

/// Token-major `packed` [B, T, S, H, Dh] → S head-major buffers [B, H, T, Dh].
fn to_heads(packed: &[f32], heads: &mut [Vec<f32>], dims: (usize, usize, usize, usize)) {
    let (b, t, h, dh) = dims;
    let per = h * t * dh;
    let np = heads.len();
    if per == 0 {
        return;
    }
    let chunks = heads
        .iter_mut()
        .map(|v| v.chunks_mut(per).collect())
        .collect();
    per_batch(chunks, b)
        .into_par_iter()
        .zip(packed.par_chunks(np * per))
        .for_each(|(mut dst, src)| {
            for ti in 0..t {
                for (s, d) in dst.iter_mut().enumerate() {
                    for hi in 0..h {
                        let from = &src[((ti * np + s) * h + hi) * dh..][..dh];
                        copy_row(&mut d[(hi * t + ti) * dh..][..dh], from);
                    }
                }
            }
        });
}

/// The inverse of [`to_heads`].
fn from_heads(heads: &[&[f32]], packed: &mut [f32], dims: (usize, usize, usize, usize)) {
    let (b, t, h, dh) = dims;
    let per = h * t * dh;
    let np = heads.len();
    if per == 0 {
        return;
    }
    let chunks = heads.iter().map(|v| v.chunks(per).collect()).collect();
    per_batch(chunks, b)
        .into_par_iter()
        .zip(packed.par_chunks_mut(np * per))
        .for_each(|(src, dst)| {
            for ti in 0..t {
                for (s, from) in src.iter().enumerate() {
                    for hi in 0..h {
                        let d = &mut dst[((ti * np + s) * h + hi) * dh..][..dh];
                        copy_row(d, &from[(hi * t + ti) * dh..][..dh]);
                    }
                }
            }
        });
}

/// The fused projection [B, T, 3·H·Dh] split into Q, K and V, each [B, H, T, Dh].
fn split_qkv(fused: &[f32], dims: (usize, usize, usize, usize)) -> [Vec<f32>; 3] {
    let n = fused.len() / 3;
    // Every row of every part is copied in: pooled buffers need no clearing.
    let mut parts = [0, 1, 2].map(|_| crate::cpu::pool::for_overwrite(n));
    to_heads(fused, &mut parts, dims);
    parts
}

/// The inverse of [`split_qkv`].
fn merge_qkv(parts: &[Vec<f32>; 3], dims: (usize, usize, usize, usize)) -> Vec<f32> {
    let mut fused = crate::cpu::pool::for_overwrite(3 * parts[0].len());
    from_heads(&[&parts[0], &parts[1], &parts[2]], &mut fused, dims);
    fused
}

/// [B, H, T, Dh] → [B, T, H·Dh].
fn merge_heads(heads: &[f32], dims: (usize, usize, usize, usize)) -> Vec<f32> {
    let mut merged = crate::cpu::pool::for_overwrite(heads.len());
    from_heads(&[heads], &mut merged, dims);
    merged
}

/// [B, T, H·Dh] → [B, H, T, Dh].
fn split_heads(merged: &[f32], dims: (usize, usize, usize, usize)) -> Vec<f32> {
    let mut heads = [crate::cpu::pool::for_overwrite(merged.len())];
    to_heads(merged, &mut heads, dims);
    let [heads] = heads;
    heads
}

impl Tensor {
    /// Causal multi-head self-attention straight from a fused projection: `qkv` is
    /// [B, T, 3·D] holding Q, K and V (each `n_head` heads of D/n_head), the result [B, T, D]
    /// with heads merged, as GPT-2's c_attn → attention → c_proj path needs.
    ///
    /// The same maths as splitting `qkv` with views and calling [`Tensor::causal_attention`],
    /// fused because that path's backward builds three zero-padded copies of d(qkv) (one per
    /// narrow) and adds them; here the backward writes d(qkv) once. Tests hold the two equal.
    ///
    /// On a CUDA device Q, K and V are read straight out of `qkv` by the flash-attention
    /// kernels and d(qkv) is written into one packed buffer (no split or merge copies).
    pub fn causal_self_attention(qkv: &Tensor, n_head: usize) -> Result<Tensor> {
        Tensor::causal_self_attention_dropout(qkv, n_head, None)
    }

    /// [`Tensor::causal_self_attention`] with dropout on the probabilities (`None`: none),
    /// fused as in [`Tensor::causal_attention_dropout`]; head b·H + h of the packed input is
    /// head index b·H + h of [`AttentionDropout`].
    pub fn causal_self_attention_dropout(
        qkv: &Tensor,
        n_head: usize,
        drop: Option<AttentionDropout>,
    ) -> Result<Tensor> {
        let bad = || {
            Error::invalid(
                "causal_self_attention",
                format!(
                    "qkv must be [batch, time, 3·d] with d divisible by {n_head} heads, got {:?}",
                    qkv.shape()
                ),
            )
        };
        if qkv.rank() != 3
            || n_head == 0
            || !qkv.shape()[2].is_multiple_of(3 * n_head)
            || qkv.shape()[2] == 0
        {
            return Err(bad());
        }
        let (b, t, d3) = (qkv.shape()[0], qkv.shape()[1], qkv.shape()[2]);
        #[cfg(feature = "cuda")]
        if let Some(dev) = super::cuda_inputs("causal_self_attention", &[qkv])? {
            return cuda::causal_self_attention(&dev, qkv, n_head, drop);
        }
        let (d, dh) = (d3 / 3, d3 / 3 / n_head);
        let dims = (b, t, n_head, dh);
        let n = b * t * d;
        let shape = AttentionShape {
            bh: b * n_head,
            tq: t,
            tk: t,
            d: dh,
        };
        let scale = 1.0 / (dh as f32).sqrt();
        // Pooled: the backward closure keeps these until the graph is freed, then the next
        // step's forward reuses them.
        let [q, k, v] = split_qkv(&qkv.f32_data()?, dims).map(Pooled);
        // The forward writes every output row and its lse (each query sees at least one key).
        let mut out = Pooled(crate::cpu::pool::for_overwrite(n));
        let mut lse = Pooled(crate::cpu::pool::for_overwrite(b * n_head * t));
        if n > 0 {
            causal_attention_forward(shape, scale, drop, &q, &k, &v, &mut out, &mut lse)?;
        }
        let result = Tensor::f32_owned(merge_heads(&out, dims), &[b, t, d]);
        Ok(Tensor::record(
            result,
            "causal_self_attention",
            &[qkv],
            move |g| {
                let dout = Pooled(split_heads(&g.f32_data()?, dims));
                let mut d = [0, 1, 2].map(|_| crate::cpu::pool::zeroed(n));
                if n > 0 {
                    let [dq, dk, dv] = &mut d;
                    causal_attention_backward(
                        shape, scale, drop, &q, &k, &v, &out, &lse, &dout, dq, dk, dv,
                    )?;
                }
                let dqkv = merge_qkv(&d, dims);
                d.into_iter().for_each(crate::cpu::pool::recycle);
                Ok(vec![Some(Tensor::f32_owned(dqkv, &[b, t, d3]))])
            },
        ))
    }
}

/// CUDA dispatch of [`Tensor::causal_attention`] and [`Tensor::causal_self_attention`]
/// through kernels/flash_attention.cu (read its header for layouts and launch shapes).
///
/// Kernels: the forward is `flash_attn_fwd_mma_bf16_d{64,128}` (tensor cores) for bf16 operands
/// that meet its alignment rules (16-byte aligned, every batch, head and time stride a multiple
/// of 8 elements), otherwise the SIMT `flash_attn_fwd_{f32,bf16}_d{32,64,128}`. The forward
/// saves the per-row logsumexp (f32); the backward is `flash_attn_bwd_delta_T`, then the dK/dV
/// and dQ kernels, which recompute the probabilities from it: the tensor-core
/// `flash_attn_bwd_{dkdv,dq}_mma_bf16_d{64,128}` when q, k, v, o, dO and the three gradient
/// buffers all meet the same rules, else the SIMT `flash_attn_bwd_{dkdv,dq}_T_dD`. No atomics
/// anywhere: the same inputs give bitwise-identical results.
///
/// Layouts: the kernels address q, k, v, o and dO through (batch, head, time) element strides
/// with the head dim contiguous, so views cost nothing: the leading dims of `causal_attention`'s
/// operands are grouped into a batch and a head dim when their strides allow (a copy on the
/// device otherwise), and `causal_self_attention` reads Q, K and V straight out of the packed
/// [B, T, 3·H·Dh] projection and writes d(qkv) into one packed buffer through the same strides.
///
/// Head dims: the kernels exist for 32, 64 and 128. Other head dims up to 128 are padded with
/// zeros to the next of those by multiplying with a 0/1 [D, Dp] matrix (exact: every product
/// is with one or zero, every sum adds zeros), the softmax scale staying 1/√D, and the output
/// multiplied back with its transpose; autograd carries the gradients through those products.
/// That costs three extra small GEMMs each way and up to 4× the attention work at D = 16, so
/// models meant for the GPU should use a supported head dim. Head dims over 128 are an error.
#[cfg(feature = "cuda")]
mod cuda {
    use crate::cpu::attention::AttentionDropout;
    use crate::cuda::{AttnParams, CudaDevice, CudaStorage};
    use crate::layout::Layout;
    use crate::ops::{cuda_uninit, cuda_zeros, dense, launch, ptr, same_dtype, tname};
    use crate::storage::Storage;
    use crate::tensor::GradTrack;
    use crate::{DType, Error, Result, Tensor};
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    use std::sync::Arc;

    const FILE: &str = "flash_attention";
    /// Head dims flash_attention.cu instantiates.
    const HEAD_DIMS: [usize; 3] = [32, 64, 128];
    /// gridDim.y holds batch × heads, at most 65535 per launch; larger batches go in chunks.
    const MAX_GRID_Y: usize = 65535;
    /// The tensor-core kernels: 64 rows per block of 128 threads (4 warps); queries, or keys
    /// for dK/dV.
    const MMA_ROWS: usize = 64;
    const MMA_THREADS: u32 = 128;
    /// The environment variable that keeps attention on the SIMT kernels: `simt`; `auto` (or
    /// unset) lets the tensor-core kernels take the operands they accept. Read once; a way to
    /// route a run around the tensor-core kernels on a card where they misbehave, with no
    /// rebuild. Anything else is an error at the first attention launch.
    pub const ATTENTION_KERNEL_ENV: &str = "RLHF_ATTENTION_KERNEL";

    /// Whether `value` (the contents of [`ATTENTION_KERNEL_ENV`]) lets attention use the
    /// tensor cores; Err: what is wrong with it.
    fn allowed_by(value: Option<&str>) -> std::result::Result<bool, String> {
        match value.map(str::trim) {
            None | Some("") | Some("auto") => Ok(true),
            Some("simt") => Ok(false),
            Some(v) => Err(format!(
                "{ATTENTION_KERNEL_ENV}={v:?}: expected auto or simt"
            )),
        }
    }

    fn tensor_cores_allowed() -> Result<bool> {
        static ALLOWED: std::sync::OnceLock<std::result::Result<bool, String>> =
            std::sync::OnceLock::new();
        ALLOWED
            .get_or_init(|| allowed_by(std::env::var(ATTENTION_KERNEL_ENV).ok().as_deref()))
            .clone()
            .map_err(|e| Error::cuda("causal_attention", e))
    }

    /// The delta kernel: one warp per row, 8 warps per block.
    const DELTA_THREADS: u32 = 256;
    const DELTA_ROWS_PER_BLOCK: usize = 8;

    /// Rows per block of the SIMT kernels (FaCfg<D>::R) and their block size R·D/16.
    fn simt_rows(d: usize) -> usize {
        if d <= 64 {
            64
        } else {
            32
        }
    }

    fn simt_threads(d: usize) -> u32 {
        (simt_rows(d) * d / 16) as u32
    }

    /// One launch geometry: B × H independent heads of Tq queries over Tk keys of width D.
    #[derive(Clone, Copy, Debug)]
    struct Problem {
        op: &'static str,
        dtype: DType,
        b: usize,
        h: usize,
        tq: usize,
        tk: usize,
        d: usize,
        scale: f32,
        /// Dropout on the probabilities, fused into every kernel (None: none).
        drop: Option<AttentionDropout>,
    }

    /// An operand as the kernels see it: the device address of its first element and its
    /// (batch, head, time) element strides (the head dim is contiguous).
    #[derive(Clone, Copy, Debug)]
    struct Operand {
        ptr: u64,
        st: [i64; 3],
    }

    impl Operand {
        /// The operand moved to batch element `b0` (the start of a chunk).
        fn at(self, b0: usize, esz: u64) -> u64 {
            self.ptr + b0 as u64 * self.st[0] as u64 * esz
        }
    }

    impl Problem {
        fn check(&self) -> Result<()> {
            let too_big = |what: &str, n: usize| {
                Error::cuda(
                    self.op,
                    format!(
                        "{what} = {n} does not fit the kernels' 32-bit sizes ({self:?}); split \
                         the sequence"
                    ),
                )
            };
            for (what, n) in [("Tq", self.tq), ("Tk", self.tk)] {
                if n > i32::MAX as usize {
                    return Err(too_big(what, n));
                }
            }
            if self.h > MAX_GRID_Y {
                return Err(Error::cuda(
                    self.op,
                    format!(
                        "{} heads per batch element: the kernels run one block row per \
                         (batch, head) pair, at most {MAX_GRID_Y} per launch",
                        self.h
                    ),
                ));
            }
            // The heads' index (bh0 + blockIdx.y, the dropout hash's head) is an int.
            if self.b.saturating_mul(self.h) > i32::MAX as usize {
                return Err(Error::cuda(
                    self.op,
                    format!(
                        "B·H = {} heads do not fit the kernels' 32-bit head index ({self:?})",
                        self.b * self.h
                    ),
                ));
            }
            // The delta kernel's gridDim.x for the largest chunk.
            let rows = self.chunk_len() * self.h * self.tq;
            if rows.div_ceil(DELTA_ROWS_PER_BLOCK) > i32::MAX as usize {
                return Err(too_big("B·H·Tq per launch", rows));
            }
            Ok(())
        }

        /// Batch elements per launch, so that gridDim.y = batch × heads stays within 65535.
        fn chunk_len(&self) -> usize {
            (MAX_GRID_Y / self.h.max(1)).clamp(1, self.b.max(1))
        }

        /// (first batch element, batch elements) of each launch.
        fn chunks(&self) -> impl Iterator<Item = (usize, usize)> {
            let (b, per) = (self.b, self.chunk_len());
            (0..b).step_by(per).map(move |b0| (b0, per.min(b - b0)))
        }

        /// The dropout the kernels apply: `drop` when it can drop anything (a p = 0 dropout
        /// launches the dropout-free kernels with a zero threshold).
        fn dropout(&self) -> Option<AttentionDropout> {
            self.drop.filter(AttentionDropout::is_active)
        }

        /// The parameters of the launch for batch elements b0..b0 + nb.
        fn params(&self, b0: usize, nb: usize, ops: [&Operand; 5]) -> AttnParams {
            let [q, k, v, o, dout] = ops;
            let drop = self.dropout();
            AttnParams {
                b: nb as i32,
                h: self.h as i32,
                tq: self.tq as i32,
                tk: self.tk as i32,
                q: q.st,
                k: k.st,
                v: v.st,
                o: o.st,
                dout: dout.st,
                scale: self.scale,
                drop_threshold: drop.map_or(0, |d| d.threshold()),
                drop_seed: drop.map_or(0, |d| d.seed()),
                bh0: (b0 * self.h) as i32,
                drop_scale: drop.map_or(1.0, |d| d.scale()),
            }
        }

        /// Q, K and V of a contiguous packed [B, T, 3C] buffer at `base` (C = H·D), as
        /// [B, H, T, D] views: element offsets 0, C and 2C, strides (T·3C, D, 3C).
        fn packed_qkv(&self, base: u64) -> [Operand; 3] {
            let c = self.h * self.d;
            let st = [(self.tq * 3 * c) as i64, self.d as i64, (3 * c) as i64];
            [0, 1, 2].map(|i| Operand {
                ptr: base + (i * c) as u64 * self.esz(),
                st,
            })
        }

        /// The strides of a contiguous [B, T, C] tensor with heads merged, as [B, H, T, D].
        fn merged_heads_strides(&self) -> [i64; 3] {
            let c = self.h * self.d;
            [(self.tq * c) as i64, self.d as i64, c as i64]
        }

        fn esz(&self) -> u64 {
            self.dtype.size_in_bytes() as u64
        }

        /// Offset in bytes of batch element `b0` in the [B·H, Tq] f32 lse and delta buffers.
        fn row_offset(&self, b0: usize) -> u64 {
            (b0 * self.h * self.tq * 4) as u64
        }

        /// Whether the tensor-core kernels apply: bf16, D of 64 or 128, every operand 16-byte
        /// aligned with strides that keep each row 16-byte aligned (their header's rules), and
        /// at most 65535 tiles of 64 rows (their gridDim.y).
        fn mma_applies(&self, ops: &[&Operand]) -> bool {
            self.dtype == DType::BF16
                && matches!(self.d, 64 | 128)
                && self.tq.max(self.tk).div_ceil(MMA_ROWS) <= MAX_GRID_Y
                && ops
                    .iter()
                    .all(|o| o.ptr % 16 == 0 && o.st.iter().all(|s| s % 8 == 0))
        }
    }

    fn grid(x: usize, y: usize) -> (u32, u32, u32) {
        (x as u32, y as u32, 1)
    }

    /// The grid of `tiles` row tiles of `heads` heads: (tiles, heads) for the SIMT kernels,
    /// (heads, tiles) for the tensor-core ones, which start every head's heaviest causal tile
    /// first (flash_attention.cu, fa_block).
    fn tile_grid(mma: bool, tiles: usize, heads: usize) -> (u32, u32, u32) {
        if mma {
            grid(heads, tiles)
        } else {
            grid(tiles, heads)
        }
    }

    /// One planned kernel launch: entry point, launch shape and arguments, in the order of
    /// the entry point's parameters (AttnParams, the delta kernel's head dim, then pointers).
    /// Planning is separate from launching so that the tests can replay a plan on the host.
    #[derive(Clone, Debug)]
    struct Launch {
        entry: String,
        grid: (u32, u32, u32),
        threads: u32,
        p: AttnParams,
        head_dim: Option<i32>,
        ptrs: Vec<u64>,
    }

    /// The forward: o and the logsumexp rows `lse` ([B·H, Tq] f32) from q, k, v.
    ///
    /// Entry points: flash_attn_fwd_mma_bf16_dD or flash_attn_fwd_T_dD
    /// (AttnParams p, const T* q, const T* k, const T* v, T* o, float* lse).
    fn forward_plan(pr: &Problem, [q, k, v, o]: [&Operand; 4], lse: u64) -> Result<Vec<Launch>> {
        pr.check()?;
        let tn = tname(pr.op, pr.dtype)?;
        let mma = tensor_cores_allowed()? && pr.mma_applies(&[q, k, v, o]);
        let (entry, rows, threads) = if mma {
            (
                format!("flash_attn_fwd_mma_bf16_d{}", pr.d),
                MMA_ROWS,
                MMA_THREADS,
            )
        } else {
            (
                format!("flash_attn_fwd_{tn}_d{}", pr.d),
                simt_rows(pr.d),
                simt_threads(pr.d),
            )
        };
        let esz = pr.esz();
        // dO is not read by the forward.
        let none = Operand { ptr: 0, st: [0; 3] };
        Ok(pr
            .chunks()
            .map(|(b0, nb)| Launch {
                entry: entry.clone(),
                grid: tile_grid(mma, pr.tq.div_ceil(rows), nb * pr.h),
                threads,
                p: pr.params(b0, nb, [q, k, v, o, &none]),
                head_dim: None,
                ptrs: vec![
                    q.at(b0, esz),
                    k.at(b0, esz),
                    v.at(b0, esz),
                    o.at(b0, esz),
                    lse + pr.row_offset(b0),
                ],
            })
            .collect())
    }

    /// The backward: dq, dk, dv (written through q's, k's and v's strides) from dO, with the
    /// forward's o and lse; `delta` is a [B·H, Tq] f32 scratch buffer.
    ///
    /// Entry points, in order per batch chunk:
    ///   flash_attn_bwd_delta_T(AttnParams p, int D, const T* o, const T* do, float* delta)
    ///   flash_attn_bwd_dkdv_T_dD(p, q, k, v, do, lse, delta, T* dk, T* dv)
    ///   flash_attn_bwd_dq_T_dD(p, q, k, v, do, lse, delta, T* dq)
    /// with the tensor-core `flash_attn_bwd_{dkdv,dq}_mma_bf16_dD` (same arguments) in place
    /// of the last two when every operand and gradient meets the mma rules
    /// ([`Problem::mma_applies`]); `flash_attn_bwd_{dkdv,dq}_mma_drop_bf16_dD` with dropout
    /// (instances with the hashing compiled in, so that the dropout-free ones carry none).
    fn backward_plan(
        pr: &Problem,
        [q, k, v, o, dout]: [&Operand; 5],
        [lse, delta]: [u64; 2],
        [dq, dk, dv]: [u64; 3],
    ) -> Result<Vec<Launch>> {
        pr.check()?;
        let tn = tname(pr.op, pr.dtype)?;
        let esz = pr.esz();
        // The gradients share their operands' strides (the header's rule).
        let grads = |base: u64, of: &Operand| Operand {
            ptr: base,
            st: of.st,
        };
        let (gq, gk, gv) = (grads(dq, q), grads(dk, k), grads(dv, v));
        // (kernel name stem, rows per block, threads) of the dK/dV and dQ kernels.
        let mma = tensor_cores_allowed()? && pr.mma_applies(&[q, k, v, o, dout, &gq, &gk, &gv]);
        let (stem, rows, threads) = if mma {
            let stem = if pr.dropout().is_some() {
                "mma_drop_bf16"
            } else {
                "mma_bf16"
            };
            (stem, MMA_ROWS, MMA_THREADS)
        } else {
            (tn, simt_rows(pr.d), simt_threads(pr.d))
        };
        let mut plan = Vec::new();
        for (b0, nb) in pr.chunks() {
            let p = pr.params(b0, nb, [q, k, v, o, dout]);
            let (pq, pk, pv) = (q.at(b0, esz), k.at(b0, esz), v.at(b0, esz));
            let (po, pg) = (o.at(b0, esz), dout.at(b0, esz));
            let (pl, pd) = (lse + pr.row_offset(b0), delta + pr.row_offset(b0));
            let bh = nb * pr.h;
            plan.push(Launch {
                entry: format!("flash_attn_bwd_delta_{tn}"),
                grid: grid((bh * pr.tq).div_ceil(DELTA_ROWS_PER_BLOCK), 1),
                threads: DELTA_THREADS,
                p,
                head_dim: Some(pr.d as i32),
                ptrs: vec![po, pg, pd],
            });
            plan.push(Launch {
                entry: format!("flash_attn_bwd_dkdv_{stem}_d{}", pr.d),
                grid: tile_grid(mma, pr.tk.div_ceil(rows), bh),
                threads,
                p,
                head_dim: None,
                ptrs: vec![pq, pk, pv, pg, pl, pd, gk.at(b0, esz), gv.at(b0, esz)],
            });
            plan.push(Launch {
                entry: format!("flash_attn_bwd_dq_{stem}_d{}", pr.d),
                grid: tile_grid(mma, pr.tq.div_ceil(rows), bh),
                threads,
                p,
                head_dim: None,
                ptrs: vec![pq, pk, pv, pg, pl, pd, gq.at(b0, esz)],
            });
        }
        Ok(plan)
    }

    /// Launches a plan on `dev`'s stream, in order.
    ///
    /// # Safety
    /// Every pointer of the plan must address a live buffer on `dev` holding what the kernel
    /// touches: for b < nb, h < H, t < Tq (Tk for k, v, dk, dv) and d < D, the element
    /// ptr + b·sb + h·sh + t·st + d of each operand, and nb·H·Tq floats of lse and delta; and
    /// written operands (o, dq, dk, dv) must not alias anything else the same launch reads or
    /// writes, with each element at its own address.
    unsafe fn run(dev: &Arc<CudaDevice>, op: &'static str, plan: &[Launch]) -> Result<()> {
        let mut f: Option<(String, cudarc::driver::CudaFunction)> = None;
        for l in plan {
            if f.as_ref().is_none_or(|(e, _)| *e != l.entry) {
                f = Some((l.entry.clone(), dev.function(FILE, &l.entry)?));
            }
            let Some((_, func)) = &f else {
                unreachable!("looked up just above");
            };
            let mut b = dev.stream().launch_builder(func);
            b.arg(&l.p);
            if let Some(d) = &l.head_dim {
                b.arg(d);
            }
            for p in &l.ptrs {
                b.arg(p);
            }
            let cfg = LaunchConfig {
                grid_dim: l.grid,
                block_dim: (l.threads, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the argument list is the entry point's parameter list (built by
            // forward_plan / backward_plan, whose docs list the signatures: AttnParams by
            // value, the delta kernel's int head dim, then device pointers); the buffers meet
            // the kernels' needs by this function's contract; the launch shape is the one the
            // kernel file's header prescribes for the entry point (mma: 128 threads and
            // ceil(T/64) blocks; SIMT: R·D/16 threads, ceil(T/R) blocks; delta: 256 threads,
            // 8 rows per block), gridDim.y = nb·H ≤ 65535 (Problem::check, chunks).
            unsafe { launch(op, &l.entry, b, cfg)? };
        }
        Ok(())
    }

    /// How the leading dims of the attention operands map onto the kernels' batch and head
    /// dims: at most two groups of consecutive leading dims (size-1 dims dropped), each group
    /// evenly strided in every operand so one stride walks it.
    #[derive(Clone, Debug)]
    struct HeadGroups {
        groups: Vec<Vec<usize>>,
        b: usize,
        h: usize,
    }

    impl HeadGroups {
        /// The coarsest grouping exact for all of `ops` (which share their leading shape
        /// `lead`), or None when it needs more than two groups.
        fn of(lead: &[usize], ops: &[Tensor]) -> Option<HeadGroups> {
            let mut groups: Vec<Vec<usize>> = Vec::new();
            for i in (0..lead.len()).filter(|&i| lead[i] > 1) {
                let merges = groups.last().is_some_and(|g| {
                    let prev = g[g.len() - 1];
                    ops.iter().all(|t| {
                        let st = t.layout().strides();
                        st[prev] == st[i] * lead[i]
                    })
                });
                match groups.last_mut() {
                    Some(g) if merges => g.push(i),
                    _ => groups.push(vec![i]),
                }
            }
            let size = |g: &Vec<usize>| g.iter().map(|&i| lead[i]).product::<usize>();
            let (b, h) = match groups.as_slice() {
                [] => (1, 1),
                [g] => (size(g), 1),
                [g0, g1] => (size(g0), size(g1)),
                _ => return None,
            };
            Some(HeadGroups { groups, b, h })
        }

        /// `t`'s (batch, head, time) strides under this grouping, when its head dim is
        /// contiguous and each group is evenly strided in it.
        fn strides(&self, t: &Tensor) -> Option<[i64; 3]> {
            let (shape, st) = (t.shape(), t.layout().strides());
            let r = t.rank();
            if st[r - 1] != 1 {
                return None;
            }
            let mut out = [0i64, 0, st[r - 2] as i64];
            for (slot, g) in self.groups.iter().enumerate() {
                if g.windows(2).any(|w| st[w[0]] != st[w[1]] * shape[w[1]]) {
                    return None;
                }
                out[slot] = st[g[g.len() - 1]] as i64;
            }
            Some(out)
        }

        fn operand(&self, op: &'static str, t: &Tensor) -> Result<Operand> {
            let st = self.strides(t).ok_or_else(|| {
                Error::cuda(
                    op,
                    format!(
                        "internal: operand {:?} with strides {:?} does not fit the head \
                         grouping {:?}",
                        t.shape(),
                        t.layout().strides(),
                        self.groups
                    ),
                )
            })?;
            Ok(Operand { ptr: ptr(t)?, st })
        }
    }

    /// The operands with their head dim contiguous and a grouping exact for all of them:
    /// those that do not fit are copied to contiguous on the device first.
    fn head_layout(
        op: &'static str,
        lead: &[usize],
        mut ops: Vec<Tensor>,
    ) -> Result<(Vec<Tensor>, HeadGroups)> {
        for t in ops.iter_mut() {
            if t.layout().strides()[t.rank() - 1] != 1 {
                *t = dense(t)?;
            }
        }
        if let Some(g) = HeadGroups::of(lead, &ops) {
            return Ok((ops, g));
        }
        for t in ops.iter_mut() {
            *t = dense(t)?;
        }
        let g = HeadGroups::of(lead, &ops).ok_or_else(|| {
            Error::cuda(
                op,
                format!("internal: contiguous operands with leading dims {lead:?} did not group"),
            )
        })?;
        Ok((ops, g))
    }

    /// Whether every element of `l` sits at its own offset with no gaps between them (a
    /// contiguous layout, or a permutation of one): a fresh buffer of numel elements read or
    /// written through `l`'s strides then holds exactly one tensor.
    fn is_dense_permutation(l: &Layout) -> bool {
        let mut dims: Vec<(usize, usize)> = l
            .shape()
            .iter()
            .zip(l.strides())
            .filter(|(&n, _)| n > 1)
            .map(|(&n, &s)| (s, n))
            .collect();
        dims.sort_unstable();
        let mut expected = 1;
        for (s, n) in dims {
            if s != expected {
                return false;
            }
            expected *= n;
        }
        true
    }

    /// An operand for the backward and a zeroed gradient buffer the kernels can write through
    /// its strides: `t` itself with a buffer of its own layout when that layout is a dense
    /// permutation, else a contiguous copy of `t` with a contiguous buffer (a strided view's
    /// own strides could address more than numel elements, or the same one twice).
    fn with_grad_buffer(dev: &Arc<CudaDevice>, t: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = if is_dense_permutation(t.layout()) {
            t.clone()
        } else {
            dense(t)?
        };
        let buf = CudaStorage::uninit(dev, t.dtype(), t.numel())?;
        let layout = Layout::from_parts(t.shape().to_vec(), t.layout().strides().to_vec(), 0);
        let g = Tensor::from_parts(Arc::new(Storage::Cuda(buf)), layout, GradTrack::None);
        Ok((t, g))
    }

    /// Head dims without a kernel: the padded size to run at, or an error past 128.
    fn padded_head_dim(op: &'static str, d: usize) -> Result<Option<usize>> {
        if HEAD_DIMS.contains(&d) {
            return Ok(None);
        }
        match HEAD_DIMS.iter().find(|&&p| p > d) {
            Some(&p) => Ok(Some(p)),
            None => Err(Error::cuda(
                op,
                format!(
                    "head dim {d} has no CUDA kernel: kernels/flash_attention.cu is instantiated \
                     for head dims {HEAD_DIMS:?} (smaller ones are zero-padded to the next of \
                     those); use at most 128 per head, or run attention on the CPU"
                ),
            )),
        }
    }

    /// The [d, dp] 0/1 matrix that zero-pads the last dim from d to dp (identity on the first d
    /// columns), on `like`'s device in its dtype.
    fn pad_matrix(d: usize, dp: usize, like: &Tensor) -> Result<Tensor> {
        let mut e = vec![0.0f32; d * dp];
        for i in 0..d {
            e[i * dp + i] = 1.0;
        }
        Tensor::from_vec(e, &[d, dp])?
            .to_dtype(like.dtype())?
            .to_device(like.device())
    }

    /// [`Tensor::causal_attention`] on `dev` (inputs checked by the caller: same leading dims,
    /// Tq ≤ Tk, one device).
    pub(super) fn causal_attention(
        dev: &Arc<CudaDevice>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        d: usize,
        drop: Option<AttentionDropout>,
    ) -> Result<Tensor> {
        const OP: &str = "causal_attention";
        same_dtype(OP, q, k)?;
        same_dtype(OP, q, v)?;
        tname(OP, q.dtype())?;
        let scale = 1.0 / (d.max(1) as f32).sqrt();
        if q.numel() == 0 {
            return empty_attention(dev, q, k, v);
        }
        match padded_head_dim(OP, d)? {
            None => attention_core(dev, q, k, v, scale, drop),
            Some(dp) => {
                let e = pad_matrix(d, dp, q)?;
                let (qp, kp, vp) = (q.matmul(&e)?, k.matmul(&e)?, v.matmul(&e)?);
                let o = attention_core(dev, &qp, &kp, &vp, scale, drop)?;
                o.matmul(&e.t()?)
            }
        }
    }

    /// No queries, no heads or zero-width heads: zeros on the device, and zero gradients.
    fn empty_attention(
        dev: &Arc<CudaDevice>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let out = cuda_zeros(dev, q.dtype(), q.shape())?;
        let dev = dev.clone();
        let like: Vec<(DType, Vec<usize>)> = [q, k, v]
            .iter()
            .map(|t| (t.dtype(), t.shape().to_vec()))
            .collect();
        Ok(Tensor::record(
            out,
            "causal_attention",
            &[q, k, v],
            move |_| {
                like.iter()
                    .map(|(dt, s)| Ok(Some(cuda_zeros(&dev, *dt, s)?)))
                    .collect()
            },
        ))
    }

    /// Attention over operands whose head dim has a kernel, with an explicit softmax scale.
    fn attention_core(
        dev: &Arc<CudaDevice>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
        drop: Option<AttentionDropout>,
    ) -> Result<Tensor> {
        const OP: &str = "causal_attention";
        let r = q.rank();
        let lead = q.shape()[..r - 2].to_vec();
        let (tq, tk, d) = (q.shape()[r - 2], k.shape()[r - 2], q.shape()[r - 1]);
        let (ops, groups) = head_layout(OP, &lead, vec![q.detach(), k.detach(), v.detach()])?;
        let pr = Problem {
            op: OP,
            dtype: q.dtype(),
            b: groups.b,
            h: groups.h,
            tq,
            tk,
            d,
            scale,
            drop,
        };
        pr.check()?;
        let out = cuda_uninit(dev, q.dtype(), q.shape())?;
        let lse = cuda_uninit(dev, DType::F32, &[groups.b * groups.h * tq])?;
        let [qo, ko, vo, oo] = [&ops[0], &ops[1], &ops[2], &out].map(|t| groups.operand(OP, t));
        let plan = forward_plan(&pr, [&qo?, &ko?, &vo?, &oo?], ptr(&lse)?)?;
        // SAFETY: q, k, v are views of live device tensors whose strides (from their own
        // layouts under this grouping) address only their elements; out and lse are fresh
        // buffers of exactly [lead, Tq, D] elements (contiguous) and B·H·Tq floats.
        unsafe { run(dev, OP, &plan)? };

        let (dev, saved_out) = (dev.clone(), out.clone());
        Ok(Tensor::record(out, OP, &[q, k, v], move |g| {
            same_dtype(OP, &saved_out, g)?;
            let g = if groups.strides(g).is_some() {
                g.detach()
            } else {
                dense(g)?
            };
            let (qb, dq) = with_grad_buffer(&dev, &ops[0])?;
            let (kb, dk) = with_grad_buffer(&dev, &ops[1])?;
            let (vb, dv) = with_grad_buffer(&dev, &ops[2])?;
            let delta = cuda_uninit(&dev, DType::F32, &[groups.b * groups.h * tq])?;
            let operand = |t: &Tensor| groups.operand(OP, t);
            let plan = backward_plan(
                &pr,
                [
                    &operand(&qb)?,
                    &operand(&kb)?,
                    &operand(&vb)?,
                    &operand(&saved_out)?,
                    &operand(&g)?,
                ],
                [ptr(&lse)?, ptr(&delta)?],
                [ptr(&dq)?, ptr(&dk)?, ptr(&dv)?],
            )?;
            // SAFETY: reads as in the forward (dO a live device tensor read through its own
            // strides); dq, dk, dv are fresh buffers laid out with exactly qb's, kb's and vb's
            // strides (dense permutations: each element at its own address, numel elements);
            // delta is fresh with B·H·Tq floats, lse the forward's.
            unsafe { run(&dev, OP, &plan)? };
            Ok(vec![Some(dq), Some(dk), Some(dv)])
        }))
    }

    /// [`Tensor::causal_self_attention`] on `dev` (shape checked by the caller).
    pub(super) fn causal_self_attention(
        dev: &Arc<CudaDevice>,
        qkv: &Tensor,
        n_head: usize,
        drop: Option<AttentionDropout>,
    ) -> Result<Tensor> {
        const OP: &str = "causal_self_attention";
        tname(OP, qkv.dtype())?;
        let (b, t, d3) = (qkv.shape()[0], qkv.shape()[1], qkv.shape()[2]);
        let dh = d3 / 3 / n_head;
        let scale = 1.0 / (dh as f32).sqrt();
        if b * t == 0 {
            let out = cuda_zeros(dev, qkv.dtype(), &[b, t, d3 / 3])?;
            let (dev, dtype) = (dev.clone(), qkv.dtype());
            return Ok(Tensor::record(out, OP, &[qkv], move |_| {
                Ok(vec![Some(cuda_zeros(&dev, dtype, &[b, t, d3])?)])
            }));
        }
        match padded_head_dim(OP, dh)? {
            None => self_attention_core(dev, qkv, n_head, scale, drop),
            Some(dp) => {
                // [B, T, 3·H, Dh]·[Dh, Dp] pads every head of Q, K and V at once.
                let e = pad_matrix(dh, dp, qkv)?;
                let padded = qkv
                    .reshape_to(&[b, t, 3 * n_head, dh])?
                    .matmul(&e)?
                    .reshape_to(&[b, t, 3 * n_head * dp])?;
                let o = self_attention_core(dev, &padded, n_head, scale, drop)?;
                o.reshape_to(&[b, t, n_head, dp])?
                    .matmul(&e.t()?)?
                    .reshape_to(&[b, t, n_head * dh])
            }
        }
    }

    /// The packed op over a head dim with a kernel: Q, K and V are read from `qkv`
    /// ([B, T, 3·H·Dh], made contiguous) as [B, H, T, Dh] views with strides (T·3C, Dh, 3C)
    /// at element offsets 0, C and 2C (C = H·Dh); the output [B, T, C] is written with heads
    /// merged (strides T·C, Dh, C); the backward writes dQ, dK and dV into one [B, T, 3C]
    /// buffer through the same strides as Q, K and V.
    fn self_attention_core(
        dev: &Arc<CudaDevice>,
        qkv: &Tensor,
        n_head: usize,
        scale: f32,
        drop: Option<AttentionDropout>,
    ) -> Result<Tensor> {
        const OP: &str = "causal_self_attention";
        let (b, t, d3) = (qkv.shape()[0], qkv.shape()[1], qkv.shape()[2]);
        let (c, dh) = (d3 / 3, d3 / 3 / n_head);
        let dtype = qkv.dtype();
        let pr = Problem {
            op: OP,
            dtype,
            b,
            h: n_head,
            tq: t,
            tk: t,
            d: dh,
            scale,
            drop,
        };
        pr.check()?;
        let x = dense(qkv)?;
        let s_out = pr.merged_heads_strides();
        let parts = move |base: u64| pr.packed_qkv(base);
        let out = cuda_uninit(dev, dtype, &[b, t, c])?;
        let lse = cuda_uninit(dev, DType::F32, &[b * n_head * t])?;
        let [q, k, v] = parts(ptr(&x)?);
        let o = Operand {
            ptr: ptr(&out)?,
            st: s_out,
        };
        let plan = forward_plan(&pr, [&q, &k, &v, &o], ptr(&lse)?)?;
        // SAFETY: q, k, v address the three thirds of each row of the contiguous [B, T, 3C]
        // buffer x (offsets 0, C, 2C; time stride 3C; head stride Dh < C); out is a fresh
        // [B, T, C] buffer written with its own contiguous strides, lse fresh with B·H·T floats.
        unsafe { run(dev, OP, &plan)? };

        let (dev, saved_out) = (dev.clone(), out.clone());
        Ok(Tensor::record(out, OP, &[qkv], move |g| {
            same_dtype(OP, &saved_out, g)?;
            // [B, T, C] contiguous has exactly the output's strides.
            let g = dense(g)?;
            let dqkv = cuda_uninit(&dev, dtype, &[b, t, d3])?;
            let delta = cuda_uninit(&dev, DType::F32, &[b * n_head * t])?;
            let [q, k, v] = parts(ptr(&x)?);
            let [dq, dk, dv] = parts(ptr(&dqkv)?).map(|o| o.ptr);
            let o = Operand {
                ptr: ptr(&saved_out)?,
                st: s_out,
            };
            let dout = Operand {
                ptr: ptr(&g)?,
                st: s_out,
            };
            let plan = backward_plan(
                &pr,
                [&q, &k, &v, &o, &dout],
                [ptr(&lse)?, ptr(&delta)?],
                [dq, dk, dv],
            )?;
            // SAFETY: reads as in the forward, dO a contiguous [B, T, C] tensor with the
            // output's strides; dq, dk, dv are the three disjoint thirds of every row of the
            // fresh [B, T, 3C] buffer dqkv (each element written once, by one of them); delta
            // fresh with B·H·T floats.
            unsafe { run(&dev, OP, &plan)? };
            Ok(vec![Some(dqkv)])
        }))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn t(shape: &[usize], strides: &[usize]) -> Tensor {
            let n = Layout::from_parts(shape.to_vec(), strides.to_vec(), 0).storage_extent();
            Tensor::zeros(&[n.max(1)]).with_layout(Layout::from_parts(
                shape.to_vec(),
                strides.to_vec(),
                0,
            ))
        }

        #[test]
        fn head_groups_merge_what_every_operand_allows() {
            // Contiguous [2, 3, 5, 4, 32]: all leading dims merge into one batch dim.
            let a = Tensor::zeros(&[2, 3, 5, 4, 32]);
            let g = HeadGroups::of(&[2, 3, 5], std::slice::from_ref(&a)).unwrap();
            assert_eq!((g.b, g.h), (30, 1));
            assert_eq!(g.strides(&a), Some([4 * 32, 0, 32]));
            // Heads split out of a [B, T, H, D] buffer: [B, H, T, D] view, two groups.
            let p = Tensor::zeros(&[2, 7, 3, 32])
                .permute(&[0, 2, 1, 3])
                .unwrap();
            let g = HeadGroups::of(
                &[2, 3],
                &[p.clone(), a.reshape_to(&[2, 3, 20, 32]).unwrap()],
            )
            .unwrap();
            assert_eq!((g.b, g.h), (2, 3));
            assert_eq!(g.strides(&p), Some([7 * 3 * 32, 32, 3 * 32]));
            // Size-1 dims are dropped; three unmergeable groups are refused.
            let g =
                HeadGroups::of(&[1, 4, 1], &[t(&[1, 4, 1, 8, 32], &[999, 256, 7, 32, 1])]).unwrap();
            assert_eq!((g.b, g.h), (4, 1));
            let odd = t(&[2, 3, 5, 1, 32], &[1000, 300, 40, 32, 1]);
            assert!(HeadGroups::of(&[2, 3, 5], &[odd]).is_none());
            // A head dim that is not contiguous has no strides.
            let tr = Tensor::zeros(&[4, 32, 32]).transpose(1, 2).unwrap();
            assert_eq!(
                HeadGroups::of(&[4], std::slice::from_ref(&tr))
                    .unwrap()
                    .strides(&tr),
                None
            );
        }

        #[test]
        fn dense_permutations() {
            let c = Tensor::zeros(&[2, 3, 4]);
            assert!(is_dense_permutation(c.layout()));
            assert!(is_dense_permutation(
                c.permute(&[2, 0, 1]).unwrap().layout()
            ));
            assert!(!is_dense_permutation(c.narrow(2, 0, 3).unwrap().layout()));
            assert!(!is_dense_permutation(
                Tensor::zeros(&[3]).broadcast_to(&[2, 3]).unwrap().layout()
            ));
        }

        #[test]
        fn padded_head_dims_and_chunks() {
            let op = "test";
            assert_eq!(padded_head_dim(op, 64).unwrap(), None);
            assert_eq!(padded_head_dim(op, 5).unwrap(), Some(32));
            assert_eq!(padded_head_dim(op, 33).unwrap(), Some(64));
            assert_eq!(padded_head_dim(op, 100).unwrap(), Some(128));
            let e = padded_head_dim(op, 129).unwrap_err().to_string();
            assert!(e.contains("head dim 129 has no CUDA kernel"), "{e}");
            let pr = Problem {
                op,
                dtype: DType::F32,
                b: 70_000,
                h: 12,
                tq: 4,
                tk: 4,
                d: 64,
                scale: 1.0,
                drop: None,
            };
            let chunks: Vec<_> = pr.chunks().collect();
            assert!(chunks.iter().all(|&(_, nb)| nb * 12 <= MAX_GRID_Y));
            assert_eq!(chunks.iter().map(|c| c.1).sum::<usize>(), 70_000);
            assert_eq!(chunks[1].0, chunks[0].1);
            let e = Problem { h: 70_000, ..pr }.check().unwrap_err().to_string();
            assert!(e.contains("70000 heads"), "{e}");
            let e = Problem { tk: 1 << 31, ..pr }
                .check()
                .unwrap_err()
                .to_string();
            assert!(e.contains("Tk = 2147483648"), "{e}");
        }

        #[test]
        fn mma_rules() {
            let pr = Problem {
                op: "test",
                dtype: DType::BF16,
                b: 1,
                h: 1,
                tq: 1,
                tk: 1,
                d: 64,
                scale: 1.0,
                drop: None,
            };
            let ok = Operand {
                ptr: 256,
                st: [8192, 64, 192],
            };
            assert!(allowed_by(None).unwrap());
            assert!(allowed_by(Some("auto")).unwrap());
            assert!(!allowed_by(Some("simt")).unwrap());
            let e = allowed_by(Some("mma")).unwrap_err();
            assert!(
                e.contains("RLHF_ATTENTION_KERNEL=\"mma\": expected auto or simt"),
                "{e}"
            );
            assert!(pr.mma_applies(&[&ok, &ok]));
            assert!(!pr.mma_applies(&[&ok, &Operand { ptr: 258, ..ok }]));
            assert!(!pr.mma_applies(&[&Operand {
                st: [8192, 64, 65],
                ..ok
            }]));
            assert!(!Problem { d: 32, ..pr }.mma_applies(&[&ok]));
            assert!(!Problem {
                dtype: DType::F32,
                ..pr
            }
            .mma_applies(&[&ok]));

            // The backward takes the tensor-core dK/dV and dQ kernels only when all eight
            // operands (q, k, v, o, dO and the three gradient buffers) meet the rules; one
            // 2-byte-misaligned pointer anywhere gives the SIMT pair.
            let pr = Problem {
                tq: 100,
                tk: 150,
                ..pr
            };
            let bwd_entries = |pr: &Problem, bad: Option<usize>| -> Vec<String> {
                let at =
                    |i: usize| 256 * (i as u64 + 1) * 1024 + if bad == Some(i) { 2 } else { 0 };
                let op = |i| Operand { ptr: at(i), ..ok };
                let plan = backward_plan(
                    pr,
                    [&op(0), &op(1), &op(2), &op(3), &op(4)],
                    [1 << 40, 2 << 40],
                    [at(5), at(6), at(7)],
                )
                .unwrap();
                // (tiles, threads): the tensor-core kernels' grid is (heads, tiles).
                let shapes: Vec<_> = plan
                    .iter()
                    .map(|l| match l.entry.contains("_mma_") {
                        true => (l.grid.1, l.threads),
                        false => (l.grid.0, l.threads),
                    })
                    .collect();
                let mma = plan[1].entry.contains("_mma_");
                let rows = if mma { MMA_ROWS } else { simt_rows(64) };
                let threads = if mma { MMA_THREADS } else { simt_threads(64) };
                assert_eq!(
                    shapes[1..],
                    [
                        (150usize.div_ceil(rows) as u32, threads),
                        (100usize.div_ceil(rows) as u32, threads)
                    ]
                );
                plan.into_iter().map(|l| l.entry).collect()
            };
            assert_eq!(
                bwd_entries(&pr, None),
                [
                    "flash_attn_bwd_delta_bf16",
                    "flash_attn_bwd_dkdv_mma_bf16_d64",
                    "flash_attn_bwd_dq_mma_bf16_d64"
                ]
            );
            // With dropout: the instances that hash (a p = 0 dropout is no dropout).
            let drop = |p| Problem {
                drop: AttentionDropout::new(p, 1).ok(),
                ..pr
            };
            assert_eq!(
                bwd_entries(&drop(0.1), None)[1..],
                [
                    "flash_attn_bwd_dkdv_mma_drop_bf16_d64",
                    "flash_attn_bwd_dq_mma_drop_bf16_d64"
                ]
            );
            assert_eq!(bwd_entries(&drop(0.0), None), bwd_entries(&pr, None));
            assert_eq!(
                bwd_entries(&drop(0.1), Some(3))[1..],
                ["flash_attn_bwd_dkdv_bf16_d64", "flash_attn_bwd_dq_bf16_d64"]
            );
            for bad in 0..8 {
                assert_eq!(
                    bwd_entries(&pr, Some(bad)),
                    [
                        "flash_attn_bwd_delta_bf16",
                        "flash_attn_bwd_dkdv_bf16_d64",
                        "flash_attn_bwd_dq_bf16_d64"
                    ],
                    "operand {bad} misaligned"
                );
            }
        }

        // ---- host replay of launch plans -------------------------------------------------
        //
        // Without a GPU the kernels cannot run here, but everything the host decides can be
        // checked: entry points, launch shapes, argument order, strides, pointer offsets of
        // packed operands and batch chunks, lse/delta offsets and gradient buffers. `replay`
        // executes a plan against kernels/flash_attention.cu's header contract (its formulas
        // and addressing, naively, in f64) on a host arena standing in for device memory,
        // and the tests compare the results with the CPU attention.

        /// One allocation of the arena: `len` elements of `esz` bytes from byte address
        /// `start`, held as f32 values from `base` in the arena's value vector.
        struct Alloc {
            start: u64,
            esz: u64,
            base: usize,
            len: usize,
        }

        /// A host arena standing in for device memory: byte addresses, allocations appended
        /// at 256-byte boundaries (as the device allocator's), each of one element size (2 for
        /// bf16 operands, 4 for f32 ones and for lse and delta, which are f32 for every
        /// dtype). Values are kept as f32 whatever the element size: the replay checks
        /// addressing and the formulas, not bf16 rounding.
        struct Arena {
            vals: Vec<f32>,
            allocs: Vec<Alloc>,
            end: u64,
        }

        impl Arena {
            fn new() -> Arena {
                Arena {
                    vals: Vec::new(),
                    allocs: Vec::new(),
                    // Not 0: a null pointer (an unused argument) is in no allocation.
                    end: 256,
                }
            }

            fn alloc(&mut self, vals: impl Iterator<Item = f32>, esz: u64) -> u64 {
                let (start, base) = (self.end, self.vals.len());
                self.vals.extend(vals);
                let len = self.vals.len() - base;
                self.end = (start + len as u64 * esz).next_multiple_of(256);
                self.allocs.push(Alloc {
                    start,
                    esz,
                    base,
                    len,
                });
                start
            }

            /// Appends `t`'s whole storage (f32, host) as elements of `esz` bytes and returns
            /// the allocation's address.
            fn put(&mut self, t: &Tensor, esz: u64) -> u64 {
                let s = t.storage().as_slice::<f32>().expect("f32 host storage");
                self.alloc(s.iter().copied(), esz)
            }

            /// A fresh allocation of `n` elements, poisoned: an element nothing writes shows
            /// up as NaN.
            fn zeros(&mut self, n: usize, esz: u64) -> u64 {
                self.alloc(std::iter::repeat_n(f32::NAN, n), esz)
            }

            /// The value index of element `e` (in elements) from address `ptr`; panics when
            /// `ptr` is not an element boundary of an allocation or `e` leaves it.
            fn index(&self, ptr: u64, e: i64) -> usize {
                let a = self
                    .allocs
                    .iter()
                    .find(|a| (a.start..a.start + a.len as u64 * a.esz).contains(&ptr))
                    .unwrap_or_else(|| panic!("address {ptr} is in no allocation"));
                assert_eq!(
                    (ptr - a.start) % a.esz,
                    0,
                    "address {ptr} splits an element"
                );
                let i = ((ptr - a.start) / a.esz) as i64 + e;
                assert!(
                    (0..a.len as i64).contains(&i),
                    "element {e} from address {ptr} leaves its allocation"
                );
                a.base + i as usize
            }

            /// The d elements of row (b, h, t) of an operand at `ptr` with element strides
            /// `st`, bounds-checked against `ptr`'s allocation.
            fn row(
                &self,
                ptr: u64,
                st: [i64; 3],
                (b, h, t): (usize, usize, usize),
                d: usize,
            ) -> usize {
                let e = b as i64 * st[0] + h as i64 * st[1] + t as i64 * st[2];
                let i = self.index(ptr, e);
                if d > 0 {
                    self.index(ptr, e + d as i64 - 1);
                }
                i
            }

            /// The tensor of `shape` and element `strides` at address `at`, contiguous.
            fn read(&self, shape: &[usize], strides: &[usize], at: u64) -> Tensor {
                let l = Layout::from_parts(shape.to_vec(), strides.to_vec(), self.index(at, 0));
                Tensor::from_storage(Arc::new(Storage::F32(self.vals.clone())), l)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            }
        }

        /// `drop` is the dropout the plan was made with: its launches must carry it (threshold,
        /// seed, scale), and the replay applies it with each launch's head offset bh0.
        fn replay(plan: &[Launch], mem: &mut Arena, d: usize, drop: Option<AttentionDropout>) {
            for l in plan {
                let p = &l.p;
                assert_eq!(
                    (p.drop_threshold, p.drop_seed, p.drop_scale),
                    drop.map_or((0, 0, 1.0), |x| (x.threshold(), x.seed(), x.scale()))
                );
                let (b, h, tq, tk) = (p.b as usize, p.h as usize, p.tq as usize, p.tk as usize);
                let shift = tk - tq;
                let scale = p.scale as f64;
                let rd = |mem: &Arena, ptr: u64, st: [i64; 3], bi, hi, t| -> Vec<f64> {
                    let i = mem.row(ptr, st, (bi, hi, t), d);
                    mem.vals[i..i + d].iter().map(|&x| x as f64).collect()
                };
                let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
                // Element (bi, hi, i) of a [B·H, Tq] f32 buffer (lse, delta).
                let rowvec = |mem: &Arena, ptr: u64, bi: usize, hi: usize, i: usize| {
                    mem.index(ptr, ((bi * h + hi) * tq + i) as i64)
                };
                // Element (i, j)'s dropout factor in head (bi, hi) of this launch.
                let z = |bi: usize, hi: usize, i: usize, j: usize| {
                    let head = p.bh0 as usize + bi * h + hi;
                    drop.map_or(1.0, |x| x.factor(head, i, j) as f64)
                };
                let simt = (simt_rows(d), simt_threads(d));
                let mma = l.entry.contains("_mma_");
                if mma {
                    // The tensor-core kernels exist for bf16 and D = 64, 128 only.
                    // Backward instances with dropout compiled in are named _mma_drop_.
                    let stem = if drop.is_some() && l.entry.starts_with("flash_attn_bwd_") {
                        "_mma_drop_bf16"
                    } else {
                        "_mma_bf16"
                    };
                    assert!(l.entry.ends_with(&format!("{stem}_d{d}")), "{}", l.entry);
                    assert!(matches!(d, 64 | 128), "{}", l.entry);
                }
                // The tensor-core kernels' grid is (heads, tiles), the others' (tiles, heads).
                let (tiles, heads) = if mma {
                    (l.grid.1 as usize, l.grid.0 as usize)
                } else {
                    (l.grid.0 as usize, l.grid.1 as usize)
                };
                assert_eq!(heads, if l.entry.contains("delta") { 1 } else { b * h });
                if l.entry.starts_with("flash_attn_fwd_") {
                    let (rows, threads) = if mma { (MMA_ROWS, MMA_THREADS) } else { simt };
                    assert_eq!((tiles, l.threads), (tq.div_ceil(rows), threads));
                    let [q, k, v, o, lse] = l.ptrs[..] else {
                        panic!("{l:?}")
                    };
                    for (bi, hi, i) in (0..b)
                        .flat_map(|x| (0..h).flat_map(move |y| (0..tq).map(move |z| (x, y, z))))
                    {
                        let qi = rd(mem, q, p.q, bi, hi, i);
                        let s: Vec<f64> = (0..=i + shift)
                            .map(|j| scale * dot(&qi, &rd(mem, k, p.k, bi, hi, j)))
                            .collect();
                        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let l_sum: f64 = s.iter().map(|x| (x - m).exp()).sum();
                        let mut acc = vec![0.0; d];
                        for (j, sj) in s.iter().enumerate() {
                            let vj = rd(mem, v, p.v, bi, hi, j);
                            for c in 0..d {
                                acc[c] += (sj - m).exp() / l_sum * z(bi, hi, i, j) * vj[c];
                            }
                        }
                        let oi = mem.row(o, p.o, (bi, hi, i), d);
                        for (dst, x) in mem.vals[oi..oi + d].iter_mut().zip(&acc) {
                            *dst = *x as f32;
                        }
                        let li = rowvec(mem, lse, bi, hi, i);
                        mem.vals[li] = (m + l_sum.ln()) as f32;
                    }
                } else if l.entry.starts_with("flash_attn_bwd_delta_") {
                    assert_eq!(l.head_dim, Some(d as i32));
                    assert_eq!(
                        (tiles, l.threads),
                        ((b * h * tq).div_ceil(DELTA_ROWS_PER_BLOCK), DELTA_THREADS)
                    );
                    let [o, g, delta] = l.ptrs[..] else {
                        panic!("{l:?}")
                    };
                    for (bi, hi, i) in (0..b)
                        .flat_map(|x| (0..h).flat_map(move |y| (0..tq).map(move |z| (x, y, z))))
                    {
                        let s = dot(&rd(mem, o, p.o, bi, hi, i), &rd(mem, g, p.dout, bi, hi, i));
                        let di = rowvec(mem, delta, bi, hi, i);
                        mem.vals[di] = s as f32;
                    }
                } else {
                    let dkdv = l.entry.starts_with("flash_attn_bwd_dkdv_");
                    assert!(
                        dkdv || l.entry.starts_with("flash_attn_bwd_dq_"),
                        "{}",
                        l.entry
                    );
                    assert!(l.entry.ends_with(&format!("_d{d}")), "{}", l.entry);
                    let t_own = if dkdv { tk } else { tq };
                    let (rows, threads) = if mma { (MMA_ROWS, MMA_THREADS) } else { simt };
                    assert_eq!((tiles, l.threads), (t_own.div_ceil(rows), threads));
                    let (q, k, v, g, lse, delta) = (
                        l.ptrs[0], l.ptrs[1], l.ptrs[2], l.ptrs[3], l.ptrs[4], l.ptrs[5],
                    );
                    // P_ij and dS_ij of one (b, h) from lse and delta, as the kernels do.
                    let p_ds = |mem: &Arena, bi, hi, i: usize, j: usize| -> (f64, f64) {
                        if j > i + shift {
                            return (0.0, 0.0);
                        }
                        let qi = rd(mem, q, p.q, bi, hi, i);
                        let li = mem.vals[rowvec(mem, lse, bi, hi, i)] as f64;
                        let di = mem.vals[rowvec(mem, delta, bi, hi, i)] as f64;
                        let pij = (scale * dot(&qi, &rd(mem, k, p.k, bi, hi, j)) - li).exp();
                        let dp = dot(&rd(mem, g, p.dout, bi, hi, i), &rd(mem, v, p.v, bi, hi, j));
                        // dV takes P ⊙ Z, dS = P ⊙ (Z ⊙ dP − δ).
                        let zij = z(bi, hi, i, j);
                        (pij * zij, pij * (zij * dp - di))
                    };
                    for (bi, hi) in (0..b).flat_map(|x| (0..h).map(move |y| (x, y))) {
                        for own in 0..t_own {
                            if dkdv {
                                let (mut dk, mut dv) = (vec![0.0; d], vec![0.0; d]);
                                for i in 0..tq {
                                    let (pij, ds) = p_ds(mem, bi, hi, i, own);
                                    let (qi, gi) =
                                        (rd(mem, q, p.q, bi, hi, i), rd(mem, g, p.dout, bi, hi, i));
                                    for c in 0..d {
                                        dv[c] += pij * gi[c];
                                        dk[c] += scale * ds * qi[c];
                                    }
                                }
                                let (ik, iv) = (
                                    mem.row(l.ptrs[6], p.k, (bi, hi, own), d),
                                    mem.row(l.ptrs[7], p.v, (bi, hi, own), d),
                                );
                                for c in 0..d {
                                    mem.vals[ik + c] = dk[c] as f32;
                                    mem.vals[iv + c] = dv[c] as f32;
                                }
                            } else {
                                let mut dq = vec![0.0; d];
                                for j in 0..tk {
                                    let (_, ds) = p_ds(mem, bi, hi, own, j);
                                    let kj = rd(mem, k, p.k, bi, hi, j);
                                    for c in 0..d {
                                        dq[c] += scale * ds * kj[c];
                                    }
                                }
                                let iq = mem.row(l.ptrs[6], p.q, (bi, hi, own), d);
                                for (dst, x) in mem.vals[iq..iq + d].iter_mut().zip(&dq) {
                                    *dst = *x as f32;
                                }
                            }
                        }
                    }
                }
            }
        }

        fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
            assert_eq!(a.shape(), b.shape());
            a.to_f64_vec()
                .iter()
                .zip(b.to_f64_vec())
                .map(|(x, y)| {
                    if x.is_nan() {
                        f64::INFINITY
                    } else {
                        (x - y).abs()
                    }
                })
                .fold(0.0, f64::max)
        }

        /// The CPU attention's output and gradients for output gradient `g`.
        fn cpu_attention(
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            g: &Tensor,
            drop: Option<AttentionDropout>,
        ) -> (Tensor, Vec<Tensor>) {
            let ps: Vec<crate::Parameter> = [q, k, v]
                .iter()
                .map(|x| crate::Parameter::new(x.contiguous().unwrap()))
                .collect();
            let [pq, pk, pv] = [0, 1, 2].map(|i| ps[i].tensor());
            let o = Tensor::causal_attention_dropout(&pq, &pk, &pv, drop).unwrap();
            o.backward_with(g.clone()).unwrap();
            (o, ps.iter().map(|p| p.grad().unwrap()).collect())
        }

        /// Plans the forward and backward of causal_attention for host views q, k, v (layouts
        /// that group without copies) as operands of `dtype` (f32 values standing in for
        /// bf16 ones: the plans and addresses are bf16's), replays them and compares with the
        /// CPU. Returns the entry points of both plans, in order.
        fn replay_attention(
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            seed: u64,
            dtype: DType,
            drop: Option<AttentionDropout>,
        ) -> Vec<String> {
            let r = q.rank();
            let lead = q.shape()[..r - 2].to_vec();
            let (tq, tk, d) = (q.shape()[r - 2], k.shape()[r - 2], q.shape()[r - 1]);
            let groups = HeadGroups::of(&lead, &[q.clone(), k.clone(), v.clone()]).unwrap();
            let pr = Problem {
                op: "replay",
                dtype,
                b: groups.b,
                h: groups.h,
                tq,
                tk,
                d,
                scale: 1.0 / (d as f32).sqrt(),
                drop,
            };
            let esz = pr.esz();
            let g = Tensor::randn(q.shape(), 0.0, 1.0, seed);
            let mut mem = Arena::new();
            let operand = |t: &Tensor, base: u64| Operand {
                ptr: base + esz * t.layout().offset() as u64,
                st: groups.strides(t).unwrap(),
            };
            let ins: Vec<Operand> = [q, k, v]
                .iter()
                .map(|t| operand(t, mem.put(t, esz)))
                .collect();
            let out_shape = q.shape().to_vec();
            let n_out = q.numel();
            let o_base = mem.zeros(n_out, esz);
            let oo = operand(&Tensor::zeros(&out_shape), o_base);
            let lse = mem.zeros(pr.b * pr.h * tq, 4);
            let fwd = forward_plan(&pr, [&ins[0], &ins[1], &ins[2], &oo], lse).unwrap();
            replay(&fwd, &mut mem, d, drop);
            let g_base = mem.put(&g, esz);
            let go = operand(&g, g_base);
            // The backward's operands and gradient buffers, as with_grad_buffer picks them.
            let mut bwd_ins = Vec::new();
            let mut grads = Vec::new();
            for t in [q, k, v] {
                let t = if is_dense_permutation(t.layout()) {
                    t.clone()
                } else {
                    t.contiguous().unwrap()
                };
                let op = operand(&t, mem.put(&t, esz));
                let gbase = mem.zeros(t.numel(), esz);
                grads.push((gbase, t.shape().to_vec(), t.layout().strides().to_vec()));
                bwd_ins.push(op);
            }
            let delta = mem.zeros(pr.b * pr.h * tq, 4);
            let bwd = backward_plan(
                &pr,
                [&bwd_ins[0], &bwd_ins[1], &bwd_ins[2], &oo, &go],
                [lse, delta],
                [0, 1, 2].map(|i| grads[i].0),
            )
            .unwrap();
            replay(&bwd, &mut mem, d, drop);

            let (want_o, want_g) = cpu_attention(q, k, v, &g, drop);
            let got_o = mem.read(
                &out_shape,
                &crate::layout::contiguous_strides(&out_shape),
                o_base,
            );
            let e = max_abs_diff(&got_o, &want_o);
            assert!(e < 1e-4, "forward {:?}: {e}", q.shape());
            for (i, (base, shape, strides)) in grads.iter().enumerate() {
                let got = mem.read(shape, strides, *base);
                let e = max_abs_diff(&got, &want_g[i]);
                assert!(e < 1e-3, "gradient {i} {shape:?}: {e}");
            }
            fwd.iter().chain(&bwd).map(|l| l.entry.clone()).collect()
        }

        #[test]
        fn replayed_plans_match_the_cpu_for_strided_views() {
            let (b, h, d) = (2, 3, 32);
            let x = |shape: &[usize], seed| Tensor::randn(shape, 0.0, 1.0, seed);
            // Heads split out of [B, T, H, D] buffers (dense permutations: gradients written
            // through the same strides), and keys/values narrowed from a longer cache (copied
            // to contiguous for the backward), with Tq < Tk.
            let (tq, tk) = (37, 70);
            let q = x(&[b, tq, h, d], 1).permute(&[0, 2, 1, 3]).unwrap();
            let k = x(&[b, h, tk + 9, d], 2).narrow(2, 4, tk).unwrap();
            let v = x(&[b, tk, h, d], 3).permute(&[0, 2, 1, 3]).unwrap();
            let drop = AttentionDropout::new(0.3, 99).ok();
            replay_attention(&q, &k, &v, 4, DType::F32, None);
            replay_attention(&q, &k, &v, 4, DType::F32, drop);
            // Three leading dims that merge into one batch dim; no leading dims at all.
            let y = |t, seed| x(&[2, 2, 2, t, d], seed);
            replay_attention(&y(20, 5), &y(33, 6), &y(33, 7), 8, DType::F32, None);
            replay_attention(&y(20, 5), &y(33, 6), &y(33, 7), 8, DType::F32, drop);
            let z = |seed| x(&[17, 64], seed);
            replay_attention(&z(9), &z(10), &z(11), 12, DType::F32, drop);
        }

        #[test]
        fn replayed_mma_plans_match_the_cpu() {
            // bf16 plans (2-byte elements) with D = 64 and 128: aligned operands take the
            // tensor-core forward and backward, Tq < Tk and ragged tiles included.
            let x = |shape: &[usize], seed| Tensor::randn(shape, 0.0, 1.0, seed);
            let mma = |d, bwd: &str| {
                [
                    format!("flash_attn_fwd_mma_bf16_d{d}"),
                    "flash_attn_bwd_delta_bf16".to_string(),
                    format!("flash_attn_bwd_dkdv_{bwd}_d{d}"),
                    format!("flash_attn_bwd_dq_{bwd}_d{d}"),
                ]
            };
            for (d, tq, tk) in [(64usize, 37usize, 70usize), (128, 20, 20)] {
                // Heads split out of [B, T, H, D] (time stride H·D) and narrowed keys (copied
                // for the backward).
                let q = x(&[2, tq, 3, d], 1).permute(&[0, 2, 1, 3]).unwrap();
                let k = x(&[2, 3, tk + 9, d], 2).narrow(2, 4, tk).unwrap();
                let v = x(&[2, tk, 3, d], 3).permute(&[0, 2, 1, 3]).unwrap();
                let plain = replay_attention(&q, &k, &v, 4, DType::BF16, None);
                assert_eq!(plain, mma(d, "mma_bf16"));
                let drop = AttentionDropout::new(0.2, d as u64).ok();
                let dropping = replay_attention(&q, &k, &v, 4, DType::BF16, drop);
                assert_eq!(dropping, mma(d, "mma_drop_bf16"));
            }
            // Keys starting one element into their buffer (2 bytes: not 16-byte aligned), a
            // dense view that the backward reads as it stands: SIMT kernels both ways.
            let d = 64;
            let q = x(&[1, 2, 30, d], 5);
            let kbuf = x(&[2 * 30 * d + 1], 6);
            let k = kbuf
                .narrow(0, 1, 2 * 30 * d)
                .unwrap()
                .reshape_to(&[1, 2, 30, d])
                .unwrap();
            let v = x(&[1, 2, 30, d], 7);
            let simt = [
                format!("flash_attn_fwd_bf16_d{d}"),
                "flash_attn_bwd_delta_bf16".to_string(),
                format!("flash_attn_bwd_dkdv_bf16_d{d}"),
                format!("flash_attn_bwd_dq_bf16_d{d}"),
            ];
            assert_eq!(replay_attention(&q, &k, &v, 8, DType::BF16, None), simt);
        }

        #[test]
        fn replayed_plans_chunk_batches_past_the_grid_limit() {
            // 2 × 35000 heads: chunks of 32767 batch elements of 2 heads each (gridDim.y ≤
            // 65535), each launch's pointers and lse/delta rows moved to its chunk.
            let (d, tk) = (32, 2);
            let x = |t, seed| Tensor::randn(&[35_000, 2, t, d], 0.0, 1.0, seed);
            // With dropout: each chunk's launches carry their first head index (bh0), so the
            // dropped elements are those of the whole problem's head numbering.
            let drop = AttentionDropout::new(0.5, 7).ok();
            replay_attention(&x(1, 1), &x(tk, 2), &x(tk, 3), 4, DType::F32, drop);
        }

        #[test]
        fn replayed_packed_plans_match_the_cpu() {
            let half = AttentionDropout::new(0.5, 3).ok();
            for (b, t, h, dh, dtype, drop) in [
                (2usize, 45usize, 3usize, 32usize, DType::F32, None),
                (1, 20, 2, 64, DType::F32, None),
                (2, 33, 2, 32, DType::F32, half),
                // bf16 with D = 64: the tensor-core kernels, Q, K, V and d(qkv) thirds of
                // one packed buffer each (offsets C and 2C, time stride 3C, 2-byte elements).
                (2, 45, 3, 64, DType::BF16, None),
                (2, 45, 3, 64, DType::BF16, half),
            ] {
                let c = h * dh;
                let qkv = Tensor::randn(&[b, t, 3 * c], 0.0, 1.0, 21);
                let g = Tensor::randn(&[b, t, c], 0.0, 1.0, 22);
                let pr = Problem {
                    op: "replay",
                    dtype,
                    b,
                    h,
                    tq: t,
                    tk: t,
                    d: dh,
                    scale: 1.0 / (dh as f32).sqrt(),
                    drop,
                };
                let esz = pr.esz();
                let mut mem = Arena::new();
                let x = mem.put(&qkv, esz);
                let [q, k, v] = pr.packed_qkv(x);
                let merged = pr.merged_heads_strides();
                let o_base = mem.zeros(b * t * c, esz);
                let o = Operand {
                    ptr: o_base,
                    st: merged,
                };
                let lse = mem.zeros(b * h * t, 4);
                let fwd = forward_plan(&pr, [&q, &k, &v, &o], lse).unwrap();
                replay(&fwd, &mut mem, dh, drop);
                let dout = Operand {
                    ptr: mem.put(&g, esz),
                    st: merged,
                };
                let delta = mem.zeros(b * h * t, 4);
                let dqkv = mem.zeros(b * t * 3 * c, esz);
                let [dq, dk, dv] = pr.packed_qkv(dqkv).map(|o| o.ptr);
                let bwd = backward_plan(&pr, [&q, &k, &v, &o, &dout], [lse, delta], [dq, dk, dv])
                    .unwrap();
                replay(&bwd, &mut mem, dh, drop);
                let mma = fwd.iter().chain(&bwd).filter(|l| l.entry.contains("_mma_"));
                assert_eq!(mma.count(), if dtype == DType::BF16 { 3 } else { 0 });

                let p = crate::Parameter::new(qkv.clone());
                let want = Tensor::causal_self_attention_dropout(&p.tensor(), h, drop).unwrap();
                want.backward_with(g.clone()).unwrap();
                let got = mem.read(&[b, t, c], &[t * c, c, 1], o_base);
                assert!(max_abs_diff(&got, &want) < 1e-4);
                let got = mem.read(&[b, t, 3 * c], &[3 * t * c, 3 * c, 1], dqkv);
                let e = max_abs_diff(&got, &p.grad().unwrap());
                assert!(e < 1e-3, "d(qkv) {dtype} B{b} T{t} H{h} Dh{dh}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{AttentionDropout, Parameter, Tensor};
    use proptest::prelude::*;

    fn grads(
        f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> crate::Result<Tensor>,
        xs: &[Tensor],
        w: &Tensor,
    ) -> (Vec<f64>, Vec<Vec<f64>>) {
        let ps: Vec<Parameter> = xs.iter().map(|x| Parameter::new(x.clone())).collect();
        let out = f(&ps[0].tensor(), &ps[1].tensor(), &ps[2].tensor()).unwrap();
        out.mul(w).unwrap().sum_all().unwrap().backward().unwrap();
        (
            out.to_f64_vec(),
            ps.iter().map(|p| p.grad().unwrap().to_f64_vec()).collect(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn fused_equals_composed(b in 1usize..3, h in 1usize..3, tk in 1usize..40, dq in 0usize..40, d in 1usize..20, seed in 0u64..1000, p in prop_oneof![Just(0.0f32), Just(0.2), Just(0.6)]) {
            let tq = tk - dq.min(tk - 1);
            let q = Tensor::randn(&[b, h, tq, d], 0.0, 1.0, seed);
            let k = Tensor::randn(&[b, h, tk, d], 0.0, 1.0, seed + 1);
            let v = Tensor::randn(&[b, h, tk, d], 0.0, 1.0, seed + 2);
            let w = Tensor::randn(&[b, h, tq, d], 0.0, 1.0, seed + 3);
            let xs = [q, k, v];
            let drop = Some(AttentionDropout::new(p, seed).unwrap());
            let (o1, g1) = grads(&|q, k, v| Tensor::causal_attention_dropout(q, k, v, drop), &xs, &w);
            let (o2, g2) = grads(&|q, k, v| Tensor::causal_attention_reference_dropout(q, k, v, drop), &xs, &w);
            for (a, e) in o1.iter().zip(&o2) { prop_assert!((a - e).abs() < 1e-4, "out {a} {e}"); }
            for (ga, ge) in g1.iter().zip(&g2) {
                for (a, e) in ga.iter().zip(ge) { prop_assert!((a - e).abs() < 1e-3 * (1.0 + e.abs()), "grad {a} {e}"); }
            }
        }
    }

    #[test]
    fn fused_self_attention_equals_split_views() {
        // dh = 20 also takes copy_row's 16-wide pieces; 5 only its tail.
        for dims in [(2, 7, 3, 5), (3, 5, 2, 20)] {
            fused_self_attention_case(dims, None);
        }
        fused_self_attention_case((2, 9, 2, 4), AttentionDropout::new(0.4, 8).ok());
        assert!(Tensor::causal_self_attention(&Tensor::zeros(&[1, 2, 10]), 3).is_err());
    }

    fn fused_self_attention_case(
        (b, t, h, dh): (usize, usize, usize, usize),
        drop: Option<AttentionDropout>,
    ) {
        let qkv = Tensor::randn(&[b, t, 3 * h * dh], 0.0, 1.0, 4);
        let w = Tensor::randn(&[b, t, h * dh], 0.0, 1.0, 5);
        let split = |x: &Tensor| -> crate::Result<Tensor> {
            let x = x.reshape_to(&[b, t, 3, h, dh])?.permute(&[2, 0, 3, 1, 4])?;
            let part = |i| x.narrow(0, i, 1)?.squeeze(0);
            let o =
                Tensor::causal_attention_reference_dropout(&part(0)?, &part(1)?, &part(2)?, drop)?;
            o.permute(&[0, 2, 1, 3])?.reshape_to(&[b, t, h * dh])
        };
        let run = |f: &dyn Fn(&Tensor) -> crate::Result<Tensor>| {
            let p = Parameter::new(qkv.clone());
            let o = f(&p.tensor()).unwrap();
            o.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
            (o.to_f64_vec(), p.grad().unwrap().to_f64_vec())
        };
        let (o1, g1) = run(&|x| Tensor::causal_self_attention_dropout(x, h, drop));
        let (o2, g2) = run(&split);
        for (a, e) in o1.iter().zip(&o2).chain(g1.iter().zip(&g2)) {
            assert!((a - e).abs() < 1e-4 * (1.0 + e.abs()), "{a} vs {e}");
        }
        let err = crate::gradcheck::check_gradients(
            &[qkv],
            |x| Tensor::causal_self_attention_dropout(&x[0], h, drop),
            1e-2,
        )
        .unwrap();
        assert!(err < 1e-3, "{err}");
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let q = Tensor::zeros(&[1, 4, 8]);
        assert!(Tensor::causal_attention(
            &q,
            &Tensor::zeros(&[1, 3, 8]),
            &Tensor::zeros(&[1, 3, 8])
        )
        .is_err());
        assert!(Tensor::causal_attention(
            &q,
            &Tensor::zeros(&[1, 4, 7]),
            &Tensor::zeros(&[1, 4, 7])
        )
        .is_err());
    }
}
