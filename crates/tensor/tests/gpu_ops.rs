//! CUDA ops against their CPU paths, forward and backward. Every test is `#[ignore]`d: no CPU
//! machine can run them. tools/gpu-check builds this binary and runs it on a GPU machine with
//! `--ignored` (docs/cuda.md).
//!
//! Inputs are fresh random values (never zeros) from a seed drawn per run and printed, so a
//! failure can be replayed with RLHF_GPU_SEED. Tolerances follow the device README's METHOD.md:
//! relative error ‖out − ref‖ / ‖ref‖ under 1e-5 for f32 arithmetic (1e-4 where the GPU's and
//! the CPU's transcendental functions differ), under 1e-2 for bf16 operands; NaN never passes.
//! bf16 is checked against the CPU's f32 op on the same bf16-rounded inputs.
#![cfg(feature = "cuda")]

use rlhf_tensor::{DType, Device, Error, Parameter, Rng, Tensor};

mod gpu_common;
use gpu_common::*;

/// The gradient of `f` at `x` for output gradient `g` (values on x's device).
fn grad_of(x: &Tensor, g: &Tensor, f: &dyn Fn(&Tensor) -> rlhf_tensor::Result<Tensor>) -> Tensor {
    let p = Parameter::new(x.clone());
    let y = f(&p.tensor()).unwrap();
    y.backward_with(g.clone()).unwrap();
    p.grad().expect("a gradient")
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_round_trips_are_exact() {
    let mut rng = Rng::new(seed("round_trips"));
    for dtype in [DType::F32, DType::BF16, DType::I64, DType::I32, DType::U8] {
        let s = shape(&mut rng, 3, 9);
        let x = rand(&mut rng, &s, 1.0, 100.0, dtype);
        let back = x.to_device(GPU).unwrap().to_device(Device::Cpu).unwrap();
        assert_eq!(back.dtype(), dtype);
        assert_eq!(back.to_f64_vec(), x.to_f64_vec(), "{dtype}");
        // Views: a transposed and narrowed GPU tensor comes back as its own elements.
        let g = x.to_device(GPU).unwrap().transpose(0, 2).unwrap();
        let want = x.transpose(0, 2).unwrap();
        assert_eq!(
            g.to_device(Device::Cpu).unwrap().to_f64_vec(),
            want.to_f64_vec(),
            "{dtype} view"
        );
        assert_eq!(g.device(), GPU);
    }
    let f16 = Tensor::ones(&[2]).to_dtype(DType::F16).unwrap();
    assert!(matches!(f16.to_device(GPU), Err(Error::Cuda { .. })));
}

/// The kernel profiler (rlhf_tensor::cuda::profile) counts every launch between start and stop
/// under its entry point, with a finite, non-negative time, most time first. Other tests may
/// launch kernels at the same time (the profiler is process-wide), so counts are lower bounds.
#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_profile_counts_launches_by_entry_point() {
    use rlhf_tensor::cuda::profile;
    let mut rng = Rng::new(seed("profile"));
    let a = rand(&mut rng, &[48, 40], -1.0, 1.0, DType::BF16)
        .to_device(GPU)
        .unwrap();
    let b = rand(&mut rng, &[40, 24], -1.0, 1.0, DType::BF16)
        .to_device(GPU)
        .unwrap();
    a.add(&a).unwrap(); // modules loaded outside the profile
    a.matmul(&b).unwrap();
    profile::start();
    assert!(profile::enabled());
    for _ in 0..3 {
        a.add(&a).unwrap();
    }
    a.matmul(&b).unwrap();
    let times = profile::stop().unwrap();
    assert!(!profile::enabled());
    let calls = |name: &str| {
        times
            .iter()
            .find(|k| k.entry == name)
            .map_or(0, |k| k.calls)
    };
    assert!(calls("binary_add_bf16") >= 3, "{times:?}");
    assert!(
        times
            .iter()
            .any(|k| k.entry.starts_with("gemm") && k.calls >= 1),
        "{times:?}"
    );
    assert!(
        times.iter().all(|k| k.ms.is_finite() && k.ms >= 0.0),
        "{times:?}"
    );
    assert!(times.windows(2).all(|w| w[0].ms >= w[1].ms), "{times:?}");
    // Off again: launches are not recorded, and a new profile starts from nothing.
    a.add(&a).unwrap();
    profile::start();
    let again = profile::stop().unwrap();
    assert!(again
        .iter()
        .all(|k| k.entry != "binary_add_bf16" || k.calls < 3));
}

