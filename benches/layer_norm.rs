//! Row layer norm on the CPU, per instruction set: `layer_norm_rows` (forward) and
//! `layer_norm_backward_rows`, on GPT-2-like shapes.
//!
//! Throughput is in bytes of f32 data each call must move at least once: forward reads x and
//! writes out (8 B/element; gamma, beta and the per-row mean/rstd are not counted); backward
//! reads x and dy and writes dx (12 B/element; gamma, mean/rstd and the dgamma/dbeta partials
//! are not counted). Each row is read twice per pass pair, the second time from cache.
//!
//! Threads: a dedicated rayon pool of `RLHF_BENCH_THREADS` threads (default 1, so the numbers
//! compare kernels rather than core counts); the thread count is part of each benchmark name.
//!
//! Run: `cargo bench --bench layer_norm` (filter e.g. `-- 8192x768`).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rlhf_tensor::cpu::{vec, Isa};

const SHAPES: [(usize, usize); 2] = [(1024, 1024), (8192, 768)];
const EPS: f32 = 1e-5;

/// Deterministic pseudo-random values in [offset - scale, offset + scale).
fn data(n: usize, seed: u64, offset: f32, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            offset + ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn threads() -> usize {
    std::env::var("RLHF_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

fn bench(c: &mut Criterion) {
    let t = threads();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(t)
        .build()
        .expect("rayon pool");
    for (rows, cols) in SHAPES {
        let n = rows * cols;
        let x = data(n, 1, 0.5, 2.0);
        let dy = data(n, 2, 0.0, 1.0);
        let gamma = data(cols, 3, 1.0, 0.1);
        let beta = data(cols, 4, 0.0, 0.1);
        let mut out = vec![0.0f32; n];
        let (mut mean, mut rstd) = (vec![0.0f32; rows], vec![0.0f32; rows]);
        vec::layer_norm_rows_with(
            Isa::Scalar,
            &x,
            &gamma,
            &beta,
            cols,
            EPS,
            &mut out,
            &mut mean,
            &mut rstd,
        );
        let (mut dgamma, mut dbeta) = (vec![0.0f32; cols], vec![0.0f32; cols]);
        let shape = format!("{rows}x{cols}");

        let mut g = c.benchmark_group(format!("layer_norm_rows/threads={t}"));
        g.throughput(Throughput::Bytes((n * 8) as u64));
        for isa in Isa::available() {
            let (mut m, mut r) = (vec![0.0f32; rows], vec![0.0f32; rows]);
            g.bench_with_input(
                BenchmarkId::new(format!("{isa:?}"), &shape),
                &isa,
                |b, &isa| {
                    b.iter(|| {
                        pool.install(|| {
                            vec::layer_norm_rows_with(
                                isa, &x, &gamma, &beta, cols, EPS, &mut out, &mut m, &mut r,
                            )
                        })
                    })
                },
            );
        }
        g.finish();

        let mut g = c.benchmark_group(format!("layer_norm_backward_rows/threads={t}"));
        g.throughput(Throughput::Bytes((n * 12) as u64));
        for isa in Isa::available() {
            g.bench_with_input(
                BenchmarkId::new(format!("{isa:?}"), &shape),
                &isa,
                |b, &isa| {
                    b.iter(|| {
                        pool.install(|| {
                            // dgamma/dbeta accumulate across iterations; only the time matters.
                            vec::layer_norm_backward_rows_with(
                                isa,
                                &x,
                                &gamma,
                                &mean,
                                &rstd,
                                &dy,
                                cols,
                                &mut out,
                                &mut dgamma,
                                &mut dbeta,
                            )
                        })
                    })
                },
            );
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
