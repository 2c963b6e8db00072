//! CUDA against CPU for the network ops: reductions, layer_norm, embedding, gather_last,
//! cross_entropy, dropout, concat/stack, gt, where/masked_fill, narrow's backward, forward and
//! backward, f32 and bf16, plus their error cases (mixed devices, bad indices), the GPT's
//! attention-with-dropout pattern and a tiny language-model step composed of them. Every
//! test is `#[ignore]`d: no CPU machine can run them; a GPU session runs this binary with
//! `--ignored` (docs/cuda.md).
//!
//! Conventions as in gpu_ops.rs (whose small helpers are copied here): fresh random inputs
//! (never zeros) from a seed printed per test and replayable with RLHF_GPU_SEED; relative error
//! ‖out − ref‖ / ‖ref‖ under 1e-5 for f32 arithmetic (1e-4 where the GPU's and the CPU's
//! transcendental functions or rsqrt differ), under 1e-2 for bf16; NaN never passes. bf16 is
//! checked against the CPU's f32 op on the same bf16-rounded inputs. Ops that only move or add
//! values in the CPU's order (embedding, gather_last, concat, dropout, argmax, max, gt, where,
//! masked_fill, narrow's backward) are checked bit for bit; for bf16, against the CPU's f32
//! result rounded once to bf16. (The comparison and mask tests draw small integers, zeros
//! included, on purpose: ties and false conditions are what they check.)
#![cfg(feature = "cuda")]

use rlhf_tensor::{DType, Device, Error, Parameter, Rng, Tensor};

mod gpu_common;
use gpu_common::*;

/// [`gpu_common::check`], and the result must still be on the GPU.
fn check(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.device(), GPU, "{what}: the result left the GPU");
    gpu_common::check(what, got, want, tol);
}

/// Bit-for-bit equality of a GPU result with a CPU reference (f32 reference rounded to the
/// GPU result's dtype first: one rounding, as the kernels do).
fn check_bits(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.device(), GPU, "{what}: the result left the GPU");
    assert_eq!(got.shape(), want.shape(), "{what}: shapes differ");
    let want = want.to_dtype(got.dtype()).unwrap();
    let (g, w) = (
        got.to_device(Device::Cpu).unwrap().to_f64_vec(),
        want.to_f64_vec(),
    );
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(
            a.to_bits() == b.to_bits(),
            "{what}: element {i} is {a} on the GPU, {b} on the CPU"
        );
    }
}

/// The gradient of `f` at `x` for output gradient `g` (values on x's device).
fn grad_of(x: &Tensor, g: &Tensor, f: &dyn Fn(&Tensor) -> rlhf_tensor::Result<Tensor>) -> Tensor {
    grads_of(std::slice::from_ref(x), g, &|t| f(&t[0])).remove(0)
}

/// The gradients of `f` with respect to every tensor of `xs` for output gradient `g`.
fn grads_of(
    xs: &[Tensor],
    g: &Tensor,
    f: &dyn Fn(&[Tensor]) -> rlhf_tensor::Result<Tensor>,
) -> Vec<Tensor> {
    let ps: Vec<Parameter> = xs.iter().map(|x| Parameter::new(x.clone())).collect();
    let ts: Vec<Tensor> = ps.iter().map(|p| p.tensor()).collect();
    let y = f(&ts).unwrap();
    y.backward_with(g.clone()).unwrap();
    ps.iter().map(|p| p.grad().expect("a gradient")).collect()
}

/// Random i64 indices in 0..limit of `shape`, on the CPU.
fn indices(rng: &mut Rng, shape: &[usize], limit: usize) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<i64> = (0..n).map(|_| rng.below(limit as u64) as i64).collect();
    Tensor::from_vec(v, shape).unwrap()
}

fn gpu(t: &Tensor) -> Tensor {
    t.to_device(GPU).unwrap()
}

// ---- reductions ---------------------------------------------------------------------------

type Reduction = fn(&Tensor, isize, bool) -> rlhf_tensor::Result<Tensor>;

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_reductions_over_each_dim_forward_and_backward() {
    let mut rng = Rng::new(seed("reductions"));
    // (name, op, f32 tolerance). Positive-mean inputs keep sums away from cancellation.
    let ops: Vec<(&str, Reduction, f64)> = vec![
        ("sum", |x, d, k| x.sum(d, k), 1e-5),
        ("mean", |x, d, k| x.mean(d, k), 1e-5),
        // Biased: a dim of size 1 would divide by zero with Bessel's correction (NaN both ways).
        ("var", |x, d, k| x.var(d, k, false), 1e-4),
        ("logsumexp", |x, d, k| x.logsumexp(d, k), 1e-4),
        ("max", |x, d, k| x.max(d, k), 1e-7),
    ];
    for dtype in [DType::F32, DType::BF16] {
        for (name, f, t32) in &ops {
            for dim in [0isize, 1, 2, -1] {
                let mut s = shape(&mut rng, 3, 24);
                if rng.below(2) == 0 {
                    s[2] = 1 + rng.below(3000) as usize; // long rows: the block-per-row kernel
                }
                let keepdim = rng.below(2) == 0;
                let x = rand(&mut rng, &s, -1.0, 3.0, DType::F32);
                let (xc, xg) = pair(&x, dtype);
                let what = format!("{name} {dtype} {s:?} dim {dim} keepdim {keepdim}");
                let want = f(&xc, dim, keepdim).unwrap();
                let got = f(&xg, dim, keepdim).unwrap();
                if *name == "max" {
                    // Picking an element is exact, ties and all (the first maximum wins).
                    check_bits(&what, &got, &want);
                } else {
                    check(&what, &got, &want, tol(dtype, *t32));
                }
                let g = rand(&mut rng, want.shape(), -1.0, 1.0, DType::F32);
                let (gc, gg) = pair(&g, dtype);
                let op = |x: &Tensor| f(x, dim, keepdim);
                check(
                    &format!("{what} backward"),
                    &grad_of(&xg, &gg, &op),
                    &grad_of(&xc, &gc, &op),
                    tol(dtype, t32 * 2.0),
                );
                // A strided input (dense copy on the device first).
                let xt = xg.transpose(0, 2).unwrap();
                check(
                    &format!("{what} strided"),
                    &f(&xt, dim, keepdim).unwrap(),
                    &f(&xc.transpose(0, 2).unwrap(), dim, keepdim).unwrap(),
                    tol(dtype, t32.max(1e-5)),
                );
            }
        }
    }
}