/// Running out of device memory is an error that names it, never a panic, and the device
/// works afterwards. Freed buffers stay in the memory pool for reuse (its release threshold is
/// raised at device creation), so a request larger than any cached block, which fits only once
/// those blocks go back to the driver, still succeeds: the allocator trims the pool and tries
/// again.
#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_out_of_memory_is_an_error_and_cached_memory_is_given_back() {
    use rlhf_tensor::cuda::{device, CudaStorage};
    let dev = device(0).unwrap();
    let (free, total) = dev.memory_info().unwrap();
    assert!(free <= total && total > 0, "free {free}, total {total}");

    let e = CudaStorage::uninit(&dev, DType::U8, total.saturating_mul(2))
        .err()
        .expect("twice the card's memory cannot be allocated");
    let msg = e.to_string();
    assert!(matches!(e, Error::Cuda { .. }), "{msg}");
    assert!(msg.contains("OUT_OF_MEMORY"), "{msg}");

    // 55% of the free memory, freed into the pool, then 60%: together more than there is.
    let (free, _) = dev.memory_info().unwrap();
    let first = CudaStorage::uninit(&dev, DType::U8, free / 20 * 11).unwrap();
    drop(first);
    let second = CudaStorage::uninit(&dev, DType::U8, free / 5 * 3)
        .expect("the pool's cached block is given back when a larger request needs the memory");
    drop(second);

    let x = Tensor::from_slice(&[1.5f32, -2.0, 3.25], &[3]).unwrap();
    let y = x.to_device(GPU).unwrap().mul_scalar(2.0).unwrap();
    assert_eq!(
        y.to_device(Device::Cpu).unwrap().to_f64_vec(),
        vec![3.0, -4.0, 6.5]
    );
}

