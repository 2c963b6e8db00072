//! Helpers the CUDA test binaries share (gpu_ops, gpu_ops_nn, gpu_attention_optim): seeds that
//! are printed for replay, relative-error comparisons with METHOD.md's tolerances, and random
//! CPU/GPU input pairs. Each binary uses a subset.
#![allow(dead_code)]

use rlhf_tensor::{DType, Device, Rng, Tensor};

pub const GPU: Device = Device::Cuda(0);

/// The base seed of a test: `RLHF_GPU_SEED` when set (to replay a failure), else the clock;
/// printed either way.
pub fn seed(test: &str) -> u64 {
    let base = std::env::var("RLHF_GPU_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{test}: RLHF_GPU_SEED={base}");
    base
}

/// ‖got − want‖ / ‖want‖ over host tensors (the absolute norm when want is all zeros); NaN
/// when got has a non-finite value want does not.
pub fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.shape(), want.shape(), "shapes differ");
    assert_eq!(got.device(), Device::Cpu, "compare on the host");
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in g.iter().zip(&w) {
        if !a.is_finite() && a != b {
            return f64::NAN;
        }
        num += (a - b) * (a - b);
        den += b * b;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Relative error of `got` against `want` (either may be on a GPU; compared in f32 on the host)
/// under `tol`.
pub fn check(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let host = |t: &Tensor| {
        t.to_device(Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let e = rel_err(&host(got), &host(want));
    assert!(e < tol, "{what}: relative error {e:e} (tolerance {tol:e})");
}

pub fn tol(dtype: DType, f32_tol: f64) -> f64 {
    if dtype == DType::BF16 {
        1e-2
    } else {
        f32_tol
    }
}

/// A random shape of `rank` dims, each in 1..=max.
pub fn shape(rng: &mut Rng, rank: usize, max: u64) -> Vec<usize> {
    (0..rank).map(|_| 1 + rng.below(max) as usize).collect()
}

/// Random values in [lo, hi) as `dtype` on the CPU (bf16-rounded for bf16).
pub fn rand(rng: &mut Rng, shape: &[usize], lo: f32, hi: f32, dtype: DType) -> Tensor {
    let t = Tensor::rand_uniform(shape, lo, hi, rng.next_u64());
    t.to_dtype(dtype).unwrap()
}

/// (CPU f32 reference input, GPU input of `dtype`) holding the same values.
pub fn pair(cpu: &Tensor, dtype: DType) -> (Tensor, Tensor) {
    let c = cpu.to_dtype(dtype).unwrap();
    let g = c.to_device(GPU).unwrap();
    (c.to_dtype(DType::F32).unwrap(), g)
}