/// Few outputs over a long dim (a bias gradient: [B·T, n] summed over B·T) take the split
/// kernel (reduce_*_midsplit, then one pass over the partials): sums, means and sums of a
/// broadcast add's gradient against the CPU, and the same bits on a second run.
#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_long_dim_reductions_split_over_row_ranges() {
    let mut rng = Rng::new(seed("midsplit"));
    for dtype in [DType::F32, DType::BF16] {
        for s in [
            vec![1024, 768],
            vec![3, 5000, 7],
            vec![8192, 3],
            vec![129, 2],
        ] {
            let x = rand(&mut rng, &s, -1.0, 3.0, DType::F32);
            let (xc, xg) = pair(&x, dtype);
            let what = format!("{dtype} {s:?}");
            let got = xg.sum(-2, false).unwrap();
            check(
                &format!("sum {what}"),
                &got,
                &xc.sum(-2, false).unwrap(),
                tol(dtype, 1e-5),
            );
            check(
                &format!("mean {what}"),
                &xg.mean(-2, true).unwrap(),
                &xc.mean(-2, true).unwrap(),
                tol(dtype, 1e-5),
            );
            check_bits(
                &format!("sum {what} rerun"),
                &xg.sum(-2, false).unwrap(),
                &got.to_device(Device::Cpu).unwrap(),
            );
        }
        // The bias gradient of x + b through autograd.
        let x = rand(&mut rng, &[8, 128, 96], -1.0, 1.0, DType::F32);
        let b = rand(&mut rng, &[96], -1.0, 1.0, DType::F32);
        let g = rand(&mut rng, &[8, 128, 96], -1.0, 1.0, DType::F32);
        let ((xc, xg), (bc, bg), (gc, gg)) = (pair(&x, dtype), pair(&b, dtype), pair(&g, dtype));
        let grad_b = |x: &Tensor, b: &Tensor, g: &Tensor| {
            let p = Parameter::new(b.clone());
            x.add(&p.tensor())
                .unwrap()
                .backward_with(g.clone())
                .unwrap();
            p.grad().unwrap()
        };
        check(
            &format!("bias gradient {dtype}"),
            &grad_b(&xg, &bg, &gg),
            &grad_b(&xc, &bc, &gc),
            tol(dtype, 1e-5),
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_argmax_matches_the_cpu_exactly_ties_and_nan_included() {
    let mut rng = Rng::new(seed("argmax"));
    for dtype in [DType::F32, DType::BF16] {
        for dim in [0isize, 1, 2] {
            let mut s = shape(&mut rng, 3, 30);
            s[2] = 1 + rng.below(2000) as usize;
            // Eight distinct values: many ties, which the first index must win everywhere.
            let n: usize = s.iter().product();
            let vals: Vec<f32> = (0..n).map(|_| rng.below(8) as f32 * 0.25 - 1.0).collect();
            let x = Tensor::from_vec(vals, &s).unwrap();
            let (xc, xg) = pair(&x, dtype);
            let keepdim = dim == 1;
            let want = xc.argmax(dim, keepdim).unwrap();
            let got = xg.argmax(dim, keepdim).unwrap();
            assert_eq!(got.device(), GPU);
            assert_eq!(got.dtype(), DType::I64);
            assert_eq!(got.shape(), want.shape());
            assert_eq!(
                got.to_i64_vec().unwrap(),
                want.to_i64_vec().unwrap(),
                "argmax {dtype} {s:?} dim {dim}"
            );
        }
    }
    // NaN: skipped after the first element, the answer when it is the first (the CPU's fold).
    let rows = vec![
        f32::NAN,
        1.0,
        5.0,
        2.0, // NaN first: index 0
        1.0,
        f32::NAN,
        5.0,
        5.0, // first maximum after a NaN: index 2
        -3.0,
        -1.0,
        f32::NAN,
        -1.0, // index 1
    ];
    let x = Tensor::from_vec(rows, &[3, 4]).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let (xc, xg) = pair(&x, dtype);
        // Dim 1 of x runs the row kernel; dim 0 of xᵀ ([4, 3], the same rows as columns) the
        // middle-dim kernel.
        for (name, c, g, d) in [
            ("rows", xc.clone(), xg.clone(), 1isize),
            ("mid", xc.t().unwrap(), xg.t().unwrap(), 0),
        ] {
            let want = c.argmax(d, false).unwrap().to_i64_vec().unwrap();
            assert_eq!(want, vec![0, 2, 1], "the CPU's own answer");
            assert_eq!(
                g.argmax(d, false).unwrap().to_i64_vec().unwrap(),
                want,
                "{dtype} {name}"
            );
            let (a, b) = (
                g.max(d, false).unwrap().to_f64_vec(),
                c.max(d, false).unwrap().to_f64_vec(),
            );
            for (p, q) in a.iter().zip(&b) {
                assert!(
                    p == q || (p.is_nan() && q.is_nan()),
                    "{dtype} {name}: {a:?} vs {b:?}"
                );
            }
        }
    }
    // An empty dim has no maximum, on either device.
    let empty = gpu(&Tensor::ones(&[3, 2])).narrow(1, 0, 0).unwrap();
    let e = empty.max(1, false).unwrap_err();
    assert!(e.to_string().contains("empty dim"), "{e}");
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_whole_tensor_sums_two_pass_and_deterministic() {
    let mut rng = Rng::new(seed("sum_all"));
    for dtype in [DType::F32, DType::BF16] {
        // One chunk (a single block) and many (partials, then a second pass).
        for n in [1usize, 777, 4096, 4097, 250_000, 5_000_000] {
            let x = rand(&mut rng, &[n], 0.5, 1.5, DType::F32);
            let (xc, xg) = pair(&x, dtype);
            // A float64 reference: the CPU's f32 sum carries its own rounding at 5M elements.
            let exact: f64 = xc.to_f64_vec().iter().sum();
            let want = Tensor::scalar(exact as f32);
            let s = xg.sum_all().unwrap();
            assert_eq!(s.shape(), &[] as &[usize]);
            check(
                &format!("sum_all {dtype} n {n}"),
                &s,
                &want,
                tol(dtype, 1e-6),
            );
            let m = xg.mean_all().unwrap();
            let want_mean = Tensor::scalar((exact / n as f64) as f32);
            check(
                &format!("mean_all {dtype} n {n}"),
                &m,
                &want_mean,
                tol(dtype, 1e-6),
            );
            // The same launch twice: the same bits.
            let again = xg.sum_all().unwrap();
            check_bits(
                &format!("sum_all {dtype} n {n} repeat"),
                &again,
                &s.to_device(Device::Cpu).unwrap(),
            );
            // Its gradient: ones (times the upstream value).
            let g = Tensor::scalar(0.75).to_dtype(dtype).unwrap();
            let gx = grad_of(&xg, &gpu(&g), &|t| t.sum_all());
            check_bits(
                &format!("sum_all {dtype} backward"),
                &gx,
                &Tensor::full(&[n], 0.75),
            );
        }
        // A 2-D tensor reduced over a dim of size 1 in a [1, n] shape is also a whole sum.
        let x = rand(&mut rng, &[1, 9000], 0.5, 1.5, DType::F32);
        let (xc, xg) = pair(&x, dtype);
        check(
            &format!("sum dim 1 of [1, 9000] {dtype}"),
            &xg.sum(1, false).unwrap(),
            &xc.sum(1, false).unwrap(),
            tol(dtype, 1e-5),
        );
    }
    // Broadcast backward uses sum on the device: bias gradients of a [B, T, D] + [D] add.
    let a = rand(&mut rng, &[4, 50, 33], -1.0, 1.0, DType::F32);
    let b = rand(&mut rng, &[33], -1.0, 1.0, DType::F32);
    let g = rand(&mut rng, &[4, 50, 33], -1.0, 1.0, DType::F32);
    check(
        "broadcast add backward (rhs)",
        &grad_of(&gpu(&b), &gpu(&g), &|y| gpu(&a).add(y)),
        &grad_of(&b, &g, &|y| a.add(y)),
        1e-5,
    );
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_reduction_errors() {
    let x = Tensor::randn(&[4, 8], 0.0, 1.0, 5);
    let ints = gpu(&Tensor::from_vec(vec![1i64, 2, 3], &[3]).unwrap());
    for e in [
        ints.sum(0, false).unwrap_err(),
        ints.argmax(0, false).unwrap_err(),
    ] {
        assert!(matches!(e, Error::Cuda { .. }), "{e}");
    }
    // Out-of-range dims are the same error on both devices.
    let g = gpu(&x);
    assert!(matches!(g.sum(2, false), Err(Error::DimOutOfRange { .. })));
    assert!(matches!(x.sum(2, false), Err(Error::DimOutOfRange { .. })));
}

// ---- layer norm ---------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_layer_norm_forward_and_backward() {
    let mut rng = Rng::new(seed("layer_norm"));
    for dtype in [DType::F32, DType::BF16] {
        for trial in 0..6 {
            let mut s = shape(&mut rng, 3, 12);
            // Widths below, at and above one block of 256 threads, and GPT-2's 768.
            s[2] = [1, 37, 256, 300, 768, 1 + rng.below(1500) as usize][trial];
            // Rows past 256 give more rows than backward partial blocks.
            if trial == 4 {
                s[0] = 40;
            }
            let c = s[2];
            let x = rand(&mut rng, &s, -2.0, 4.0, DType::F32);
            let w = rand(&mut rng, &[c], 0.5, 1.5, DType::F32);
            let b = rand(&mut rng, &[c], -0.5, 0.5, DType::F32);
            let ((xc, xg), (wc, wg), (bc, bg)) =
                (pair(&x, dtype), pair(&w, dtype), pair(&b, dtype));
            let f = |t: &[Tensor]| t[0].layer_norm(&t[1], &t[2], 1e-5);
            let what = format!("layer_norm {dtype} {s:?}");
            let yc = f(&[xc.clone(), wc.clone(), bc.clone()]).unwrap();
            let yg = f(&[xg.clone(), wg.clone(), bg.clone()]).unwrap();
            assert_eq!(yg.dtype(), dtype);
            check(&what, &yg, &yc, tol(dtype, 1e-4));
            let g = rand(&mut rng, &s, -1.0, 1.0, DType::F32);
            let (gc, gg) = pair(&g, dtype);
            let want = grads_of(&[xc.clone(), wc, bc], &gc, &f);
            let got = grads_of(&[xg.clone(), wg.clone(), bg.clone()], &gg, &f);
            for (i, name) in ["dx", "dweight", "dbias"].iter().enumerate() {
                assert_eq!(got[i].dtype(), dtype, "{what} {name} dtype");
                check(
                    &format!("{what} {name}"),
                    &got[i],
                    &want[i],
                    tol(dtype, 1e-4),
                );
            }
            // Deterministic: the parameter gradients (cross-block sums) repeat bit for bit.
            let again = grads_of(&[xg.clone(), wg.clone(), bg.clone()], &gg, &f);
            for i in 1..3 {
                check_bits(
                    &format!("{what} repeat {i}"),
                    &again[i],
                    &got[i].to_device(Device::Cpu).unwrap(),
                );
            }
            // A strided input (a transposed view made dense on the device).
            let xt = gpu(&x
                .to_dtype(dtype)
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .contiguous()
                .unwrap())
            .transpose(0, 1)
            .unwrap();
            check(
                &format!("{what} strided"),
                &f(&[xt, wg, bg]).unwrap(),
                &yc,
                tol(dtype, 1e-4),
            );
        }
    }
    // Mixed devices and dtypes are errors.
    let x = gpu(&Tensor::randn(&[2, 8], 0.0, 1.0, 1));
    let (w, b) = (Tensor::ones(&[8]), Tensor::zeros(&[8]));
    let e = x.layer_norm(&w, &b, 1e-5).unwrap_err();
    assert!(matches!(e, Error::Cuda { .. }), "{e}");
    let wb = gpu(&w.to_dtype(DType::BF16).unwrap());
    let e = x.layer_norm(&wb, &gpu(&b), 1e-5).unwrap_err();
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
}

// ---- embedding ----------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_embedding_forward_and_backward_bitwise() {
    let mut rng = Rng::new(seed("embedding"));
    for dtype in [DType::F32, DType::BF16] {
        for trial in 0..4 {
            let v = 1 + rng.below(300) as usize;
            let d = [1, 77, 128, 1 + rng.below(400) as usize][trial];
            // The last trial has more tokens than the backward's 1024-id chunks.
            let (b, t) = match trial {
                3 => (3, 700 + rng.below(300) as usize),
                _ => (1 + rng.below(4) as usize, 1 + rng.below(300) as usize),
            };
            let table = rand(&mut rng, &[v, d], -1.0, 1.0, DType::F32);
            let (tc, tg) = pair(&table, dtype);
            // Ids of a small range repeat often: the backward's accumulation order matters.
            let range = v.min(1 + rng.below(20) as usize);
            let ids = indices(&mut rng, &[b, t + 1], range);
            let g = rand(&mut rng, &[b, t, d], -1.0, 1.0, DType::F32);
            let (gc, gg) = pair(&g, dtype);
            let f_cpu = |ids: &Tensor| {
                let f = |x: &Tensor| Tensor::embedding(ids, x);
                (f(&tc).unwrap(), grad_of(&tc, &gc, &f))
            };
            let cpu_ids = ids.narrow(1, 1, t).unwrap();
            let (want, want_grad) = f_cpu(&cpu_ids);
            // Ids on the host (i64 and i32, a strided view), on the GPU (contiguous i64: read in
            // place; a narrowed view and i32: through the host).
            let variants: Vec<(&str, Tensor)> = vec![
                ("host i64 view", cpu_ids.clone()),
                (
                    "host i32",
                    cpu_ids.contiguous().unwrap().to_dtype(DType::I32).unwrap(),
                ),
                ("gpu i64", gpu(&cpu_ids.contiguous().unwrap())),
                ("gpu i64 view", gpu(&ids).narrow(1, 1, t).unwrap()),
                (
                    "gpu i32",
                    gpu(&cpu_ids.contiguous().unwrap().to_dtype(DType::I32).unwrap()),
                ),
            ];
            for (kind, ids) in &variants {
                let what = format!("embedding {dtype} [{v}, {d}] ids [{b}, {t}] {kind}");
                let f = |x: &Tensor| Tensor::embedding(ids, x);
                let out = f(&tg).unwrap();
                assert_eq!(out.shape(), &[b, t, d]);
                check_bits(&what, &out, &want);
                // Token-order f32 sums: bitwise the CPU's (for bf16, rounded once).
                check_bits(
                    &format!("{what} backward"),
                    &grad_of(&tg, &gg, &f),
                    &want_grad,
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_embedding_bad_ids_are_errors_not_faults() {
    let table = Tensor::randn(&[5, 16], 0.0, 1.0, 3);
    let tg = gpu(&table);
    for bad in [5i64, -1, 1 << 40] {
        let ids = Tensor::from_vec(vec![0i64, 4, bad, 1], &[2, 2]).unwrap();
        let want = Tensor::embedding(&ids, &table).unwrap_err().to_string();
        for ids in [ids.clone(), gpu(&ids)] {
            let e = Tensor::embedding(&ids, &tg).unwrap_err();
            assert!(matches!(e, Error::Invalid { .. }), "{e}");
            assert_eq!(e.to_string(), want, "ids on {}", ids.device());
            assert!(
                want.contains(&format!("index {bad} out of range 0..5")),
                "{want}"
            );
        }
    }
    // The device is fine afterwards (a fault would make every later call fail).
    let ok = Tensor::embedding(&gpu(&Tensor::from_vec(vec![3i64], &[1]).unwrap()), &tg).unwrap();
    check_bits("after a bad id", &ok, &table.narrow(0, 3, 1).unwrap());
    // Mixed devices and non-integer ids.
    let ids = Tensor::from_vec(vec![0i64, 1], &[2]).unwrap();
    let e = Tensor::embedding(&gpu(&ids), &table).unwrap_err();
    assert!(matches!(e, Error::Cuda { .. }), "{e}");
    let e = Tensor::embedding(&Tensor::ones(&[2]), &tg).unwrap_err();
    assert!(e.to_string().contains("integer dtype"), "{e}");
}

// ---- gather_last ----------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_gather_last_forward_and_backward_bitwise() {
    let mut rng = Rng::new(seed("gather_last"));
    for dtype in [DType::F32, DType::BF16] {
        for _ in 0..4 {
            let (b, t) = (1 + rng.below(4) as usize, 1 + rng.below(200) as usize);
            let v = 1 + rng.below(3000) as usize;
            let k = 1 + rng.below(4) as usize;
            let x = rand(&mut rng, &[b, t, v], -6.0, 0.0, DType::F32);
            let (xc, xg) = pair(&x, dtype);
            // k indices per row from a small range: repeats within a row accumulate.
            let idx = indices(&mut rng, &[b, t, k], v.min(3));
            let g = rand(&mut rng, &[b, t, k], -1.0, 1.0, DType::F32);
            let (gc, gg) = pair(&g, dtype);
            let want = xc.gather_last(&idx).unwrap();
            let want_grad = grad_of(&xc, &gc, &|x| x.gather_last(&idx));
            for (kind, ids) in [("host", idx.clone()), ("gpu", gpu(&idx))] {
                let what = format!("gather_last {dtype} [{b}, {t}, {v}] k {k} ids {kind}");
                check_bits(&what, &xg.gather_last(&ids).unwrap(), &want);
                check_bits(
                    &format!("{what} backward"),
                    &grad_of(&xg, &gg, &|x| x.gather_last(&ids)),
                    &want_grad,
                );
            }
            // A strided input: log-probabilities of a narrowed logits view (PPO's pattern).
            let lc = xc.narrow(1, 0, t).unwrap().log_softmax(-1).unwrap();
            let lg = xg.narrow(1, 0, t).unwrap().log_softmax(-1).unwrap();
            check(
                &format!("gather_last of log_softmax {dtype}"),
                &lg.gather_last(&gpu(&idx)).unwrap(),
                &lc.gather_last(&idx).unwrap(),
                tol(dtype, 1e-4),
            );
        }
    }
    // Bad indices, both places, the CPU's error; then the device still works.
    let x = Tensor::randn(&[2, 3, 4], 0.0, 1.0, 1);
    let bad = Tensor::from_vec(vec![0i64, 1, 2, 3, 4, 0], &[2, 3, 1]).unwrap();
    let want = x.gather_last(&bad).unwrap_err().to_string();
    for ids in [bad.clone(), gpu(&bad)] {
        let e = gpu(&x).gather_last(&ids).unwrap_err();
        assert_eq!(e.to_string(), want, "ids on {}", ids.device());
    }
    let ok = gpu(&x).gather_last(&gpu(&bad.clamp_ids(3))).unwrap();
    check_bits(
        "after a bad index",
        &ok,
        &x.gather_last(&bad.clamp_ids(3)).unwrap(),
    );
    // Mixed devices: indices on the GPU with data on the CPU.
    let e = x.gather_last(&gpu(&bad)).unwrap_err();
    assert!(matches!(e, Error::Cuda { .. }), "{e}");
}

/// Index tensors clamped into 0..=hi (for a valid variant of a bad-index case).
trait ClampIds {
    fn clamp_ids(&self, hi: i64) -> Tensor;
}

impl ClampIds for Tensor {
    fn clamp_ids(&self, hi: i64) -> Tensor {
        let v: Vec<i64> = self
            .to_i64_vec()
            .unwrap()
            .into_iter()
            .map(|i| i.clamp(0, hi))
            .collect();
        Tensor::from_vec(v, self.shape()).unwrap()
    }
}

// ---- cross entropy ----------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_cross_entropy_forward_and_backward() {
    let mut rng = Rng::new(seed("cross_entropy"));
    for dtype in [DType::F32, DType::BF16] {
        for trial in 0..6 {
            let (b, t) = (1 + rng.below(4) as usize, 1 + rng.below(64) as usize);
            // Vocabularies on both sides of the 256/1024-thread switch (4096).
            let v = if trial % 2 == 0 {
                2 + rng.below(500) as usize
            } else {
                4096 + rng.below(6000) as usize
            };
            let x = rand(&mut rng, &[b, t, v], -4.0, 4.0, DType::F32);
            let (xc, xg) = pair(&x, dtype);
            // Targets with some ignored (-100) positions.
            let tv: Vec<i64> = (0..b * t)
                .map(|_| {
                    if rng.below(5) == 0 {
                        -100
                    } else {
                        rng.below(v as u64) as i64
                    }
                })
                .collect();
            let targets = Tensor::from_vec(tv, &[b, t]).unwrap();
            let weights = (trial >= 2).then(|| {
                // Positive weights with some zeros.
                let w = rand(&mut rng, &[b, t], -0.5, 2.0, DType::F32);
                w.clamp(0.0, 2.0).unwrap()
            });
            let upstream = 0.5 + rng.next_f32();
            for (kind, tgt) in [("host", targets.clone()), ("gpu", gpu(&targets))] {
                let wg = weights.as_ref().map(|w| gpu(&w.to_dtype(dtype).unwrap()));
                let wc = weights
                    .as_ref()
                    .map(|w| w.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap());
                let what = format!(
                    "cross_entropy {dtype} [{b}, {t}, {v}] targets {kind} weights {}",
                    weights.is_some()
                );
                let fc = |x: &Tensor| x.cross_entropy(&targets, Some(-100), wc.as_ref());
                let fg = |x: &Tensor| x.cross_entropy(&tgt, Some(-100), wg.as_ref());
                let lg = fg(&xg).unwrap();
                assert_eq!((lg.shape(), lg.dtype()), (&[] as &[usize], DType::F32));
                check(&what, &lg, &fc(&xc).unwrap(), tol(dtype, 1e-4));
                let gx = grad_of(&xg, &gpu(&Tensor::scalar(upstream)), &fg);
                assert_eq!(gx.dtype(), dtype);
                check(
                    &format!("{what} backward"),
                    &gx,
                    &grad_of(&xc, &Tensor::scalar(upstream), &fc),
                    tol(dtype, 1e-4),
                );
            }
        }
    }
    // Nothing counts: loss 0 (not NaN), zero gradient.
    let x = gpu(&Tensor::randn(&[3, 7], 0.0, 1.0, 2));
    let t = Tensor::from_vec(vec![-100i64; 3], &[3]).unwrap();
    let l = x.cross_entropy(&t, Some(-100), None).unwrap();
    assert_eq!(l.item().unwrap(), 0.0);
    let gx = grad_of(&x, &gpu(&Tensor::scalar(1.0)), &|x| {
        x.cross_entropy(&t, Some(-100), None)
    });
    assert!(gx.to_f64_vec().iter().all(|&v| v == 0.0));
    // The same with an empty vocabulary ([3, 0] logits, every target ignored): 0, as on the CPU.
    let x = gpu(&Tensor::zeros(&[3, 0]));
    let l = x.cross_entropy(&t, Some(-100), None).unwrap();
    assert_eq!(l.item().unwrap(), 0.0);
    // Deterministic: the same loss bits twice.
    let mut rng = Rng::new(9);
    let x = gpu(&rand(&mut rng, &[16, 50257], -4.0, 4.0, DType::F32));
    let t = gpu(&indices(&mut rng, &[16], 50257));
    let a = x.cross_entropy(&t, None, None).unwrap();
    let b = x.cross_entropy(&t, None, None).unwrap();
    check_bits(
        "cross_entropy repeat",
        &a,
        &b.to_device(Device::Cpu).unwrap(),
    );
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_cross_entropy_errors() {
    let x = Tensor::randn(&[4, 6], 0.0, 1.0, 1);
    let xg = gpu(&x);
    let bad = Tensor::from_vec(vec![1i64, -100, 6, 0], &[4]).unwrap();
    let want = x
        .cross_entropy(&bad, Some(-100), None)
        .unwrap_err()
        .to_string();
    assert!(
        want.contains("target 6 at position 2 out of range 0..6"),
        "{want}"
    );
    for t in [bad.clone(), gpu(&bad)] {
        let e = xg.cross_entropy(&t, Some(-100), None).unwrap_err();
        assert_eq!(e.to_string(), want, "targets on {}", t.device());
    }
    // Without an ignore index, -100 is out of range too.
    let e = xg.cross_entropy(&gpu(&bad), None, None).unwrap_err();
    assert!(e.to_string().contains("target -100 at position 1"), "{e}");
    // The device still works.
    let ok = Tensor::from_vec(vec![1i64, 2, 3, 0], &[4]).unwrap();
    check(
        "after a bad target",
        &xg.cross_entropy(&gpu(&ok), None, None).unwrap(),
        &x.cross_entropy(&ok, None, None).unwrap(),
        1e-4,
    );
    // Weights are float data: they must be on the logits' GPU.
    let w = Tensor::ones(&[4]);
    let e = xg.cross_entropy(&ok, None, Some(&w)).unwrap_err();
    assert!(matches!(e, Error::Cuda { .. }), "{e}");
    let e = x.cross_entropy(&ok, None, Some(&gpu(&w))).unwrap_err();
    assert!(matches!(e, Error::Cuda { .. }), "{e}");
    // Targets on the GPU with logits on the CPU.
    let e = x.cross_entropy(&gpu(&ok), None, None).unwrap_err();
    assert!(matches!(e, Error::Cuda { .. }), "{e}");
    // Shapes are checked before any device work.
    let e = xg
        .cross_entropy(&gpu(&ok), None, Some(&gpu(&Tensor::ones(&[3]))))
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
}

// ---- dropout ------------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_dropout_drops_the_cpu_elements() {
    let mut rng = Rng::new(seed("dropout"));
    for dtype in [DType::F32, DType::BF16] {
        for p in [0.1f32, 0.5, 0.9] {
            let s = shape(&mut rng, 3, 40);
            let seed = rng.next_u64();
            let x = rand(&mut rng, &s, 0.5, 2.0, DType::F32);
            let (xc, xg) = pair(&x, dtype);
            let what = format!("dropout {dtype} p {p} {s:?}");
            let want = xc.dropout(p, seed).unwrap();
            let got = xg.dropout(p, seed).unwrap();
            // Same elements dropped (x is never 0 here), same values (one rounding for bf16).
            check_bits(&what, &got, &want);
            let g = rand(&mut rng, &s, -1.0, 1.0, DType::F32);
            let (gc, gg) = pair(&g, dtype);
            check_bits(
                &format!("{what} backward"),
                &grad_of(&xg, &gg, &|x| x.dropout(p, seed)),
                &grad_of(&xc, &gc, &|x| x.dropout(p, seed)),
            );
            // A strided input drops the same row-major elements as its dense copy.
            let xt = xg.transpose(0, 2).unwrap();
            check_bits(
                &format!("{what} strided"),
                &xt.dropout(p, seed).unwrap(),
                &xc.transpose(0, 2).unwrap().dropout(p, seed).unwrap(),
            );
        }
    }
    assert!(gpu(&Tensor::ones(&[3])).dropout(1.0, 0).is_err());
}

// ---- concat / stack -----------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_concat_and_stack_forward_and_backward_bitwise() {
    let mut rng = Rng::new(seed("concat"));
    for dtype in [DType::F32, DType::BF16] {
        for dim in [0usize, 1, 2] {
            let base = shape(&mut rng, 3, 20);
            let count = 2 + rng.below(3) as usize;
            let parts: Vec<Tensor> = (0..count)
                .map(|_| {
                    let mut s = base.clone();
                    s[dim] = 1 + rng.below(12) as usize;
                    rand(&mut rng, &s, -1.0, 1.0, DType::F32)
                })
                .collect();
            let mut pc: Vec<Tensor> = parts.iter().map(|t| pair(t, dtype).0).collect();
            // Every other GPU input is a transposed copy viewed back: strided on the device.
            let mut pg: Vec<Tensor> = parts
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let t = t.to_dtype(dtype).unwrap();
                    if i % 2 == 1 {
                        gpu(&t.transpose(0, 2).unwrap().contiguous().unwrap())
                            .transpose(0, 2)
                            .unwrap()
                    } else {
                        gpu(&t)
                    }
                })
                .collect();
            // An empty part (a zero-length view of a GPU tensor) in the middle.
            pc.insert(1, pc[0].narrow(dim as isize, 0, 0).unwrap());
            pg.insert(1, pg[0].narrow(dim as isize, 0, 0).unwrap());
            let count = count + 1;
            let what = format!("concat {dtype} dim {dim} {count} parts of {base:?}");
            let cat = |ts: &[Tensor]| Tensor::concat(&ts.iter().collect::<Vec<_>>(), dim as isize);
            let want = cat(&pc).unwrap();
            check_bits(&what, &cat(&pg).unwrap(), &want);
            let g = rand(&mut rng, want.shape(), -1.0, 1.0, DType::F32);
            let (gc, gg) = pair(&g, dtype);
            let got = grads_of(&pg, &gg, &cat);
            for (i, w) in grads_of(&pc, &gc, &cat).iter().enumerate() {
                check_bits(&format!("{what} backward {i}"), &got[i], w);
            }
            // stack: same-shape inputs along a new dim.
            let same: Vec<Tensor> = (0..count)
                .map(|_| rand(&mut rng, &base, -1.0, 1.0, DType::F32))
                .collect();
            let sc: Vec<Tensor> = same.iter().map(|t| pair(t, dtype).0).collect();
            let sg: Vec<Tensor> = same.iter().map(|t| pair(t, dtype).1).collect();
            let st = |ts: &[Tensor]| Tensor::stack(&ts.iter().collect::<Vec<_>>(), dim as isize);
            check_bits(
                &format!("stack {dtype} dim {dim}"),
                &st(&sg).unwrap(),
                &st(&sc).unwrap(),
            );
            let g = rand(&mut rng, st(&sc).unwrap().shape(), -1.0, 1.0, DType::F32);
            let (gc, gg) = pair(&g, dtype);
            let got = grads_of(&sg, &gg, &st);
            for (i, w) in grads_of(&sc, &gc, &st).iter().enumerate() {
                check_bits(&format!("stack {dtype} dim {dim} backward {i}"), &got[i], w);
            }
        }
    }
    let a = Tensor::randn(&[2, 3], 0.0, 1.0, 1);
    let e = Tensor::concat(&[&gpu(&a), &a], 0).unwrap_err();
    assert!(matches!(e, Error::Cuda { .. }), "{e}");
    let b = gpu(&a.to_dtype(DType::BF16).unwrap());
    let e = Tensor::concat(&[&gpu(&a), &b], 0).unwrap_err();
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
}

// ---- the ops together: one step of a tiny language model ------------------------------------

/// A one-block language model from the ops of this file plus matmul, gelu and softmax:
/// embeddings, layer norm, attention without a mask, an MLP, dropout, a tied LM head and a
/// masked cross-entropy, so every gradient path of a GPT-2 step meets the others.
fn tiny_lm(
    p: &[Tensor],
    ids: &Tensor,
    pos: &Tensor,
    targets: &Tensor,
    seed: u64,
) -> rlhf_tensor::Result<Tensor> {
    let (wte, wpe, ln_w, ln_b, w1, w2, lnf_w, lnf_b, wo) = (
        &p[0], &p[1], &p[2], &p[3], &p[4], &p[5], &p[6], &p[7], &p[8],
    );
    let x = Tensor::embedding(ids, wte)?.add(&Tensor::embedding(pos, wpe)?)?;
    let x = x.dropout(0.1, seed)?;
    let h = x.layer_norm(ln_w, ln_b, 1e-5)?;
    // Two "heads" (attention without a mask over h and h/2), joined with concat and
    // projected back to d (narrow's backward has its own test and the attention pattern's).
    let heads: Vec<Tensor> = [1.0f32, 0.5]
        .iter()
        .map(|&c| {
            let q = h.mul_scalar(c)?;
            let s = q
                .matmul(&q.transpose(1, 2)?)?
                .mul_scalar(0.25)?
                .softmax(-1)?;
            s.matmul(&q)
        })
        .collect::<rlhf_tensor::Result<_>>()?;
    let att = Tensor::concat(&heads.iter().collect::<Vec<_>>(), -1)?.matmul(wo)?;
    let x = x.add(&att)?;
    let m = x
        .layer_norm(ln_w, ln_b, 1e-5)?
        .matmul(w1)?
        .gelu()?
        .matmul(w2)?;
    let x = x.add(&m)?;
    let logits = x.layer_norm(lnf_w, lnf_b, 1e-5)?.matmul(&wte.t()?)?;
    // A max-based auxiliary term exercises max's backward and a mean the reductions'. Small,
    // so that a near-tie picked differently by f32 rounding cannot move the gradient past the
    // tolerance (max itself is checked exactly in its own test).
    let aux = logits.max(-1, false)?.mean_all()?.mul_scalar(1e-4)?;
    logits.cross_entropy(targets, Some(-100), None)?.add(&aux)
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_tiny_lm_step_matches_the_cpu() {
    let mut rng = Rng::new(seed("tiny_lm"));
    let (v, d, b, t) = (97usize, 32usize, 3usize, 17usize);
    let shapes: [&[usize]; 9] = [
        &[v, d],
        &[t, d],
        &[d],
        &[d],
        &[d, 4 * d],
        &[4 * d, d],
        &[d],
        &[d],
        &[2 * d, d],
    ];
    let params: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            // Layer-norm gains near 1, everything else small and centred.
            if matches!(i, 2 | 6) {
                rand(&mut rng, s, 0.8, 1.2, DType::F32)
            } else {
                rand(&mut rng, s, -0.3, 0.3, DType::F32)
            }
        })
        .collect();
    let ids = indices(&mut rng, &[b, t + 1], v);
    let inputs = ids.narrow(1, 0, t).unwrap();
    let mut tv = ids.narrow(1, 1, t).unwrap().to_i64_vec().unwrap();
    tv[3] = -100;
    let targets = Tensor::from_vec(tv, &[b, t]).unwrap();
    let pos = Tensor::from_vec((0..t as i64).collect(), &[t]).unwrap();
    let seed = rng.next_u64();
    let f_cpu = |p: &[Tensor]| tiny_lm(p, &inputs, &pos, &targets, seed);
    let want = grads_of(&params, &Tensor::scalar(1.0), &f_cpu);
    let want_loss = f_cpu(&params).unwrap();
    // On the GPU: parameters there, token ids left on the host (the common case) or moved up.
    let pg: Vec<Tensor> = params.iter().map(gpu).collect();
    for ids_on_gpu in [false, true] {
        let (inp, tgt) = if ids_on_gpu {
            (gpu(&inputs), gpu(&targets))
        } else {
            (inputs.clone(), targets.clone())
        };
        let f_gpu = |p: &[Tensor]| tiny_lm(p, &inp, &pos, &tgt, seed);
        check("tiny lm loss", &f_gpu(&pg).unwrap(), &want_loss, 1e-4);
        let got = grads_of(&pg, &gpu(&Tensor::scalar(1.0)), &f_gpu);
        for (i, (gg, gc)) in got.iter().zip(&want).enumerate() {
            check(
                &format!("tiny lm grad {i} (ids on gpu: {ids_on_gpu})"),
                gg,
                gc,
                1e-4,
            );
        }
    }
}