/// The elementwise kernels' flat fast path (16-byte vectors, then a scalar tail) against their
/// scalar path, bit for bit: the same values once in fresh (aligned) buffers, once at an
/// element offset of 1 (contiguous but misaligned, so the kernels take the scalar loop), for
/// lengths around the vector width. Binary ops, a broadcast bias add (coalesced to a flat and a
/// 2-D operand), unary ops with parameters, the f32 ↔ bf16 casts, and GELU's backward.
#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_elementwise_fast_paths_match_the_scalar_path_bitwise() {
    let mut rng = Rng::new(seed("elementwise_fast_paths"));
    for dtype in [DType::F32, DType::BF16] {
        // Column counts that are multiples of 8 (8, 64, 776) give the bias add its
        // repeated-row vector path.
        for (rows, cols) in [
            (1, 1),
            (1, 3),
            (2, 4),
            (3, 3),
            (3, 8),
            (1, 31),
            (5, 64),
            (5, 821),
            (4, 776),
            (7, 1143),
        ] {
            let n = rows * cols;
            // The same values aligned (a fresh buffer) and misaligned (offset 1 in a bigger one).
            let both = |rng: &mut Rng| {
                let host = rand(rng, &[n + 1], -3.0, 3.0, dtype);
                let big = host.to_device(GPU).unwrap();
                let misaligned = big
                    .narrow(0, 1, n)
                    .unwrap()
                    .reshape_to(&[rows, cols])
                    .unwrap();
                let aligned = host
                    .narrow(0, 1, n)
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .to_device(GPU)
                    .unwrap()
                    .reshape_to(&[rows, cols])
                    .unwrap();
                (aligned, misaligned)
            };
            let (a, a1) = both(&mut rng);
            let (b, b1) = both(&mut rng);
            let bias_host = rand(&mut rng, &[cols], -1.0, 1.0, dtype);
            let bias = bias_host.to_device(GPU).unwrap();
            type Case<'a> = (
                &'static str,
                Box<dyn Fn(&Tensor, &Tensor) -> rlhf_tensor::Result<Tensor> + 'a>,
            );
            let cases: Vec<Case> = vec![
                ("add", Box::new(|x, y| x.add(y))),
                ("mul", Box::new(|x, y| x.mul(y))),
                ("div", Box::new(|x, y| x.div(y))),
                ("bias add", Box::new(|x, _| x.add(&bias))),
                ("bias first", Box::new(|x, _| bias.mul(x))),
                // Two [rows, cols] tables over a batch of 2 (the position embedding's
                // broadcast): both operands one repeated row of rows·cols.
                (
                    "table add",
                    Box::new(|x, y| {
                        x.reshape_to(&[1, rows, cols])?
                            .broadcast_to(&[2, rows, cols])?
                            .add(y)
                    }),
                ),
                ("gelu", Box::new(|x, _| x.gelu())),
                ("exp", Box::new(|x, _| x.exp())),
                ("clamp", Box::new(|x, _| x.clamp(-0.5, 1.25))),
                ("add_scalar", Box::new(|x, _| x.add_scalar(0.375))),
                // The float casts (f32 → bf16 rounds; bf16 → f32 is exact).
                (
                    "cast",
                    Box::new(|x, _| {
                        x.to_dtype(if x.dtype() == DType::F32 {
                            DType::BF16
                        } else {
                            DType::F32
                        })
                    }),
                ),
            ];
            for (name, f) in &cases {
                let fast = f(&a, &b).unwrap().to_device(Device::Cpu).unwrap();
                let slow = f(&a1, &b1).unwrap().to_device(Device::Cpu).unwrap();
                assert_eq!(
                    fast.to_f64_vec(),
                    slow.to_f64_vec(),
                    "{name} {dtype} n {n}: vector and scalar paths differ"
                );
            }
            // GELU's backward through autograd (x and the incoming gradient both aligned, or
            // both misaligned).
            let grad = |x: &Tensor, g: &Tensor| grad_of(x, g, &|t| t.gelu());
            let fast = grad(&a, &b).to_device(Device::Cpu).unwrap();
            let slow = grad(&a1, &b1).to_device(Device::Cpu).unwrap();
            assert_eq!(
                fast.to_f64_vec(),
                slow.to_f64_vec(),
                "gelu backward {dtype} n {n}"
            );
        }
    }
}

