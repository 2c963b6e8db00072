//! Criterion benchmark of the engine's f32 GEMM (`rlhf_tensor::cpu::gemm::sgemm`), C = A·B with
//! row-major operands, in the global rayon pool (set RAYON_NUM_THREADS to pin the thread count).
//!
//! Throughput is reported in "elements", where one element is one floating-point operation:
//! each call counts 2·m·n·k flops (one multiply and one add per term), so criterion's
//! "Gelem/s" reads as GFLOP/s. The bench ids say so.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rlhf_tensor::cpu::gemm::{sgemm, MatMut, MatRef};
use std::time::Duration;

fn values(len: usize, seed: u32) -> Vec<f32> {
    (0..len as u32)
        .map(|i| {
            let h = i
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed)
                .rotate_left(13);
            (h >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

fn bench_sgemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("sgemm_f32");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(2));
    for &(m, n, k) in &[
        (64, 64, 64),
        (256, 256, 256),
        (512, 512, 512),
        (1024, 1024, 1024),
    ] {
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        let mut out = vec![0.0f32; m * n];
        group.throughput(Throughput::Elements(2 * (m * n * k) as u64));
        group.bench_function(BenchmarkId::new("flops", format!("{m}x{n}x{k}")), |bench| {
            bench.iter(|| {
                sgemm(
                    1.0,
                    MatRef::row_major(&a, m, k),
                    MatRef::row_major(&b, k, n),
                    0.0,
                    MatMut::row_major(&mut out, m, n),
                )
                .expect("valid shapes")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_sgemm);
criterion_main!(benches);
