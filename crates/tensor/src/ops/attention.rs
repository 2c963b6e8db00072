//! Causal self-attention: softmax(Q·Kᵀ/√d + causal mask)·V.
//!
//! [`Tensor::causal_attention`] runs the fused CPU kernel (flash-attention style: blocks of
//! queries and keys with an online softmax, so no T×T matrix per head is ever held) and its
//! fused backward. [`Tensor::causal_attention_reference`] composes the same maths from matmul,
//! masked_fill and softmax; tests hold the two equal, forward and backward.
//!
//! Queries may be fewer than keys (decoding with a KV cache): query i of Tq sits at absolute
//! position Tk - Tq + i and sees keys 0..=that position.

use crate::cpu::attention::{causal_attention_backward, causal_attention_forward, AttentionShape};
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
    pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (_, shape) = attention_shape(q, k, v)?;
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
        let (_, s) = attention_shape(q, k, v)?;
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
        scores.softmax(-1)?.matmul(v)
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
    pub fn causal_self_attention(qkv: &Tensor, n_head: usize) -> Result<Tensor> {
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
        let mut out = Pooled(crate::cpu::pool::zeroed(n));
        let mut lse = Pooled(crate::cpu::pool::zeroed(b * n_head * t));
        if n > 0 {
            causal_attention_forward(shape, scale, &q, &k, &v, &mut out, &mut lse)?;
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
                        shape, scale, &q, &k, &v, &out, &lse, &dout, dq, dk, dv,
                    )?;
                }
                let dqkv = merge_qkv(&d, dims);
                d.into_iter().for_each(crate::cpu::pool::recycle);
                Ok(vec![Some(Tensor::f32_owned(dqkv, &[b, t, d3]))])
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use crate::{Parameter, Tensor};
    use proptest::prelude::*;

    fn grads(
        f: fn(&Tensor, &Tensor, &Tensor) -> crate::Result<Tensor>,
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
        fn fused_equals_composed(b in 1usize..3, h in 1usize..3, tk in 1usize..40, dq in 0usize..40, d in 1usize..20, seed in 0u64..1000) {
            let tq = tk - dq.min(tk - 1);
            let q = Tensor::randn(&[b, h, tq, d], 0.0, 1.0, seed);
            let k = Tensor::randn(&[b, h, tk, d], 0.0, 1.0, seed + 1);
            let v = Tensor::randn(&[b, h, tk, d], 0.0, 1.0, seed + 2);
            let w = Tensor::randn(&[b, h, tq, d], 0.0, 1.0, seed + 3);
            let xs = [q, k, v];
            let (o1, g1) = grads(Tensor::causal_attention, &xs, &w);
            let (o2, g2) = grads(Tensor::causal_attention_reference, &xs, &w);
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
            fused_self_attention_case(dims);
        }
        assert!(Tensor::causal_self_attention(&Tensor::zeros(&[1, 2, 10]), 3).is_err());
    }

    fn fused_self_attention_case((b, t, h, dh): (usize, usize, usize, usize)) {
        let qkv = Tensor::randn(&[b, t, 3 * h * dh], 0.0, 1.0, 4);
        let w = Tensor::randn(&[b, t, h * dh], 0.0, 1.0, 5);
        let split = |x: &Tensor| -> crate::Result<Tensor> {
            let x = x.reshape_to(&[b, t, 3, h, dh])?.permute(&[2, 0, 3, 1, 4])?;
            let part = |i| x.narrow(0, i, 1)?.squeeze(0);
            let o = Tensor::causal_attention_reference(&part(0)?, &part(1)?, &part(2)?)?;
            o.permute(&[0, 2, 1, 3])?.reshape_to(&[b, t, h * dh])
        };
        let run = |f: &dyn Fn(&Tensor) -> crate::Result<Tensor>| {
            let p = Parameter::new(qkv.clone());
            let o = f(&p.tensor()).unwrap();
            o.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
            (o.to_f64_vec(), p.grad().unwrap().to_f64_vec())
        };
        let (o1, g1) = run(&|x| Tensor::causal_self_attention(x, h));
        let (o2, g2) = run(&split);
        for (a, e) in o1.iter().zip(&o2).chain(g1.iter().zip(&g2)) {
            assert!((a - e).abs() < 1e-4 * (1.0 + e.abs()), "{a} vs {e}");
        }
        let err = crate::gradcheck::check_gradients(
            &[qkv],
            |x| Tensor::causal_self_attention(&x[0], h),
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