/// Every cast between the dtypes CUDA tensors hold (f32, bf16, i64, i32, u8), from a strided
/// (transposed) view, bit for bit against the CPU's `to_dtype` (a NaN's payload aside): rounding to bf16, truncation
/// and saturation into integers (NaN → 0, ±inf, values past every integer type's range, -0.5
/// and 255.5 at u8's edges), i64 beyond 2^53 into floats. Integer casts carry no gradient on
/// either device.
#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_casts_match_the_cpu_bitwise() {
    let mut rng = Rng::new(seed("casts"));
    let (r, c) = (1 + rng.below(40) as usize, 2 + rng.below(40) as usize);
    let n = r * c;
    // Edge values first, then random ones of every magnitude.
    let edges_f = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        0.5,
        -0.5,
        255.5,
        256.0,
        -1.0,
        2147483520.0,
        -2147483904.0,
        3e9,
        1e20,
        -1e20,
        9.3e18,
        -9.3e18,
    ];
    let floats: Vec<f32> = (0..n)
        .map(|i| {
            edges_f.get(i).copied().unwrap_or_else(|| {
                let m = (rng.next_u64() % 2000) as f32 / 1000.0 - 1.0;
                m * 10f32.powi((rng.next_u64() % 12) as i32)
            })
        })
        .collect();
    let edges_i = [
        i64::MAX,
        i64::MIN,
        (1 << 53) + 1,
        -(1 << 62) - 3,
        4_000_000_000,
        -300,
        255,
        256,
    ];
    let ints: Vec<i64> = (0..n)
        .map(|i| {
            edges_i
                .get(i)
                .copied()
                .unwrap_or_else(|| (rng.next_u64() as i64) >> (rng.next_u64() % 63))
        })
        .collect();
    let f32_src = Tensor::from_vec(floats, &[r, c]).unwrap();
    let sources = [
        f32_src.clone(),
        f32_src.to_dtype(DType::BF16).unwrap(),
        Tensor::from_vec(ints.clone(), &[r, c]).unwrap(),
        Tensor::from_vec(
            ints.iter().map(|&v| v as i32).collect::<Vec<i32>>(),
            &[r, c],
        )
        .unwrap(),
        Tensor::from_vec(ints.iter().map(|&v| v as u8).collect::<Vec<u8>>(), &[r, c]).unwrap(),
    ];
    // Bit patterns, so NaN and -0.0 compare exactly and i64 keeps all 64 bits.
    let bits = |t: &Tensor| -> Vec<u64> {
        let t = t.to_device(Device::Cpu).unwrap();
        match t.dtype() {
            DType::F32 => t
                .to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits() as u64)
                .collect(),
            DType::BF16 => t
                .to_vec::<half::bf16>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits() as u64)
                .collect(),
            DType::I64 => t
                .to_vec::<i64>()
                .unwrap()
                .iter()
                .map(|&v| v as u64)
                .collect(),
            DType::I32 => t
                .to_vec::<i32>()
                .unwrap()
                .iter()
                .map(|&v| v as u32 as u64)
                .collect(),
            DType::U8 => t
                .to_vec::<u8>()
                .unwrap()
                .iter()
                .map(|&v| v as u64)
                .collect(),
            d => panic!("no CUDA storage for {d}"),
        }
    };
    for src in &sources {
        let cpu = src.t().unwrap();
        let gpu = src.to_device(GPU).unwrap().t().unwrap();
        for to in [DType::F32, DType::BF16, DType::I64, DType::I32, DType::U8] {
            if to == src.dtype() {
                continue;
            }
            let want = cpu.to_dtype(to).unwrap();
            let got = gpu.to_dtype(to).unwrap();
            assert_eq!(got.dtype(), to);
            let (g, w) = (bits(&got), bits(&want));
            // A NaN rounded to bf16 is a NaN of another payload on the hardware (cvt.rn.bf16.f32
            // gives the canonical 0x7fff; the CPU keeps the payload, quieted: 0x7fc0 for
            // f32::NAN): NaN for NaN is all a cast promises there.
            let nan = |b: u64| match to {
                DType::F32 => (b & 0x7fff_ffff) > 0x7f80_0000,
                DType::BF16 => (b & 0x7fff) > 0x7f80,
                _ => false,
            };
            let same = |i: usize| g[i] == w[i] || (nan(g[i]) && nan(w[i]));
            if let Some(i) = (0..g.len()).find(|&i| !same(i)) {
                panic!(
                    "{} -> {to}: element {i} of {}: GPU bits {:#x}, CPU bits {:#x} (input {})",
                    src.dtype(),
                    g.len(),
                    g[i],
                    w[i],
                    cpu.contiguous().unwrap().to_f64_vec()[i]
                );
            }
        }
    }
    // Float-to-float casts are differentiable on the GPU as on the CPU; casts to integers not.
    let p = Parameter::new(sources[0].to_device(GPU).unwrap());
    assert!(p.tensor().to_dtype(DType::BF16).unwrap().tracks_grad());
    assert!(!p.tensor().to_dtype(DType::I32).unwrap().tracks_grad());
}

