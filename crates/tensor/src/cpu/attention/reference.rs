//! The plain versions: one full `tq × tk` score matrix per head, the textbook formulas, no
//! tiling or SIMD. The tests compare the fused kernels against these, and the benchmark
//! measures the fused kernels' speedup over them. They parallelise over heads only (one head
//! per task), so that the comparison is about the algorithm, not about threads.

use super::{AttentionDropout, AttentionShape};
use rayon::prelude::*;

/// Row `i` of a row-major matrix with rows of `d` floats.
fn row(x: &[f32], d: usize, i: usize) -> &[f32] {
    &x[i * d..(i + 1) * d]
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// See [`super::causal_attention_forward_reference`]; lengths already checked, `tq ≤ tk`.
pub(super) fn forward(
    shape: AttentionShape,
    scale: f32,
    drop: Option<AttentionDropout>,
    (q, k, v): (&[f32], &[f32], &[f32]),
    out: &mut [f32],
    lse: &mut [f32],
) {
    let AttentionShape { tq, tk, d, .. } = shape;
    if tq == 0 || d == 0 {
        return;
    }
    let off = tk - tq;
    out.par_chunks_mut(tq * d)
        .zip(lse.par_chunks_mut(tq))
        .enumerate()
        .for_each(|(b, (oh, lh))| {
            let qh = &q[b * tq * d..][..tq * d];
            let kh = &k[b * tk * d..][..tk * d];
            let vh = &v[b * tk * d..][..tk * d];
            // Masked scores are −inf, so that they get probability exactly 0.
            let mut s = vec![f32::NEG_INFINITY; tq * tk];
            for i in 0..tq {
                for j in 0..=off + i {
                    s[i * tk + j] = scale * dot(row(qh, d, i), row(kh, d, j));
                }
            }
            for i in 0..tq {
                let row = &mut s[i * tk..(i + 1) * tk];
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut l = 0.0;
                for x in row.iter_mut() {
                    *x = (*x - m).exp();
                    l += *x;
                }
                for x in row.iter_mut() {
                    *x /= l;
                }
                lh[i] = m + l.ln();
                // Dropout after normalisation: O = (P ⊙ Z)·V, the logsumexp undropped.
                if let Some(dr) = drop {
                    let r = dr.row(b, i);
                    for (j, x) in row.iter_mut().enumerate() {
                        *x *= r.factor(j);
                    }
                }
                let o = &mut oh[i * d..(i + 1) * d];
                o.fill(0.0);
                for (j, &p) in row.iter().enumerate() {
                    for (oc, &vc) in o.iter_mut().zip(&vh[j * d..(j + 1) * d]) {
                        *oc += p * vc;
                    }
                }
            }
        });
}

/// See [`super::causal_attention_backward_reference`]; lengths already checked, `tq ≤ tk`.
pub(super) fn backward(
    shape: AttentionShape,
    scale: f32,
    drop: Option<AttentionDropout>,
    (q, k, v, out, lse, dout): super::BwdInputs<'_>,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let AttentionShape { tq, tk, d, .. } = shape;
    if tq == 0 || d == 0 {
        return;
    }
    let off = tk - tq;
    dq.par_chunks_mut(tq * d)
        .zip(dk.par_chunks_mut(tk * d))
        .zip(dv.par_chunks_mut(tk * d))
        .enumerate()
        .for_each(|(b, ((dqh, dkh), dvh))| {
            let qh = &q[b * tq * d..][..tq * d];
            let oh = &out[b * tq * d..][..tq * d];
            let doh = &dout[b * tq * d..][..tq * d];
            let lh = &lse[b * tq..][..tq];
            let kh = &k[b * tk * d..][..tk * d];
            let vh = &v[b * tk * d..][..tk * d];
            // P from the saved logsumexp; masked entries stay 0.
            let mut p = vec![0.0f32; tq * tk];
            for i in 0..tq {
                for j in 0..=off + i {
                    let s = scale * dot(row(qh, d, i), row(kh, d, j));
                    p[i * tk + j] = (s - lh[i]).exp();
                }
            }
            // With dropout factors Z (all ones without): O = (P ⊙ Z)·V, so dP = Z ⊙ dO·Vᵀ,
            // dV = (P ⊙ Z)ᵀ·dO, and dS = P ⊙ (dP − D) with D_i = rowsum(dO ⊙ O) still (it
            // equals Σ_j P_ij·dP_ij).
            let mut z = vec![1.0f32; tq * tk];
            if let Some(dr) = drop {
                for i in 0..tq {
                    let r = dr.row(b, i);
                    for (j, zij) in z[i * tk..(i + 1) * tk].iter_mut().enumerate() {
                        *zij = r.factor(j);
                    }
                }
            }
            let mut ds = vec![0.0f32; tq * tk];
            for i in 0..tq {
                let di = dot(row(doh, d, i), row(oh, d, i));
                for j in 0..=off + i {
                    let dp = z[i * tk + j] * dot(row(doh, d, i), row(vh, d, j));
                    ds[i * tk + j] = p[i * tk + j] * (dp - di);
                }
            }
            dqh.fill(0.0);
            dkh.fill(0.0);
            dvh.fill(0.0);
            for i in 0..tq {
                // Entries past the diagonal are 0 in both P and dS.
                for j in 0..=off + i {
                    let (pij, dsij) = (p[i * tk + j] * z[i * tk + j], ds[i * tk + j]);
                    for c in 0..d {
                        // dV = (P ⊙ Z)ᵀ·dO, dQ = scale·dS·K, dK = scale·dSᵀ·Q.
                        dvh[j * d + c] += pij * doh[i * d + c];
                        dqh[i * d + c] += scale * dsij * kh[j * d + c];
                        dkh[j * d + c] += scale * dsij * qh[i * d + c];
                    }
                }
            }
        });
}
