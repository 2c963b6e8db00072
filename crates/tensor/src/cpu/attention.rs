//! TEMPORARY placeholder with the agreed API (replaced by the attention branch on merge).
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub bh: usize,
    pub tq: usize,
    pub tk: usize,
    pub d: usize,
}
pub fn causal_attention_forward(
    s: AttentionShape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) -> crate::Result<()> {
    let (tq, tk, d) = (s.tq, s.tk, s.d);
    for b in 0..s.bh {
        for i in 0..tq {
            let p = tk - tq + i;
            let qi = &q[(b * tq + i) * d..][..d];
            let sc: Vec<f32> = (0..=p)
                .map(|j| {
                    scale
                        * qi.iter()
                            .zip(&k[(b * tk + j) * d..][..d])
                            .map(|(x, y)| x * y)
                            .sum::<f32>()
                })
                .collect();
            let m = sc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = sc.iter().map(|x| (x - m).exp()).sum();
            lse[b * tq + i] = m + z.ln();
            let o = &mut out[(b * tq + i) * d..][..d];
            o.fill(0.0);
            for (j, sj) in sc.iter().enumerate() {
                let w = (sj - m).exp() / z;
                for c in 0..d {
                    o[c] += w * v[(b * tk + j) * d + c];
                }
            }
        }
    }
    Ok(())
}
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_backward(
    s: AttentionShape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) -> crate::Result<()> {
    let (tq, tk, d) = (s.tq, s.tk, s.d);
    dq.fill(0.0);
    dk.fill(0.0);
    dv.fill(0.0);
    for b in 0..s.bh {
        for i in 0..tq {
            let p = tk - tq + i;
            let r = b * tq + i;
            let qi = &q[r * d..][..d];
            let doi = &dout[r * d..][..d];
            let di: f32 = doi.iter().zip(&out[r * d..][..d]).map(|(x, y)| x * y).sum();
            for j in 0..=p {
                let kj = &k[(b * tk + j) * d..][..d];
                let pij =
                    (scale * qi.iter().zip(kj).map(|(x, y)| x * y).sum::<f32>() - lse[r]).exp();
                let dpij: f32 = doi
                    .iter()
                    .zip(&v[(b * tk + j) * d..][..d])
                    .map(|(x, y)| x * y)
                    .sum();
                let ds = pij * (dpij - di) * scale;
                for c in 0..d {
                    dv[(b * tk + j) * d + c] += pij * doi[c];
                    dq[r * d + c] += ds * kj[c];
                    dk[(b * tk + j) * d + c] += ds * qi[c];
                }
            }
        }
    }
    Ok(())
}
