//! Fused causal self-attention on the CPU, forward and backward, with its plain reference.
//!
//! Layout: `q` is `[bh, tq, d]`, `k` and `v` are `[bh, tk, d]`, all contiguous and row-major,
//! where `bh` = batch × heads. Query row `i` sits at absolute position `p = tk − tq + i` and
//! attends keys `0..=p`, so `tq == tk` is training attention and `tq == 1` with a longer `tk` is
//! one decoding step against a KV cache; `tq ≤ tk` is required.
//!
//! The fused kernels (`fused.rs`) are flash-attention style: tiles of 64 queries × 64 keys
//! with an online softmax in the forward, probabilities recomputed from the saved logsumexp in
//! the backward (flash-attention-2), key tiles above the diagonal skipped. At most one score
//! tile per thread is alive, never the `tq × tk` matrix of a head. Block products and the
//! softmax run on AVX-512 or AVX2+FMA vectors (`simd.rs`) with a scalar fallback, picked by
//! [`crate::cpu::isa`] or explicitly through the `*_with` variants. Results are bitwise
//! identical for any thread count: how the work is cut depends only on the shape.
//!
//! The `*_reference` functions hold one full score matrix per head and follow the textbook
//! formulas; the tests compare every instruction-set path against them.

mod dropout;
mod fused;
mod reference;
mod simd;
#[cfg(test)]
mod tests;

pub(crate) use dropout::drop_threshold;
pub use dropout::{AttentionDropout, DropRow};

use super::Isa;
use crate::{Error, Result};

/// The sizes of one attention call; see the module docs for the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Batch × heads: independent attention problems.
    pub bh: usize,
    /// Query rows per problem.
    pub tq: usize,
    /// Keys (and values) per problem; `tq ≤ tk`.
    pub tk: usize,
    /// Head dimension.
    pub d: usize,
}

impl AttentionShape {
    /// Element counts of a `[bh, tq, d]` tensor, a `[bh, tk, d]` tensor and the `[bh, tq]`
    /// logsumexp, or an error if `tq > tk`, `d == 0` or a count overflows.
    fn sizes(self, op: &'static str) -> Result<(usize, usize, usize)> {
        let AttentionShape { bh, tq, tk, d } = self;
        if tq > tk {
            return Err(Error::invalid(
                op,
                format!("{self:?}: tq = {tq} query rows but only tk = {tk} keys; causal attention with a KV offset needs tq <= tk"),
            ));
        }
        if d == 0 && bh * tq > 0 {
            return Err(Error::invalid(
                op,
                format!("{self:?}: head dimension d must be at least 1"),
            ));
        }
        let overflow = || Error::invalid(op, format!("{self:?}: element count overflows usize"));
        let q_len = bh
            .checked_mul(tq)
            .and_then(|x| x.checked_mul(d))
            .ok_or_else(overflow)?;
        let kv_len = bh
            .checked_mul(tk)
            .and_then(|x| x.checked_mul(d))
            .ok_or_else(overflow)?;
        Ok((q_len, kv_len, bh * tq))
    }
}

/// The backward's inputs `(q, k, v, out, lse, dout)`.
type BwdInputs<'a> = (
    &'a [f32],
    &'a [f32],
    &'a [f32],
    &'a [f32],
    &'a [f32],
    &'a [f32],
);

/// An error unless `got == want`, naming the argument, the shape and both counts.
fn check_len(
    op: &'static str,
    shape: AttentionShape,
    name: &str,
    dims: &str,
    got: usize,
    want: usize,
) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            format!("{name} has {got} elements but {shape:?} needs {dims} = {want}"),
        ))
    }
}

fn check_isa(op: &'static str, isa: Isa) -> Result<()> {
    if isa.is_available() {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            format!("{isa:?} is not supported by this CPU"),
        ))
    }
}

/// Checks the forward's slice lengths; returns whether there is any work.
fn check_forward(
    op: &'static str,
    shape: AttentionShape,
    (q, k, v): (&[f32], &[f32], &[f32]),
    (out, lse): (usize, usize),
) -> Result<bool> {
    let (q_len, kv_len, lse_len) = shape.sizes(op)?;
    check_len(op, shape, "q", "bh*tq*d", q.len(), q_len)?;
    check_len(op, shape, "k", "bh*tk*d", k.len(), kv_len)?;
    check_len(op, shape, "v", "bh*tk*d", v.len(), kv_len)?;
    check_len(op, shape, "out", "bh*tq*d", out, q_len)?;
    check_len(op, shape, "lse", "bh*tq", lse, lse_len)?;
    Ok(q_len > 0)
}

/// Checks the backward's slice lengths; returns whether there is any work.
#[allow(clippy::too_many_arguments)] // one argument per tensor of the API
fn check_backward(
    op: &'static str,
    shape: AttentionShape,
    (q, k, v, out, lse, dout): BwdInputs<'_>,
    dq: usize,
    dk: usize,
    dv: usize,
) -> Result<bool> {
    let (q_len, kv_len, lse_len) = shape.sizes(op)?;
    check_len(op, shape, "q", "bh*tq*d", q.len(), q_len)?;
    check_len(op, shape, "k", "bh*tk*d", k.len(), kv_len)?;
    check_len(op, shape, "v", "bh*tk*d", v.len(), kv_len)?;
    check_len(op, shape, "out", "bh*tq*d", out.len(), q_len)?;
    check_len(op, shape, "lse", "bh*tq", lse.len(), lse_len)?;
    check_len(op, shape, "dout", "bh*tq*d", dout.len(), q_len)?;
    check_len(op, shape, "dq", "bh*tq*d", dq, q_len)?;
    check_len(op, shape, "dk", "bh*tk*d", dk, kv_len)?;
    check_len(op, shape, "dv", "bh*tk*d", dv, kv_len)?;
    Ok(q_len > 0)
}

