//! GPU benchmarks of the engine's own CUDA ops, `#[ignore]`d (tools/gpu-check runs them on a
//! GPU machine with `--ignored --nocapture`). Each prints one `BENCH {json}` line; the bundle's
//! run.sh puts them in its summary table beside tools/torch_gpu_bench.py's reference figures
//! (cuBLAS through torch.matmul, on the same card in the same call).
//!
//! Timing follows the device README's METHOD.md: random inputs (never zeros), warm-up first
//! (module load and JIT stay out), several input sets rotated so repeated runs do not measure
//! the L2 cache, the stream synchronised before each host clock read, median of the repeats.
#![cfg(feature = "cuda")]

use rlhf_tensor::{DType, Device, Tensor};
use std::time::Instant;

fn sync() {
    rlhf_tensor::cuda::device(0)
        .expect("a CUDA device")
        .stream()
        .synchronize()
        .expect("stream synchronize");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median milliseconds of `f(i)` over `reps` runs, after `warm` untimed runs; each run timed
/// alone between stream synchronisations.
fn time_ms(warm: usize, reps: usize, mut f: impl FnMut(usize) -> Tensor) -> f64 {
    for i in 0..warm {
        drop(f(i));
    }
    sync();
    let mut ms = Vec::with_capacity(reps);
    for i in 0..reps {
        let t = Instant::now();
        let out = f(i);
        sync();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        drop(out);
    }
    median(ms)
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn bench_gemm_bf16() {
    let dev = rlhf_tensor::cuda::device(0).expect("a CUDA device");
    for n in [4096usize, 8192] {
        // Three input pairs: 3 × 2 × n² bf16 (192 MiB at 4096, 768 MiB at 8192) > L2.
        let sets: Vec<(Tensor, Tensor)> = (0..3)
            .map(|s| {
                let a = Tensor::randn(&[n, n], 0.0, 1.0, 10 + s)
                    .to_dtype(DType::BF16)
                    .and_then(|t| t.to_device(Device::Cuda(0)))
                    .expect("upload");
                let b = Tensor::randn(&[n, n], 0.0, 1.0, 20 + s)
                    .to_dtype(DType::BF16)
                    .and_then(|t| t.to_device(Device::Cuda(0)))
                    .expect("upload");
                (a, b)
            })
            .collect();
        let reps = if n == 4096 { 20 } else { 7 };
        let ms = time_ms(3, reps, |i| {
            let (a, b) = &sets[i % sets.len()];
            a.matmul(b).expect("matmul")
        });
        let tflops = 2.0 * (n as f64).powi(3) / (ms * 1e-3) / 1e12;
        println!(
            "BENCH {{\"bench\":\"gemm_bf16_nn\",\"n\":{n},\"ms\":{ms:.4},\"tflops\":{tflops:.2},\"card\":\"{}\",\"engine\":\"rlhf\"}}",
            dev.name()
        );
    }
}
