//! Fused causal attention (flash-attention style tiles, SIMD picked by `cpu::isa()`) against
//! the reference (one full score matrix per head, plain loops), forward and backward, at
//! bh = 8 heads, T = tq = tk = 256 and 1024, d = 64. Both parallelise over rayon's pool (the
//! reference over heads only, so the comparison at bh = 8 is about the algorithm).
//!
//! Throughput is in "elements" = useful causal flops, not bytes:
//! forward 2·bh·T²·d (q·kᵀ and p·v over the ~T²/2 visible pairs, 2 flops per multiply-add),
//! backward 5·bh·T²·d (s, dp = dO·vᵀ, dv, dk, dq). The fused kernel also computes the masked
//! half of each diagonal tile; that work is not counted. Criterion's "elem/s" is flop/s.
//!
//! `cargo bench --bench attention` (RLHF_CPU_ISA=scalar|avx2|avx512 to pin the path).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rlhf_tensor::cpu::attention::{
    causal_attention_backward, causal_attention_backward_reference, causal_attention_forward,
    causal_attention_forward_reference, AttentionShape,
};

/// Reproducible inputs in [−1, 1) from a 64-bit LCG (Knuth's MMIX constants).
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

const BH: usize = 8;
const D: usize = 64;

fn bench_attention(c: &mut Criterion) {
    eprintln!(
        "attention bench: isa = {:?}, threads = {}",
        rlhf_tensor::cpu::isa(),
        rayon::current_num_threads()
    );
    for t in [256usize, 1024] {
        let shape = AttentionShape {
            bh: BH,
            tq: t,
            tk: t,
            d: D,
        };
        let scale = 1.0 / (D as f32).sqrt();
        let n = BH * t * D;
        let (q, k, v, dout) = (data(n, 1), data(n, 2), data(n, 3), data(n, 4));
        let (mut out, mut lse) = (vec![0.0; n], vec![0.0; BH * t]);
        causal_attention_forward(shape, scale, None, &q, &k, &v, &mut out, &mut lse).unwrap();
        let (mut dq, mut dk, mut dv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let id = |name: &str| BenchmarkId::new(name, format!("bh{BH}_T{t}_d{D}"));
        // The reference at T = 1024 takes seconds per call: few samples.
        let samples = if t >= 1024 { 10 } else { 20 };

        let mut g = c.benchmark_group("attention_fwd_causal_flops");
        g.sample_size(samples);
        g.throughput(Throughput::Elements((2 * BH * t * t * D) as u64));
        g.bench_function(id("fused"), |b| {
            b.iter(|| {
                causal_attention_forward(shape, scale, None, &q, &k, &v, &mut out, &mut lse)
                    .unwrap()
            })
        });
        let (mut out_r, mut lse_r) = (out.clone(), lse.clone());
        g.bench_function(id("reference"), |b| {
            b.iter(|| {
                causal_attention_forward_reference(
                    shape, scale, None, &q, &k, &v, &mut out_r, &mut lse_r,
                )
                .unwrap()
            })
        });
        g.finish();

        let mut g = c.benchmark_group("attention_bwd_causal_flops");
        g.sample_size(samples);
        g.throughput(Throughput::Elements((5 * BH * t * t * D) as u64));
        g.bench_function(id("fused"), |b| {
            b.iter(|| {
                causal_attention_backward(
                    shape, scale, None, &q, &k, &v, &out, &lse, &dout, &mut dq, &mut dk, &mut dv,
                )
                .unwrap()
            })
        });
        g.bench_function(id("reference"), |b| {
            b.iter(|| {
                causal_attention_backward_reference(
                    shape, scale, None, &q, &k, &v, &out, &lse, &dout, &mut dq, &mut dk, &mut dv,
                )
                .unwrap()
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench_attention);
criterion_main!(benches);