/// Dropout that can drop something, or `None`: the kernels skip the hashing for `None`.
fn active(drop: Option<AttentionDropout>) -> Option<AttentionDropout> {
    drop.filter(AttentionDropout::is_active)
}

/// `out[bh,tq,d] = (softmax(q·kᵀ·scale + causal mask) ⊙ Z)·v` where `Z` is the dropout factor
/// of each element ([`AttentionDropout`]; all ones without dropout); `lse[bh,tq]` = logsumexp
/// of each scaled, masked score row (saved for the backward). Fused kernel on
/// [`crate::cpu::isa`].
///
/// Errors when a slice length disagrees with `shape`, when `tq > tk` or when `d == 0`.
#[allow(clippy::too_many_arguments)] // one argument per tensor of the API
pub fn causal_attention_forward(
    shape: AttentionShape,
    scale: f32,
    drop: Option<AttentionDropout>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    causal_attention_forward_with(super::isa(), shape, scale, drop, q, k, v, out, lse)
}

/// [`causal_attention_forward`] on an explicit instruction set (an error if this CPU lacks it).
#[allow(clippy::too_many_arguments)] // one argument per tensor of the API
pub fn causal_attention_forward_with(
    isa: Isa,
    shape: AttentionShape,
    scale: f32,
    drop: Option<AttentionDropout>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    const OP: &str = "causal_attention_forward";
    check_isa(OP, isa)?;
    if check_forward(OP, shape, (q, k, v), (out.len(), lse.len()))? {
        fused::forward(isa, shape, scale, active(drop), q, k, v, out, lse);
    }
    Ok(())
}

/// Given `dout`, writes (overwrites) `dq`, `dk`, `dv` of [`causal_attention_forward`].
/// Recomputes the probabilities from `q`, `k` and `lse` (flash-attention-2 style) with
/// `D_i = rowsum(dout ⊙ out)`; `out` and `lse` must be the forward's, and `drop` the same
/// dropout (it drops the same elements again: `dP = Z ⊙ dO·Vᵀ`, `dV = (P ⊙ Z)ᵀ·dO`).
#[allow(clippy::too_many_arguments)] // one argument per tensor of the API
pub fn causal_attention_backward(
    shape: AttentionShape,
    scale: f32,
    drop: Option<AttentionDropout>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) -> Result<()> {
    causal_attention_backward_with(
        super::isa(),
        shape,
        scale,
        drop,
        q,
        k,
        v,
        out,
        lse,
        dout,
        dq,
        dk,
        dv,
    )
}

/// [`causal_attention_backward`] on an explicit instruction set (an error if this CPU lacks it).
#[allow(clippy::too_many_arguments)] // one argument per tensor of the API
pub fn causal_attention_backward_with(
    isa: Isa,
    shape: AttentionShape,
    scale: f32,
    drop: Option<AttentionDropout>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) -> Result<()> {
    const OP: &str = "causal_attention_backward";
    check_isa(OP, isa)?;
    let inputs = (q, k, v, out, lse, dout);
    if check_backward(OP, shape, inputs, dq.len(), dk.len(), dv.len())? {
        fused::backward(isa, shape, scale, active(drop), inputs, dq, dk, dv);
    } else {
        // No query rows (or no heads): no key is attended, so its gradients are zero.
        dk.fill(0.0);
        dv.fill(0.0);
    }
    Ok(())
}

/// The forward with one full score matrix per head: the reference the fused kernel is tested
/// against. Same arguments, results and errors as [`causal_attention_forward`].
#[allow(clippy::too_many_arguments)] // one argument per tensor of the API
pub fn causal_attention_forward_reference(
    shape: AttentionShape,
    scale: f32,
    drop: Option<AttentionDropout>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    const OP: &str = "causal_attention_forward_reference";
    if check_forward(OP, shape, (q, k, v), (out.len(), lse.len()))? {
        reference::forward(shape, scale, active(drop), (q, k, v), out, lse);
    }
    Ok(())
}

/// The backward with full probability and gradient matrices per head: the reference the fused
/// kernel is tested against. Same arguments, results and errors as
/// [`causal_attention_backward`].
#[allow(clippy::too_many_arguments)] // one argument per tensor of the API
pub fn causal_attention_backward_reference(
    shape: AttentionShape,
    scale: f32,
    drop: Option<AttentionDropout>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) -> Result<()> {
    const OP: &str = "causal_attention_backward_reference";
    let inputs = (q, k, v, out, lse, dout);
    if check_backward(OP, shape, inputs, dq.len(), dk.len(), dv.len())? {
        reference::backward(shape, scale, active(drop), inputs, dq, dk, dv);
    } else {
        dk.fill(0.0);
        dv.fill(0.0);
    }
    Ok(())
}