type Unary = fn(&Tensor) -> rlhf_tensor::Result<Tensor>;
/// (name, op, input range, f32 tolerance)
type UnaryCase = (&'static str, Unary, (f32, f32), f64);

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_unary_ops_forward_and_backward() {
    let mut rng = Rng::new(seed("unary"));
    // (name, op, input range, f32 tolerance); every one has a CUDA backward
    let ops: Vec<UnaryCase> = vec![
        ("exp", |x| x.exp(), (-3.0, 3.0), 1e-4),
        ("log", |x| x.log(), (0.1, 5.0), 1e-4),
        ("sqrt", |x| x.sqrt(), (0.1, 5.0), 1e-5),
        ("tanh", |x| x.tanh(), (-3.0, 3.0), 1e-4),
        ("gelu", |x| x.gelu(), (-4.0, 4.0), 1e-4),
        ("sigmoid", |x| x.sigmoid(), (-6.0, 6.0), 1e-4),
        ("log_sigmoid", |x| x.log_sigmoid(), (-6.0, 6.0), 1e-4),
        ("powf", |x| x.powf(1.7), (0.1, 3.0), 1e-4),
        ("add_scalar", |x| x.add_scalar(0.75), (-2.0, 2.0), 1e-5),
        ("mul_scalar", |x| x.mul_scalar(-1.25), (-2.0, 2.0), 1e-5),
        ("neg", |x| x.neg(), (-2.0, 2.0), 1e-5),
        ("relu", |x| x.relu(), (-2.0, 2.0), 1e-5),
        ("abs", |x| x.abs(), (-2.0, 2.0), 1e-5),
        ("clamp", |x| x.clamp(-0.5, 0.5), (-2.0, 2.0), 1e-5),
    ];
    for dtype in [DType::F32, DType::BF16] {
        for (name, f, (lo, hi), t32) in &ops {
            let s = shape(&mut rng, 3, 40);
            let x = rand(&mut rng, &s, *lo, *hi, DType::F32);
            let (xc, xg) = pair(&x, dtype);
            let tol = tol(dtype, *t32);
            check(
                &format!("{name} {dtype}"),
                &f(&xg).unwrap(),
                &f(&xc).unwrap(),
                tol,
            );
            // A strided (transposed) input goes through the Strided path.
            let xt = xg.transpose(0, 2).unwrap();
            check(
                &format!("{name} {dtype} strided"),
                &f(&xt).unwrap(),
                &f(&xc.transpose(0, 2).unwrap()).unwrap(),
                tol,
            );
            let g = rand(&mut rng, &s, -1.0, 1.0, DType::F32);
            let (gc, gg) = pair(&g, dtype);
            let want = grad_of(&xc, &gc, f);
            check(
                &format!("{name} {dtype} backward"),
                &grad_of(&xg, &gg, f),
                &want,
                tol * 2.0,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_binary_ops_with_broadcasting() {
    let mut rng = Rng::new(seed("binary"));
    type Bin = fn(&Tensor, &Tensor) -> rlhf_tensor::Result<Tensor>;
    let ops: Vec<(&str, Bin)> = vec![
        ("add", |a, b| a.add(b)),
        ("sub", |a, b| a.sub(b)),
        ("mul", |a, b| a.mul(b)),
        ("div", |a, b| a.div(b)),
    ];
    for dtype in [DType::F32, DType::BF16] {
        for (name, f) in &ops {
            let s = shape(&mut rng, 3, 30);
            // b broadcasts: [D], [1, N, 1] or the full shape.
            let sb: Vec<usize> = match rng.below(3) {
                0 => vec![s[2]],
                1 => vec![1, s[1], 1],
                _ => s.clone(),
            };
            let a = rand(&mut rng, &s, -2.0, 2.0, DType::F32);
            let b = rand(&mut rng, &sb, 0.5, 2.0, DType::F32);
            let ((ac, ag), (bc, bg)) = (pair(&a, dtype), pair(&b, dtype));
            let t = tol(dtype, 1e-5);
            check(
                &format!("{name} {dtype} {s:?}·{sb:?}"),
                &f(&ag, &bg).unwrap(),
                &f(&ac, &bc).unwrap(),
                t,
            );
            // Same shapes: the backward needs no reduction.
            let b2 = rand(&mut rng, &s, 0.5, 2.0, DType::F32);
            let g = rand(&mut rng, &s, -1.0, 1.0, DType::F32);
            let ((b2c, b2g), (gc, gg)) = (pair(&b2, dtype), pair(&g, dtype));
            let want = grad_of(&ac, &gc, &|x| f(x, &b2c));
            let got = grad_of(&ag, &gg, &|x| f(x, &b2g));
            check(
                &format!("{name} {dtype} backward (lhs)"),
                &got,
                &want,
                t * 2.0,
            );
            let want = grad_of(&b2c, &gc, &|y| f(&ac, y));
            let got = grad_of(&b2g, &gg, &|y| f(&ag, y));
            check(
                &format!("{name} {dtype} backward (rhs)"),
                &got,
                &want,
                t * 4.0,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_matmul_f32_and_bf16_forward_and_backward() {
    let mut rng = Rng::new(seed("matmul"));
    for trial in 0..12 {
        let dtype = if trial % 2 == 0 {
            DType::F32
        } else {
            DType::BF16
        };
        // Aligned shapes (multiples of 8: the bf16 tensor-core path) and ragged ones (SIMT).
        let dim = |rng: &mut Rng| {
            if trial % 4 < 2 {
                8 * (1 + rng.below(40) as usize)
            } else {
                1 + rng.below(300) as usize
            }
        };
        let (m, k, n) = (dim(&mut rng), dim(&mut rng), dim(&mut rng));
        let batch = 1 + rng.below(3) as usize;
        let a = rand(&mut rng, &[batch, m, k], -1.0, 1.0, DType::F32);
        let w = rand(&mut rng, &[n, k], -1.0, 1.0, DType::F32);
        let ((ac, ag), (wc, wg)) = (pair(&a, dtype), pair(&w, dtype));
        let t = tol(dtype, 1e-5);
        // x·Wᵀ (a linear layer: 'n','t'), and a batched product with a transposed lhs.
        let lin = |x: &Tensor, w: &Tensor| x.matmul(&w.t()?);
        check(
            &format!("linear {dtype} {m}x{k}x{n}"),
            &lin(&ag, &wg).unwrap(),
            &lin(&ac, &wc).unwrap(),
            t,
        );
        let b = rand(&mut rng, &[batch, m, n], -1.0, 1.0, DType::F32);
        let (bc, bg) = pair(&b, dtype);
        let bmm = |x: &Tensor, y: &Tensor| x.transpose(1, 2)?.matmul(y);
        check(
            &format!("batched tn {dtype}"),
            &bmm(&ag, &bg).unwrap(),
            &bmm(&ac, &bc).unwrap(),
            t,
        );
        let g = rand(&mut rng, &[batch, m, n], -1.0, 1.0, DType::F32);
        let (gc, gg) = pair(&g, dtype);
        check(
            &format!("linear {dtype} dX"),
            &grad_of(&ag, &gg, &|x| lin(x, &wg)),
            &grad_of(&ac, &gc, &|x| lin(x, &wc)),
            t * 2.0,
        );
        // dW sums over the batch dims: one GEMM with all rows folded in (no reduction op).
        check(
            &format!("linear {dtype} dW"),
            &grad_of(&wg, &gg, &|w| lin(&ag, w)),
            &grad_of(&wc, &gc, &|w| lin(&ac, w)),
            t * 2.0,
        );
    }
}

/// Every GEMM kernel family (the TMA-fed and the cp.async-fed wgmma kernels where the card has
/// them, each with 128- and 256-column block tiles; mma.sync; SIMT) on all four storage orders of A and B, against the CPU product of the
/// same bf16 values. Shapes: multiples of 8 (what the tensor-core kernels take as they are)
/// with partial block tiles in M, N and K, M over eight tile rows (the grouped tile order), K
/// over sixteen tiles (three trips round the four-stage rings), and ragged ones (re-pitched to
/// padded rows for the tensor cores); batched and broadcast B. Held to
/// the output's own rounding: a norm-wise error of 5e-3 and, per element, 2^-7 of the value
/// plus 1e-3 of the RMS, so a wrong row, column or k block fails even where the norm hides it.
#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_matmul_kernel_families_agree_with_the_cpu_on_every_layout() {
    use rlhf_tensor::cuda::{with_gemm_kernel, with_gemm_tile_n, GemmKernel};
    let mut rng = Rng::new(seed("matmul_kernels"));
    let has_wgmma = rlhf_tensor::cuda::device(0).unwrap().arch().has_wgmma();
    let families: &[GemmKernel] = if has_wgmma {
        &[
            GemmKernel::Tma,
            GemmKernel::Wgmma,
            GemmKernel::Mma,
            GemmKernel::Simt,
        ]
    } else {
        eprintln!("no wgmma on this card: checking mma.sync and SIMT, and that wgmma is refused");
        &[GemmKernel::Mma, GemmKernel::Simt]
    };
    let host = |t: &Tensor| {
        t.to_device(Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    for trial in 0..6 {
        let (m, n, k) = match trial {
            // Small: A's second 64-row panel and B's panels past the first lie wholly outside
            // the operands (the TMA kernel does not copy them).
            0 => (
                8 * (1 + rng.below(8) as usize),
                8 * (1 + rng.below(8) as usize),
                8 * (1 + rng.below(56) as usize),
            ),
            1..=2 => (
                8 * (1 + rng.below(24) as usize),
                8 * (1 + rng.below(64) as usize),
                8 * (1 + rng.below(56) as usize),
            ),
            // Tall: more than 8 tile rows, so the wgmma kernels' grouped tile order has a full
            // group and a partial one.
            3 => (
                8 * (129 + rng.below(16) as usize),
                8 * (33 + rng.below(8) as usize),
                8 * (1 + rng.below(16) as usize),
            ),
            // Long K: over 16 k tiles, the third trip round the four-stage rings (parities
            // back to where they started).
            4 => (
                8 * (1 + rng.below(8) as usize),
                8 * (1 + rng.below(16) as usize),
                8 * (140 + rng.below(20) as usize),
            ),
            // Ragged: leading dims not multiples of 8, which the tensor-core kernels take after
            // a copy to padded rows (partial 8-element chunks at every edge).
            _ => (
                1 + rng.below(200) as usize,
                1 + rng.below(300) as usize,
                1 + rng.below(300) as usize,
            ),
        };
        // The ragged trial is batched, so its re-pitched operands stack batch elements.
        let batch = if trial == 5 {
            2
        } else {
            1 + rng.below(2) as usize
        };
        let broadcast_b = trial % 2 == 1;
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            // 't' operands are transposed views of contiguous [.., k, m] and [n, k] storage.
            let a_store = if ta { [batch, k, m] } else { [batch, m, k] };
            let b_store: Vec<usize> = match (broadcast_b, tb) {
                (true, true) => vec![n, k],
                (true, false) => vec![k, n],
                (false, true) => vec![batch, n, k],
                (false, false) => vec![batch, k, n],
            };
            let (ac, ag) = pair(
                &rand(&mut rng, &a_store, -1.0, 1.0, DType::F32),
                DType::BF16,
            );
            let (bc, bg) = pair(
                &rand(&mut rng, &b_store, -1.0, 1.0, DType::F32),
                DType::BF16,
            );
            let view = |x: &Tensor, t: bool| {
                if t {
                    x.transpose(-2, -1).unwrap()
                } else {
                    x.clone()
                }
            };
            let want = view(&ac, ta).matmul(&view(&bc, tb)).unwrap();
            let what = |f: GemmKernel, tile: Option<usize>| {
                format!(
                    "{f}{} {}{} batch {batch}{} m {m} n {n} k {k}",
                    tile.map_or(String::new(), |t| format!(" (tile n {t})")),
                    if ta { 't' } else { 'n' },
                    if tb { 't' } else { 'n' },
                    if broadcast_b { " (B broadcast)" } else { "" }
                )
            };
            for &f in families {
                // The wgmma kernels in both block-tile widths.
                let tiles: &[Option<usize>] = match f {
                    GemmKernel::Tma | GemmKernel::Wgmma => &[Some(128), Some(256)],
                    _ => &[None],
                };
                for &tile in tiles {
                    let got = with_gemm_kernel(f, || {
                        with_gemm_tile_n(tile, || view(&ag, ta).matmul(&view(&bg, tb)))
                    })
                    .unwrap();
                    check(&what(f, tile), &got, &want, 5e-3);
                    let (g, w) = (host(&got).to_f64_vec(), want.to_f64_vec());
                    let rms = (w.iter().map(|v| v * v).sum::<f64>() / w.len() as f64).sqrt();
                    for (i, (x, y)) in g.iter().zip(&w).enumerate() {
                        assert!(
                            (x - y).abs() <= y.abs() / 128.0 + 1e-3 * rms,
                            "{}: element {i} is {x}, the CPU says {y}",
                            what(f, tile)
                        );
                    }
                }
            }
            if !has_wgmma {
                for f in [GemmKernel::Tma, GemmKernel::Wgmma] {
                    let e = with_gemm_kernel(f, || view(&ag, ta).matmul(&view(&bg, tb)))
                        .unwrap_err()
                        .to_string();
                    assert!(e.contains("wgmma needs compute capability 9.0"), "{e}");
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_matmul_is_deterministic() {
    let mut rng = Rng::new(seed("matmul_det"));
    for dtype in [DType::F32, DType::BF16] {
        let a = rand(&mut rng, &[4, 264, 520], -1.0, 1.0, dtype)
            .to_device(GPU)
            .unwrap();
        let b = rand(&mut rng, &[520, 136], -1.0, 1.0, dtype)
            .to_device(GPU)
            .unwrap();
        let x = a.matmul(&b).unwrap().to_f64_vec();
        let y = a.matmul(&b).unwrap().to_f64_vec();
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{dtype}"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_softmax_and_log_softmax_forward_and_backward() {
    let mut rng = Rng::new(seed("softmax"));
    let ops: Vec<(&str, Unary)> = vec![
        ("softmax last", |x| x.softmax(-1)),
        ("log_softmax last", |x| x.log_softmax(-1)),
        ("softmax dim 1", |x| x.softmax(1)),
        ("log_softmax dim 0", |x| x.log_softmax(0)),
    ];
    for dtype in [DType::F32, DType::BF16] {
        for (name, f) in &ops {
            let mut s = shape(&mut rng, 3, 20);
            s[2] = 1 + rng.below(3000) as usize; // vocab-like rows too
            let x = rand(&mut rng, &s, -8.0, 8.0, DType::F32);
            let g = rand(&mut rng, &s, -1.0, 1.0, DType::F32);
            let ((xc, xg), (gc, gg)) = (pair(&x, dtype), pair(&g, dtype));
            let t = tol(dtype, 1e-4);
            check(
                &format!("{name} {dtype} {s:?}"),
                &f(&xg).unwrap(),
                &f(&xc).unwrap(),
                t,
            );
            check(
                &format!("{name} {dtype} backward"),
                &grad_of(&xg, &gg, f),
                &grad_of(&xc, &gc, f),
                t * 2.0,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_errors_for_mixed_devices_and_missing_kernels() {
    let x = Tensor::randn(&[4, 8], 0.0, 1.0, 5);
    let g = x.to_device(GPU).unwrap();
    for e in [
        g.add(&x).unwrap_err(),
        x.matmul(&g.t().unwrap()).unwrap_err(),
        g.layer_norm(&Tensor::ones(&[8]), &Tensor::zeros(&[8]), 1e-5)
            .unwrap_err(),
        Tensor::embedding(
            &Tensor::from_vec(vec![0i64, 1], &[2])
                .unwrap()
                .to_device(GPU)
                .unwrap(),
            &x,
        )
        .unwrap_err(),
        g.to_dtype(DType::F16).unwrap_err(),
    ] {
        assert!(matches!(e, Error::Cuda { .. }), "{e}");
    }
}