// ---- where / masked_fill / gt ---------------------------------------------------------------

/// `s` with some dims set to 1 and maybe its leading dim dropped: a shape that broadcasts to s.
fn broadcastable(rng: &mut Rng, s: &[usize]) -> Vec<usize> {
    let mut b: Vec<usize> = s
        .iter()
        .map(|&n| if rng.below(3) == 0 { 1 } else { n })
        .collect();
    if rng.below(3) == 0 {
        b.remove(0);
    }
    b
}

/// Values from {-2, -1, 0, 1, 2} (exact in bf16, many ties for the comparisons), with one NaN
/// when `nan` (comparisons with NaN are false for gt, true for ne, as on the CPU).
fn small_ints(rng: &mut Rng, shape: &[usize], nan: bool) -> Tensor {
    let n: usize = shape.iter().product();
    let mut v: Vec<f32> = (0..n).map(|_| rng.below(5) as f32 - 2.0).collect();
    if nan && n > 0 {
        v[rng.below(n as u64) as usize] = f32::NAN;
    }
    Tensor::from_vec(v, shape).unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_gt_matches_the_cpu_bitwise() {
    let mut rng = Rng::new(seed("gt"));
    for dtype in [DType::F32, DType::BF16] {
        for _ in 0..6 {
            let s = shape(&mut rng, 3, 30);
            let bs = broadcastable(&mut rng, &s);
            let (x, y) = (
                small_ints(&mut rng, &s, true),
                small_ints(&mut rng, &bs, true),
            );
            let (xc, xg) = pair(&x, dtype);
            let (yc, yg) = pair(&y, dtype);
            let what = format!("gt {dtype} {s:?} vs {bs:?}");
            let got = xg.gt(&yg).unwrap();
            assert_eq!(got.dtype(), DType::U8, "{what}");
            check_bits(&what, &got, &xc.gt(&yc).unwrap());
            // Broadcasting on the left, and a strided (transposed) operand.
            check_bits(
                &format!("{what} swapped"),
                &yg.gt(&xg).unwrap(),
                &yc.gt(&xc).unwrap(),
            );
            check_bits(
                &format!("{what} strided"),
                &xg.transpose(0, 2)
                    .unwrap()
                    .gt(&Tensor::scalar(0.0)
                        .to_dtype(dtype)
                        .unwrap()
                        .to_device(GPU)
                        .unwrap())
                    .unwrap(),
                &xc.transpose(0, 2)
                    .unwrap()
                    .gt(&Tensor::scalar(0.0))
                    .unwrap(),
            );
        }
    }
    let x = Tensor::randn(&[3, 4], 0.0, 1.0, 1);
    let e = gpu(&x).gt(&x).unwrap_err();
    assert!(matches!(e, Error::Cuda { .. }), "{e}");
    let e = gpu(&x)
        .gt(&gpu(&x.to_dtype(DType::BF16).unwrap()))
        .unwrap_err();
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_where_and_masked_fill_forward_and_backward() {
    let mut rng = Rng::new(seed("where"));
    for dtype in [DType::F32, DType::BF16] {
        for _ in 0..4 {
            let s = shape(&mut rng, 3, 24);
            let (sa, sb, sc) = (
                broadcastable(&mut rng, &s),
                s.clone(),
                broadcastable(&mut rng, &s),
            );
            let a = rand(&mut rng, &sa, -1.0, 1.0, DType::F32);
            let b = rand(&mut rng, &sb, -1.0, 1.0, DType::F32);
            let (ac, ag) = pair(&a, dtype);
            let (bc, bg) = pair(&b, dtype);
            // The condition in every form the GPU takes: a u8 mask made by gt on the GPU, u8 and
            // f32 masks on the host, f32/bf16 and i64 masks on the GPU. All hold the same truth
            // values (nonzero is true; the NaN counts as true for the float masks).
            let m = small_ints(&mut rng, &sc, false);
            let cpu_mask = m.gt(&Tensor::scalar(0.0)).unwrap();
            let m_nan = {
                let mut v = m.to_vec::<f32>().unwrap();
                v.iter_mut()
                    .for_each(|x| *x = if *x > 0.0 { *x } else { 0.0 });
                if let Some(i) = (0..v.len()).find(|&i| v[i] != 0.0) {
                    v[i] = f32::NAN;
                }
                Tensor::from_vec(v, &sc).unwrap()
            };
            let masks: Vec<(&str, Tensor)> = vec![
                (
                    "gpu gt",
                    pair(&m, dtype)
                        .1
                        .gt(&gpu(&Tensor::scalar(0.0).to_dtype(dtype).unwrap()))
                        .unwrap(),
                ),
                ("host u8", cpu_mask.clone()),
                ("host f32", m_nan.clone()),
                ("gpu float", pair(&m_nan, dtype).1),
                ("gpu i64", gpu(&cpu_mask.to_dtype(DType::I64).unwrap())),
                (
                    "gpu u8 strided",
                    gpu(&cpu_mask
                        .transpose(0, sc.len() as isize - 1)
                        .unwrap()
                        .contiguous()
                        .unwrap())
                    .transpose(0, sc.len() as isize - 1)
                    .unwrap(),
                ),
            ];
            let want = Tensor::where_(&cpu_mask, &ac, &bc).unwrap();
            let g = rand(&mut rng, want.shape(), -1.0, 1.0, DType::F32);
            let (gc, gg) = pair(&g, dtype);
            let want_grads = grads_of(&[ac.clone(), bc.clone()], &gc, &|x| {
                Tensor::where_(&cpu_mask, &x[0], &x[1])
            });
            for (kind, mask) in &masks {
                let what = format!("where {dtype} {s:?} a {sa:?} mask {sc:?} ({kind})");
                // Selecting values is exact.
                check_bits(&what, &Tensor::where_(mask, &ag, &bg).unwrap(), &want);
                let got = grads_of(&[ag.clone(), bg.clone()], &gg, &|x| {
                    Tensor::where_(mask, &x[0], &x[1])
                });
                // b's gradient is a selection (exact); a's is summed over broadcast dims.
                check(
                    &format!("{what} backward a"),
                    &got[0],
                    &want_grads[0],
                    tol(dtype, 1e-5),
                );
                check_bits(&format!("{what} backward b"), &got[1], &want_grads[1]);
            }
            // masked_fill: a fill value of -inf (the attention mask) and a finite one (rounded
            // once to bf16 on both sides). Its backward is a selection: exact.
            for value in [f32::NEG_INFINITY, 0.3] {
                let what = format!("masked_fill {dtype} {s:?} mask {sc:?} value {value}");
                let want = bc.masked_fill(&cpu_mask, value).unwrap();
                let want_grad = grad_of(&bc, &gc, &|x| x.masked_fill(&cpu_mask, value));
                for (kind, mask) in &masks {
                    let w = format!("{what} ({kind})");
                    check_bits(&w, &bg.masked_fill(mask, value).unwrap(), &want);
                    check_bits(
                        &format!("{w} backward"),
                        &grad_of(&bg, &gg, &|x| x.masked_fill(mask, value)),
                        &want_grad,
                    );
                }
                // A strided input (a transposed view) with a mask of its own shape.
                let mt = small_ints(&mut rng, &[s[2], s[1], s[0]], false)
                    .gt(&Tensor::scalar(0.0))
                    .unwrap();
                check_bits(
                    &format!("{what} strided"),
                    &bg.transpose(0, 2).unwrap().masked_fill(&mt, value).unwrap(),
                    &bc.transpose(0, 2).unwrap().masked_fill(&mt, value).unwrap(),
                );
            }
        }
    }
    // Errors: mask on the GPU with values on the host, values split between devices, dtypes.
    let x = Tensor::randn(&[3, 4], 0.0, 1.0, 2);
    let m = x.gt(&Tensor::scalar(0.0)).unwrap();
    let e = x.masked_fill(&gpu(&m), 0.0).unwrap_err();
    assert!(matches!(e, Error::Cuda { .. }), "{e}");
    let e = Tensor::where_(&m, &gpu(&x), &x).unwrap_err();
    assert!(matches!(e, Error::Cuda { .. }), "{e}");
    let e = Tensor::where_(&m, &gpu(&x), &gpu(&x.to_dtype(DType::BF16).unwrap())).unwrap_err();
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
    let e = gpu(&x)
        .masked_fill(&Tensor::from_vec(vec![1u8; 4], &[4, 1]).unwrap(), 0.0)
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
}

// ---- narrow's backward ----------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_narrow_backward_bitwise() {
    let mut rng = Rng::new(seed("narrow_backward"));
    for dtype in [DType::F32, DType::BF16] {
        for dim in [0usize, 1, 2] {
            let s = shape(&mut rng, 3, 20);
            let n = s[dim];
            // Any slice, the empty one and the whole dim included.
            let (start, len) = match rng.below(4) {
                0 => (0, n),
                1 => (rng.below(n as u64 + 1) as usize, 0),
                _ => {
                    let start = rng.below(n as u64) as usize;
                    (start, 1 + rng.below((n - start) as u64) as usize)
                }
            };
            let x = rand(&mut rng, &s, -1.0, 1.0, DType::F32);
            let (xc, xg) = pair(&x, dtype);
            let what = format!("narrow {dtype} {s:?} dim {dim} {start}+{len}");
            let d = dim as isize;
            let f = |x: &Tensor| x.narrow(d, start, len);
            let want = f(&xc).unwrap();
            check_bits(&what, &f(&xg).unwrap(), &want);
            let g = rand(&mut rng, want.shape(), -1.0, 1.0, DType::F32);
            let (gc, gg) = pair(&g, dtype);
            let got = grad_of(&xg, &gg, &f);
            assert_eq!(got.dtype(), dtype, "{what}: the gradient keeps its dtype");
            check_bits(&format!("{what} backward"), &got, &grad_of(&xc, &gc, &f));
            // A strided incoming gradient (the narrowed view transposed before use), and two
            // overlapping slices of one tensor, whose padded gradients autograd adds.
            let ft = |x: &Tensor| x.narrow(d, start, len)?.transpose(0, 2);
            let gt_shape = ft(&xc).unwrap().shape().to_vec();
            let g = rand(&mut rng, &gt_shape, -1.0, 1.0, DType::F32);
            let (gc, gg) = pair(&g, dtype);
            check_bits(
                &format!("{what} backward, strided gradient"),
                &grad_of(&xg, &gg, &ft),
                &grad_of(&xc, &gc, &ft),
            );
            if n >= 2 {
                let k = n - 1;
                let f2 = |x: &Tensor| x.narrow(d, 0, k)?.add(&x.narrow(d, 1, k)?);
                let mut gs = s.clone();
                gs[dim] = k;
                let g = rand(&mut rng, &gs, -1.0, 1.0, DType::F32);
                let (gc, gg) = pair(&g, dtype);
                check_bits(
                    &format!("{what} backward, overlapping slices"),
                    &grad_of(&xg, &gg, &f2),
                    &grad_of(&xc, &gc, &f2),
                );
            }
        }
    }
}

// ---- attention with dropout composed from primitives ---------------------------------------------

/// Causal attention with dropout on the probabilities composed from primitives (the way the
/// GPT's training path ran before attention dropout was fused, and a chain of ops that user
/// code writes), from a packed [B, T, 3C] input: q, k, v are narrowed slices of its
/// [3, B, H, T, D] view; the causal mask is `mask` ([T, T], nonzero = masked).
fn packed_attention_with_dropout(
    qkv: &Tensor,
    h: usize,
    mask: &Tensor,
    p: f32,
    seed: u64,
) -> rlhf_tensor::Result<Tensor> {
    let (b, t, c3) = (qkv.shape()[0], qkv.shape()[1], qkv.shape()[2]);
    let d = c3 / 3 / h;
    let split = qkv
        .reshape_to(&[b, t, 3, h, d])?
        .permute(&[2, 0, 3, 1, 4])?;
    let part = |i| -> rlhf_tensor::Result<Tensor> { split.narrow(0, i, 1)?.squeeze(0) };
    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
    q.matmul(&k.t()?)?
        .mul_scalar(1.0 / (d as f32).sqrt())?
        .masked_fill(mask, f32::NEG_INFINITY)?
        .softmax(-1)?
        .dropout(p, seed)?
        .matmul(&v)?
        .permute(&[0, 2, 1, 3])?
        .reshape_to(&[b, t, h * d])
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_attention_with_dropout_pattern_matches_the_cpu() {
    let mut rng = Rng::new(seed("attention_with_dropout"));
    for dtype in [DType::F32, DType::BF16] {
        for _ in 0..3 {
            let (b, h) = (1 + rng.below(3) as usize, 1 + rng.below(3) as usize);
            let t = 1 + rng.below(40) as usize;
            let d = [8usize, 16, 64][rng.below(3) as usize];
            let p = [0.1f32, 0.5][rng.below(2) as usize];
            let seed = rng.next_u64();
            let x = rand(&mut rng, &[b, t, 3 * h * d], -1.0, 1.0, DType::F32);
            let (xc, xg) = pair(&x, dtype);
            // The causal mask, on the host as the model builds it, and on the GPU made by gt
            // (column index > row index).
            let host_mask: Vec<u8> = (0..t * t).map(|i| u8::from(i % t > i / t)).collect();
            let host_mask = Tensor::from_vec(host_mask, &[t, t]).unwrap();
            let cols = gpu(&Tensor::arange(0.0, t as f32, 1.0)
                .unwrap()
                .reshape(&[1, -1])
                .unwrap());
            let rows = gpu(&Tensor::arange(0.0, t as f32, 1.0)
                .unwrap()
                .reshape(&[-1, 1])
                .unwrap());
            let gpu_mask = cols.gt(&rows).unwrap();
            check_bits("causal mask by gt", &gpu_mask, &host_mask);
            let what = format!("attention+dropout {dtype} B{b} T{t} H{h} D{d} p {p}");
            let f = |m: &Tensor| {
                let m = m.clone();
                move |x: &Tensor| packed_attention_with_dropout(x, h, &m, p, seed)
            };
            let want = f(&host_mask)(&xc).unwrap();
            let g = rand(&mut rng, want.shape(), -1.0, 1.0, DType::F32);
            let (gc, gg) = pair(&g, dtype);
            let want_grad = grad_of(&xc, &gc, &f(&host_mask));
            for (kind, mask) in [("host mask", &host_mask), ("gpu mask", &gpu_mask)] {
                let w = format!("{what} ({kind})");
                check(&w, &f(mask)(&xg).unwrap(), &want, tol(dtype, 1e-4));
                check(
                    &format!("{w} backward"),
                    &grad_of(&xg, &gg, &f(mask)),
                    &want_grad,
                    tol(dtype, 1e-4) * 2.0,
                );
            }
        }
    }
}
