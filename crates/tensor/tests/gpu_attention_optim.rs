//! CUDA attention (kernels/flash_attention.cu) and optimiser (kernels/adamw.cu, reduce.cu)
//! against their CPU paths. Every test is `#[ignore]`d: no CPU machine can run them.
//! tools/gpu-check builds this binary and runs it on a GPU machine with `--ignored`.
//!
//! Inputs are fresh random values (never zeros) from a seed drawn per run and printed, so a
//! failure can be replayed with RLHF_GPU_SEED. Tolerances follow the device README's METHOD.md:
//! relative error ‖out − ref‖ / ‖ref‖ under 1e-4 for f32 attention (the GPU's exp2f and the
//! CPU's polynomial exp differ, and the sums run in another order), 1e-2 for bf16 operands
//! (2e-2 for gradients, which pass through more bf16 roundings: O, dO and the stored dQ/dK/dV);
//! NaN never passes. bf16 is checked against the CPU's f32 op on the same bf16-rounded inputs.
//! AdamW is held to the CPU bit for bit on hosts whose CPU path is SIMD (kernels/adamw.cu's
//! header says why).
#![cfg(feature = "cuda")]

use rlhf_tensor::cpu::{isa, Isa};
use rlhf_tensor::optim::{clip_grad_norm, AdamW, AdamWConfig};
use rlhf_tensor::{AttentionDropout, DType, Device, Error, Parameter, Rng, Tensor};

mod gpu_common;
use gpu_common::*;

/// The host elements of a tensor as raw f32 bits (bitwise comparisons).
fn bits(t: &Tensor) -> Vec<u64> {
    t.to_f64_vec().iter().map(|x| x.to_bits()).collect()
}

// ---- attention helpers --------------------------------------------------------------------------

const HEAD_DIMS: [usize; 3] = [32, 64, 128];

/// How a GPU operand [B, H, T, D] is laid out.
#[derive(Clone, Copy, Debug)]
enum Lay {
    /// Contiguous [B, H, T, D].
    Contiguous,
    /// Heads split out of a [B, T, H, D] buffer (a permuted view: no copy in either direction).
    HeadsSplit,
    /// Rows 3..3+T of a [B, H, T + 5, D] buffer (a KV cache's view; the backward copies it).
    Narrowed,
    /// A transposed [B, H, D, T] buffer: the head dim is not contiguous (copied first).
    HeadDimStrided,
}

const LAYS: [Lay; 4] = [
    Lay::Contiguous,
    Lay::HeadsSplit,
    Lay::Narrowed,
    Lay::HeadDimStrided,
];

/// (CPU f32 [B, H, T, D] contiguous reference, GPU view of `dtype` laid out as `lay`) with the
/// same values.
fn operand(rng: &mut Rng, s: [usize; 4], lay: Lay, dtype: DType) -> (Tensor, Tensor) {
    let [b, h, t, d] = s;
    let mut view = |buf: &[usize], f: &dyn Fn(&Tensor) -> Tensor| {
        let x = rand(rng, buf, -1.5, 1.5, DType::F32);
        let (c, g) = pair(&x, dtype);
        (f(&c).contiguous().unwrap(), f(&g))
    };
    match lay {
        Lay::Contiguous => view(&[b, h, t, d], &|x| x.clone()),
        Lay::HeadsSplit => view(&[b, t, h, d], &|x| x.permute(&[0, 2, 1, 3]).unwrap()),
        Lay::Narrowed => view(&[b, h, t + 5, d], &|x| x.narrow(2, 3, t).unwrap()),
        Lay::HeadDimStrided => view(&[b, h, d, t], &|x| x.transpose(2, 3).unwrap()),
    }
}

/// causal_attention_dropout's output (`drop`: None for plain attention) and the gradients of
/// q, k, v for output gradient `g`.
fn attention_grads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    drop: Option<AttentionDropout>,
) -> (Tensor, [Tensor; 3]) {
    let ps = [q, k, v].map(|x| Parameter::new(x.clone()));
    let [q, k, v] = [0, 1, 2].map(|i| ps[i].tensor());
    let out = Tensor::causal_attention_dropout(&q, &k, &v, drop).unwrap();
    out.backward_with(g.clone()).unwrap();
    (out, ps.map(|p| p.grad().expect("a gradient")))
}

/// causal_self_attention_dropout's output (`drop`: None for plain attention) and d(qkv).
fn self_attention_grads(
    qkv: &Tensor,
    n_head: usize,
    g: &Tensor,
    drop: Option<AttentionDropout>,
) -> (Tensor, Tensor) {
    let p = Parameter::new(qkv.clone());
    let out = Tensor::causal_self_attention_dropout(&p.tensor(), n_head, drop).unwrap();
    out.backward_with(g.clone()).unwrap();
    (out, p.grad().expect("a gradient"))
}

/// Checks GPU attention on q, k, v (any layouts) against the CPU on their reference values.
fn check_attention(what: &str, cpu: [&Tensor; 3], gpu: [&Tensor; 3], rng: &mut Rng) {
    let dtype = gpu[0].dtype();
    let oshape = cpu[0].shape().to_vec();
    let (gc, gg) = pair(&rand(rng, &oshape, -1.0, 1.0, DType::F32), dtype);
    let (oc, dc) = attention_grads(cpu[0], cpu[1], cpu[2], &gc, None);
    let (og, dg) = attention_grads(gpu[0], gpu[1], gpu[2], &gg, None);
    assert_eq!(og.device(), GPU);
    assert_eq!(og.dtype(), dtype);
    check(&format!("{what}: out"), &og, &oc, tol(dtype, 1e-4));
    // With a single key every probability is 1 and dS = P·(dP − δ) is exactly zero (δ = dP):
    // dq and dk are zero, and both sides hold only rounding noise, which a relative error
    // cannot judge; they are held to zero instead (a wrong gradient is of order one).
    let one_key = cpu[1].shape()[cpu[1].rank() - 2] == 1;
    for (name, (got, want)) in ["dq", "dk", "dv"].iter().zip(dg.iter().zip(&dc)) {
        assert_eq!(got.shape(), want.shape(), "{what}: {name} shape");
        assert_eq!(got.device(), GPU, "{what}: {name} device");
        if one_key && *name != "dv" {
            let g = got.to_device(Device::Cpu).unwrap().to_f64_vec();
            let worst = g.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            assert!(
                worst < 1e-4,
                "{what}: {name} should be zero with one key, has {worst:e}"
            );
            continue;
        }
        check(
            &format!("{what}: {name}"),
            got,
            want,
            2.0 * tol(dtype, 1e-4),
        );
    }
}

// ---- attention ----------------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_causal_attention_forward_and_backward_match_the_cpu() {
    let mut rng = Rng::new(seed("attention"));
    for trial in 0..24 {
        let dtype = if trial % 2 == 0 {
            DType::F32
        } else {
            DType::BF16
        };
        let d = HEAD_DIMS[(trial / 2) % 3];
        let (b, h) = (1 + rng.below(2) as usize, 1 + rng.below(3) as usize);
        // Up to several key tiles (64 or 32 rows), and ragged tails.
        let tk = 1 + rng.below(if trial % 3 == 0 { 700 } else { 200 }) as usize;
        let tq = match rng.below(3) {
            0 => tk,
            1 => 1, // one decoding step against a KV cache
            _ => 1 + rng.below(tk as u64) as usize,
        };
        let lay = |rng: &mut Rng| LAYS[rng.below(4) as usize];
        let (lq, lk, lv) = (lay(&mut rng), lay(&mut rng), lay(&mut rng));
        let (qc, qg) = operand(&mut rng, [b, h, tq, d], lq, dtype);
        let (kc, kg) = operand(&mut rng, [b, h, tk, d], lk, dtype);
        let (vc, vg) = operand(&mut rng, [b, h, tk, d], lv, dtype);
        check_attention(
            &format!("{dtype} B{b} H{h} Tq{tq} Tk{tk} D{d} q {lq:?} k {lk:?} v {lv:?}"),
            [&qc, &kc, &vc],
            [&qg, &kg, &vg],
            &mut rng,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_attention_leading_dims_of_any_rank() {
    // [T, D] (no batch), [N, T, D] and [2, 3, 2, T, D] (three leading dims, grouped into the
    // kernels' batch and head dims), plus a strided rank-5 view that cannot be grouped.
    let mut rng = Rng::new(seed("attention_ranks"));
    for (shape, dtype) in [
        (vec![37usize, 64], DType::F32),
        (vec![5, 90, 32], DType::BF16),
        (vec![2, 3, 2, 70, 64], DType::F32),
        (vec![2, 3, 2, 70, 128], DType::BF16),
    ] {
        let xs: Vec<(Tensor, Tensor)> = (0..3)
            .map(|_| pair(&rand(&mut rng, &shape, -1.5, 1.5, DType::F32), dtype))
            .collect();
        check_attention(
            &format!("{dtype} {shape:?}"),
            [&xs[0].0, &xs[1].0, &xs[2].0],
            [&xs[0].1, &xs[1].1, &xs[2].1],
            &mut rng,
        );
    }
    // [2, 3, 2, T, D] read out of a [3, 2, 2, T, D] buffer: dims 0 and 1 swapped.
    let (t, d) = (50, 64);
    let xs: Vec<(Tensor, Tensor)> = (0..3)
        .map(|_| {
            let x = rand(&mut rng, &[3, 2, 2, t, d], -1.5, 1.5, DType::F32);
            let (c, g) = pair(&x, DType::F32);
            (
                c.transpose(0, 1).unwrap().contiguous().unwrap(),
                g.transpose(0, 1).unwrap(),
            )
        })
        .collect();
    check_attention(
        "swapped leading dims",
        [&xs[0].0, &xs[1].0, &xs[2].0],
        [&xs[0].1, &xs[1].1, &xs[2].1],
        &mut rng,
    );
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_packed_self_attention_matches_the_cpu() {
    let mut rng = Rng::new(seed("self_attention"));
    for trial in 0..12 {
        let dtype = if trial % 2 == 0 {
            DType::F32
        } else {
            DType::BF16
        };
        let dh = HEAD_DIMS[(trial / 2) % 3];
        let (b, h) = (1 + rng.below(3) as usize, 1 + rng.below(4) as usize);
        let t = 1 + rng.below(300) as usize;
        let c = h * dh;
        let (xc, xg) = pair(
            &rand(&mut rng, &[b, t, 3 * c], -1.5, 1.5, DType::F32),
            dtype,
        );
        let (gc, gg) = pair(&rand(&mut rng, &[b, t, c], -1.0, 1.0, DType::F32), dtype);
        let what = format!("{dtype} B{b} T{t} H{h} Dh{dh}");
        let (oc, dc) = self_attention_grads(&xc, h, &gc, None);
        let (og, dg) = self_attention_grads(&xg, h, &gg, None);
        assert_eq!((og.device(), dg.device()), (GPU, GPU));
        assert_eq!(dg.shape(), &[b, t, 3 * c]);
        check(&format!("{what}: out"), &og, &oc, tol(dtype, 1e-4));
        check(&format!("{what}: d(qkv)"), &dg, &dc, 2.0 * tol(dtype, 1e-4));
        // The packed op is the split-view op: the same forward on the GPU's own split views.
        let split = xg
            .reshape_to(&[b, t, 3, h, dh])
            .unwrap()
            .permute(&[2, 0, 3, 1, 4])
            .unwrap();
        let part = |i| split.narrow(0, i, 1).unwrap().squeeze(0).unwrap();
        let o = Tensor::causal_attention(&part(0), &part(1), &part(2))
            .unwrap()
            .permute(&[0, 2, 1, 3])
            .unwrap()
            .reshape_to(&[b, t, c])
            .unwrap();
        check(&format!("{what}: split views"), &og, &o, 1e-6);
    }
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_mma_forward_matches_the_simt_forward() {
    // bf16 with D 64 or 128: contiguous operands take the tensor-core forward; the same values
    // read through a time stride of D + 1 (not a multiple of 8) take the SIMT forward. Both are
    // held to the CPU, and to each other; they must differ in some bits (the mma kernel rounds
    // P to bf16 for P·V), which shows two different kernels ran.
    let mut rng = Rng::new(seed("mma_vs_simt"));
    for (d, tq, tk) in [(64usize, 256usize, 256usize), (128, 200, 333), (64, 1, 517)] {
        let (b, h) = (2, 3);
        let mut aligned = Vec::new();
        let mut unaligned = Vec::new();
        let mut cpu = Vec::new();
        for t in [tq, tk, tk] {
            let x = rand(&mut rng, &[b, h, t, d + 1], -1.5, 1.5, DType::F32);
            let (c, g) = pair(&x, DType::BF16);
            cpu.push(c.narrow(3, 0, d).unwrap().contiguous().unwrap());
            unaligned.push(g.narrow(3, 0, d).unwrap());
            aligned.push(g.narrow(3, 0, d).unwrap().contiguous().unwrap());
        }
        let run = |xs: &[Tensor]| Tensor::causal_attention(&xs[0], &xs[1], &xs[2]).unwrap();
        let (mma, simt) = (run(&aligned), run(&unaligned));
        let want = Tensor::causal_attention(&cpu[0], &cpu[1], &cpu[2]).unwrap();
        let what = format!("D{d} Tq{tq} Tk{tk}");
        check(&format!("{what}: mma vs cpu"), &mma, &want, 1e-2);
        check(&format!("{what}: simt vs cpu"), &simt, &want, 1e-2);
        check(&format!("{what}: mma vs simt"), &mma, &simt, 1e-2);
        assert_ne!(bits(&mma), bits(&simt), "{what}: the same bits twice");
        // The backward from the mma forward's lse.
        check_attention(
            &format!("{what} mma backward"),
            [&cpu[0], &cpu[1], &cpu[2]],
            [&aligned[0], &aligned[1], &aligned[2]],
            &mut rng,
        );
    }
}

/// `x` (host, bf16-rounded values) on the GPU as bf16 twice: a fresh aligned copy, and a view
/// starting one element (2 bytes) into a buffer, which no tensor-core kernel may take (the
/// host then picks the SIMT kernels). Same values, so the two runs differ only in kernels.
fn aligned_and_misaligned(x: &Tensor) -> (Tensor, Tensor) {
    let n = x.numel();
    let aligned = x.to_dtype(DType::BF16).unwrap().to_device(GPU).unwrap();
    let mut vals = vec![0.0f32];
    vals.extend(x.to_f64_vec().iter().map(|&v| v as f32));
    let misaligned = Tensor::from_vec(vals, &[n + 1])
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
        .to_device(GPU)
        .unwrap()
        .narrow(0, 1, n)
        .unwrap()
        .reshape_to(x.shape())
        .unwrap();
    (aligned, misaligned)
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_attention_mma_backward_matches_the_simt_backward() {
    // bf16 with D 64 or 128 and aligned operands: the tensor-core dK/dV and dQ kernels. The
    // same forward (bitwise the same output and lse) run backward twice: from an aligned output
    // gradient (tensor-core backward), and from the same values 2 bytes into a buffer (dO fails
    // the alignment rule, so the SIMT backward). Both are held to the CPU and to each other,
    // and must differ in some bits (the tensor-core kernels round P and dS to bf16), which
    // shows that two different backward kernels ran. Tq < Tk, ragged tiles (T not a multiple
    // of 16, 32 or 64), several batch elements and heads, heads split out of [B, T, H, D].
    let mut rng = Rng::new(seed("mma_backward"));
    for (d, b, h, tq, tk) in [
        (64usize, 2usize, 3usize, 100usize, 165usize),
        (128, 2, 2, 77, 77),
        (64, 1, 2, 1, 130),
        (128, 3, 1, 45, 200),
    ] {
        let what = format!("D{d} B{b} H{h} Tq{tq} Tk{tk}");
        let (qc, qg) = operand(&mut rng, [b, h, tq, d], Lay::HeadsSplit, DType::BF16);
        let (kc, kg) = operand(&mut rng, [b, h, tk, d], Lay::Contiguous, DType::BF16);
        let (vc, vg) = operand(&mut rng, [b, h, tk, d], Lay::HeadsSplit, DType::BF16);
        let gc = rand(&mut rng, &[b, h, tq, d], -1.0, 1.0, DType::BF16).to_dtype(DType::F32);
        let gc = gc.unwrap();
        let (g_mma, g_simt) = aligned_and_misaligned(&gc);
        let (oc, want) = attention_grads(&qc, &kc, &vc, &gc, None);
        let (o1, mma) = attention_grads(&qg, &kg, &vg, &g_mma, None);
        let (o2, simt) = attention_grads(&qg, &kg, &vg, &g_simt, None);
        assert_eq!(bits(&o1), bits(&o2), "{what}: the forward is the same");
        check(&format!("{what}: out"), &o1, &oc, 1e-2);
        let mut differ = false;
        for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
            check(
                &format!("{what}: mma {name} vs cpu"),
                &mma[i],
                &want[i],
                2e-2,
            );
            check(
                &format!("{what}: simt {name} vs cpu"),
                &simt[i],
                &want[i],
                2e-2,
            );
            check(
                &format!("{what}: mma {name} vs simt"),
                &mma[i],
                &simt[i],
                2e-2,
            );
            differ |= bits(&mma[i]) != bits(&simt[i]);
        }
        assert!(
            differ,
            "{what}: the same gradient bits from both backward kernels"
        );
    }
    // The packed op: Q, K, V read out of [B, T, 3·H·D], d(qkv) written into one buffer through
    // the same strides (time stride 3·H·D, offsets H·D and 2·H·D: all aligned).
    for (b, t, h, dh) in [(2usize, 150usize, 2usize, 64usize), (1, 70, 3, 128)] {
        let what = format!("packed B{b} T{t} H{h} Dh{dh}");
        let c = h * dh;
        let (xc, xg) = pair(
            &rand(&mut rng, &[b, t, 3 * c], -1.5, 1.5, DType::F32),
            DType::BF16,
        );
        let gc = rand(&mut rng, &[b, t, c], -1.0, 1.0, DType::BF16).to_dtype(DType::F32);
        let gc = gc.unwrap();
        let (g_mma, g_simt) = aligned_and_misaligned(&gc);
        let (oc, want) = self_attention_grads(&xc, h, &gc, None);
        let (o1, mma) = self_attention_grads(&xg, h, &g_mma, None);
        let (o2, simt) = self_attention_grads(&xg, h, &g_simt, None);
        assert_eq!(bits(&o1), bits(&o2), "{what}: the forward is the same");
        check(&format!("{what}: out"), &o1, &oc, 1e-2);
        check(&format!("{what}: mma d(qkv) vs cpu"), &mma, &want, 2e-2);
        check(&format!("{what}: simt d(qkv) vs cpu"), &simt, &want, 2e-2);
        check(&format!("{what}: mma vs simt"), &mma, &simt, 2e-2);
        assert_ne!(bits(&mma), bits(&simt), "{what}: the same bits twice");
    }
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_attention_head_dims_without_a_kernel() {
    // Zero-padded to the next instantiated head dim (16 → 32, 48 → 64, 100 → 128).
    let mut rng = Rng::new(seed("head_dims"));
    for (d, dtype) in [(16usize, DType::F32), (48, DType::BF16), (100, DType::F32)] {
        let (qc, qg) = operand(&mut rng, [2, 2, 40, d], Lay::Contiguous, dtype);
        let (kc, kg) = operand(&mut rng, [2, 2, 90, d], Lay::HeadsSplit, dtype);
        let (vc, vg) = operand(&mut rng, [2, 2, 90, d], Lay::Contiguous, dtype);
        check_attention(
            &format!("{dtype} D{d}"),
            [&qc, &kc, &vc],
            [&qg, &kg, &vg],
            &mut rng,
        );
        let (b, t, h) = (2, 33, 3);
        let (xc, xg) = pair(
            &rand(&mut rng, &[b, t, 3 * h * d], -1.5, 1.5, DType::F32),
            dtype,
        );
        let (gc, gg) = pair(
            &rand(&mut rng, &[b, t, h * d], -1.0, 1.0, DType::F32),
            dtype,
        );
        let (oc, dc) = self_attention_grads(&xc, h, &gc, None);
        let (og, dg) = self_attention_grads(&xg, h, &gg, None);
        check(
            &format!("packed {dtype} Dh{d}: out"),
            &og,
            &oc,
            tol(dtype, 1e-4),
        );
        check(
            &format!("packed {dtype} Dh{d}: d(qkv)"),
            &dg,
            &dc,
            2.0 * tol(dtype, 1e-4),
        );
    }
    // Over 128: a clear error, no launch.
    let x = Tensor::randn(&[1, 1, 8, 160], 0.0, 1.0, 3)
        .to_device(GPU)
        .unwrap();
    let e = Tensor::causal_attention(&x, &x, &x).unwrap_err();
    assert!(matches!(e, Error::Cuda { .. }), "{e}");
    assert!(e.to_string().contains("head dim 160"), "{e}");
    let qkv = Tensor::randn(&[1, 8, 3 * 2 * 136], 0.0, 1.0, 4)
        .to_device(GPU)
        .unwrap();
    let e = Tensor::causal_self_attention(&qkv, 2).unwrap_err();
    assert!(e.to_string().contains("head dim 136"), "{e}");
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_attention_is_deterministic_and_handles_empty_inputs() {
    let mut rng = Rng::new(seed("attention_det"));
    for dtype in [DType::F32, DType::BF16] {
        let (_, q) = operand(&mut rng, [2, 3, 150, 64], Lay::HeadsSplit, dtype);
        let (_, k) = operand(&mut rng, [2, 3, 190, 64], Lay::Contiguous, dtype);
        let (_, v) = operand(&mut rng, [2, 3, 190, 64], Lay::Narrowed, dtype);
        let (_, g) = pair(
            &rand(&mut rng, &[2, 3, 150, 64], -1.0, 1.0, DType::F32),
            dtype,
        );
        let (o1, d1) = attention_grads(&q, &k, &v, &g, None);
        let (o2, d2) = attention_grads(&q, &k, &v, &g, None);
        assert_eq!(bits(&o1), bits(&o2), "{dtype}: forward");
        for (a, b) in d1.iter().zip(&d2) {
            assert_eq!(bits(a), bits(b), "{dtype}: backward");
        }
    }
    // No queries: an empty output on the GPU, zero gradients there too. (Empty GPU tensors
    // are taken as zero-row views: an upload of nothing would be a zero-byte allocation.)
    let k = Tensor::randn(&[1, 2, 5, 32], 0.0, 1.0, 1)
        .to_device(GPU)
        .unwrap();
    let q = k.narrow(2, 0, 0).unwrap();
    let (o, d) = attention_grads(&q, &k, &k, &q, None);
    assert_eq!((o.shape(), o.device()), (&[1usize, 2, 0, 32][..], GPU));
    assert_eq!(
        (d[1].shape(), d[1].device()),
        (&[1usize, 2, 5, 32][..], GPU)
    );
    assert!(d[1].to_f64_vec().iter().all(|&x| x == 0.0));
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_attention_errors() {
    let x = Tensor::randn(&[1, 2, 8, 32], 0.0, 1.0, 5);
    let g = x.to_device(GPU).unwrap();
    let gb = g.to_dtype(DType::BF16).unwrap();
    for e in [
        Tensor::causal_attention(&g, &x, &g).unwrap_err(),
        Tensor::causal_attention(&x, &x, &g).unwrap_err(),
    ] {
        assert!(matches!(e, Error::Cuda { .. }), "{e}");
        assert!(e.to_string().contains("move them to one device"), "{e}");
    }
    let e = Tensor::causal_attention(&g, &gb, &g).unwrap_err();
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
    // More queries than keys, as on the CPU.
    let long = Tensor::randn(&[1, 2, 9, 32], 0.0, 1.0, 6)
        .to_device(GPU)
        .unwrap();
    assert!(Tensor::causal_attention(&long, &g, &g).is_err());
    // An output gradient of another dtype.
    let p = Parameter::new(g.clone());
    let o = Tensor::causal_attention(&p.tensor(), &g, &g).unwrap();
    let e = o.backward_with(gb.clone()).unwrap_err();
    assert!(matches!(e, Error::DTypeMismatch { .. }), "{e}");
}

// ---- AdamW and gradient clipping -----------------------------------------------------------

/// Whether the CPU's AdamW runs the SIMD path that kernels/adamw.cu reproduces bit for bit.
fn cpu_adamw_is_simd() -> bool {
    isa() != Isa::Scalar
}

/// Asserts equal f32 values: bitwise where the CPU path is SIMD, else within a few ulps.
fn same_f32(what: &str, got: &Tensor, want: &Tensor) {
    let (g, w) = (
        got.to_device(Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
        want.to_dtype(DType::F32).unwrap(),
    );
    if cpu_adamw_is_simd() {
        assert_eq!(bits(&g), bits(&w), "{what}: not bitwise equal");
    } else {
        let e = rel_err(&g, &w);
        assert!(e < 1e-6, "{what}: relative error {e:e}");
    }
}

/// Parameters named p0, p1, … for an optimiser.
fn named(ps: &[Parameter]) -> Vec<(String, Parameter)> {
    ps.iter()
        .enumerate()
        .map(|(i, p)| (format!("p{i}"), p.clone()))
        .collect()
}

/// Random parameter shapes: matrices (decayed) and vectors (not).
fn param_shapes(rng: &mut Rng) -> Vec<Vec<usize>> {
    vec![
        vec![1 + rng.below(300) as usize, 1 + rng.below(300) as usize],
        vec![1 + rng.below(5000) as usize],
        vec![3, 1 + rng.below(70) as usize, 64],
        vec![1],
    ]
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_adamw_matches_the_cpu_over_steps() {
    let mut rng = Rng::new(seed("adamw"));
    // (parameter dtype, gradient dtype): f32/f32 (adamw_f32), f32/bf16 (adamw_bf16grad), and
    // bf16/bf16 (f32 master weights on the device, bf16 copy-out).
    for (pdt, gdt) in [
        (DType::F32, DType::F32),
        (DType::F32, DType::BF16),
        (DType::BF16, DType::BF16),
    ] {
        let shapes = param_shapes(&mut rng);
        let init: Vec<Tensor> = shapes
            .iter()
            .map(|s| {
                rand(&mut rng, s, -1.0, 1.0, pdt)
                    .to_dtype(DType::F32)
                    .unwrap()
            })
            .collect();
        // The CPU reference holds f32 values: a bf16 parameter's f32 master weights.
        let cpu: Vec<Parameter> = init.iter().map(|t| Parameter::new(t.clone())).collect();
        let gpu: Vec<Parameter> = init
            .iter()
            .map(|t| Parameter::new(t.to_dtype(pdt).unwrap().to_device(GPU).unwrap()))
            .collect();
        let config = AdamWConfig {
            weight_decay: 0.05,
            ..Default::default()
        };
        let (mut oc, mut og) = (
            AdamW::new(named(&cpu), config),
            AdamW::new(named(&gpu), config),
        );
        for step in 0..5 {
            let lr = 1e-3 * (1.0 + step as f32);
            for (i, (pc, pg)) in cpu.iter().zip(&gpu).enumerate() {
                if step == 2 && i == 1 {
                    // No gradient this step: value and moments stay.
                    pc.set_grad(None);
                    pg.set_grad(None);
                    continue;
                }
                let g = rand(&mut rng, pc.shape().as_slice(), -1.0, 1.0, gdt);
                pc.set_grad(Some(g.to_dtype(DType::F32).unwrap()));
                pg.set_grad(Some(g.to_device(GPU).unwrap()));
            }
            oc.step(lr).unwrap();
            og.step(lr).unwrap();
            for (i, (pc, pg)) in cpu.iter().zip(&gpu).enumerate() {
                let (c, g) = (pc.tensor(), pg.tensor());
                assert_eq!((g.device(), g.dtype()), (GPU, pdt));
                let what = format!("{pdt}/{gdt} grads, step {step}, p{i} {:?}", c.shape());
                // A bf16 parameter is its master weights rounded to bf16.
                same_f32(&what, &g, &c.to_dtype(pdt).unwrap());
            }
        }
        let (sc, sg) = (oc.state().unwrap(), og.state().unwrap());
        assert_eq!(sg.step, 5);
        for ((name, mc, vc), (_, mg, vg)) in sc.moments.iter().zip(&sg.moments) {
            assert_eq!(mg.device(), Device::Cpu, "state() comes back to the host");
            same_f32(&format!("{pdt}/{gdt} {name} m"), mg, mc);
            same_f32(&format!("{pdt}/{gdt} {name} v"), vg, vc);
        }
    }
}

/// `step_clipped` on a GPU (clipping folded into the update kernel, the norm and scale left
/// on the device) against clip_grad_norm then step on the same GPU: the same norm, and the
/// same parameters and moments bit for bit with f32 gradients (the scale multiplies as
/// mul_scalar did); with bf16 gradients the fused path skips mul_scalar's rounding of the
/// scaled gradient to bf16, so there within 1e-2 relative. Clipping active (max 0.5) and not
/// (max ∞). A NaN gradient: the norm is NaN and nothing moves, the step count included.
#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_step_clipped_matches_clip_then_step() {
    let mut rng = Rng::new(seed("step_clipped"));
    for gdt in [DType::F32, DType::BF16] {
        for max in [0.5f32, f32::INFINITY] {
            let shapes = param_shapes(&mut rng);
            let init: Vec<Tensor> = shapes
                .iter()
                .map(|s| {
                    rand(&mut rng, s, -1.0, 1.0, DType::F32)
                        .to_device(GPU)
                        .unwrap()
                })
                .collect();
            let a: Vec<Parameter> = init.iter().map(|t| Parameter::new(t.clone())).collect();
            let b: Vec<Parameter> = init.iter().map(|t| Parameter::new(t.clone())).collect();
            let config = AdamWConfig {
                weight_decay: 0.05,
                ..Default::default()
            };
            let (mut oa, mut ob) = (AdamW::new(named(&a), config), AdamW::new(named(&b), config));
            for step in 0..3 {
                for (pa, pb) in a.iter().zip(&b) {
                    let g = rand(&mut rng, pa.shape().as_slice(), -1.0, 1.0, gdt)
                        .to_device(GPU)
                        .unwrap();
                    pa.set_grad(Some(g.clone()));
                    pb.set_grad(Some(g));
                }
                let want = clip_grad_norm(&a, max).unwrap();
                oa.step(1e-3).unwrap();
                let got = ob.step_clipped(1e-3, max).unwrap();
                let what = format!("{gdt} grads, max {max}, step {step}");
                assert_eq!(got, want, "{what}: norm");
                for (i, (pa, pb)) in a.iter().zip(&b).enumerate() {
                    let host = |p: &Parameter| p.tensor().to_device(Device::Cpu).unwrap();
                    if gdt == DType::F32 {
                        assert_eq!(bits(&host(pb)), bits(&host(pa)), "{what}: p{i}");
                    } else {
                        let e = rel_err(&host(pb), &host(pa));
                        assert!(e < 1e-2, "{what}: p{i} relative error {e:e}");
                    }
                }
            }
            if gdt == DType::F32 {
                let (sa, sb) = (oa.state().unwrap(), ob.state().unwrap());
                for ((name, ma, va), (_, mb, vb)) in sa.moments.iter().zip(&sb.moments) {
                    assert_eq!(bits(mb), bits(ma), "{name} m, max {max}");
                    assert_eq!(bits(vb), bits(va), "{name} v, max {max}");
                }
            }
            // A NaN gradient: no step.
            let before: Vec<Vec<u64>> = b
                .iter()
                .map(|p| bits(&p.tensor().to_device(Device::Cpu).unwrap()))
                .collect();
            let st = ob.state().unwrap();
            for p in &b {
                let mut g = vec![0.25f32; p.tensor().numel()];
                g[0] = f32::NAN;
                let g = Tensor::from_vec(g, p.shape().as_slice()).unwrap();
                p.set_grad(Some(g.to_dtype(gdt).unwrap().to_device(GPU).unwrap()));
            }
            assert!(ob.step_clipped(1e-3, max).unwrap().is_nan());
            assert_eq!(ob.steps(), 3);
            let after: Vec<Vec<u64>> = b
                .iter()
                .map(|p| bits(&p.tensor().to_device(Device::Cpu).unwrap()))
                .collect();
            assert_eq!(
                before, after,
                "{gdt} max {max}: a NaN norm moved a parameter"
            );
            let st2 = ob.state().unwrap();
            for ((name, m1, v1), (_, m2, v2)) in st.moments.iter().zip(&st2.moments) {
                assert_eq!(bits(m2), bits(m1), "{name} m after a NaN norm");
                assert_eq!(bits(v2), bits(v1), "{name} v after a NaN norm");
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_adamw_state_round_trip_and_outside_changes() {
    // A GPU optimiser resumed from state() continues exactly as an uninterrupted one, and a
    // bf16 parameter set from outside between steps restarts its master weights from the new
    // value (as the CPU path, which always reads the current value).
    let mut rng = Rng::new(seed("adamw_state"));
    let config = AdamWConfig::default();
    for pdt in [DType::F32, DType::BF16] {
        let shape = [37usize, 53];
        let x0 = rand(&mut rng, &shape, -1.0, 1.0, pdt);
        let grads: Vec<Tensor> = (0..4)
            .map(|_| rand(&mut rng, &shape, -1.0, 1.0, pdt))
            .collect();
        let fresh = |x: &Tensor| Parameter::new(x.to_device(GPU).unwrap());
        let run = |p: &Parameter, opt: &mut AdamW, steps: std::ops::Range<usize>| {
            for s in steps {
                p.set_grad(Some(grads[s].to_device(GPU).unwrap()));
                opt.step(1e-2).unwrap();
            }
        };
        let a = fresh(&x0);
        let mut oa = AdamW::new(vec![("w".into(), a.clone())], config);
        run(&a, &mut oa, 0..4);

        let b = fresh(&x0);
        let mut ob = AdamW::new(vec![("w".into(), b.clone())], config);
        run(&b, &mut ob, 0..2);
        let st = ob.state().unwrap();
        let b2 = Parameter::new(b.tensor().detach());
        let mut ob2 = AdamW::new(vec![("w".into(), b2.clone())], config);
        ob2.load_state(&st).unwrap();
        run(&b2, &mut ob2, 2..4);
        if pdt == DType::F32 {
            assert_eq!(bits(&a.tensor()), bits(&b2.tensor()), "{pdt}: resumed run");
        } else {
            // The bf16 checkpoint holds no f32 master weights: the resumed run restarts them
            // from the bf16 value, so it tracks the uninterrupted run only to bf16 precision.
            check("bf16 resumed run", &b2.tensor(), &a.tensor(), 1e-2);
        }

        // Set from outside: the GPU and the CPU (f32, starting from the same value) agree.
        let c = fresh(&x0);
        let mut oc = AdamW::new(vec![("w".into(), c.clone())], config);
        let r = Parameter::new(x0.to_dtype(DType::F32).unwrap());
        let mut or = AdamW::new(vec![("w".into(), r.clone())], config);
        let reset = rand(&mut rng, &shape, -1.0, 1.0, pdt);
        for (s, g) in grads.iter().enumerate() {
            if s == 2 {
                c.set(&reset.to_device(GPU).unwrap()).unwrap();
                r.set(&reset.to_dtype(DType::F32).unwrap()).unwrap();
            }
            c.set_grad(Some(g.to_device(GPU).unwrap()));
            r.set_grad(Some(g.to_dtype(DType::F32).unwrap()));
            oc.step(1e-2).unwrap();
            or.step(1e-2).unwrap();
        }
        same_f32(
            &format!("{pdt}: set from outside"),
            &c.tensor(),
            &r.tensor().to_dtype(pdt).unwrap(),
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_clip_grad_norm_matches_the_cpu() {
    let mut rng = Rng::new(seed("clip"));
    for gdt in [DType::F32, DType::BF16] {
        // Sizes from one element to several partial-sum blocks per gradient (4096 each).
        let shapes = [vec![1usize], vec![300, 301], vec![2, 70_000], vec![4095]];
        let grads: Vec<Tensor> = shapes
            .iter()
            .map(|s| rand(&mut rng, s, -1.0, 1.0, gdt))
            .collect();
        let params = |dev: Device| -> Vec<Parameter> {
            grads
                .iter()
                .map(|g| {
                    let p = Parameter::new(Tensor::zeros(g.shape()).to_device(dev).unwrap());
                    let g = g.to_dtype(DType::F32).unwrap().to_dtype(gdt).unwrap();
                    p.set_grad(Some(g.to_device(dev).unwrap()));
                    p
                })
                .collect()
        };
        let (pc, pg) = (params(Device::Cpu), params(GPU));
        // bf16 gradients are summed on the CPU as f32 values.
        for p in &pc {
            p.set_grad(Some(p.grad().unwrap().to_dtype(DType::F32).unwrap()));
        }
        let unclipped = clip_grad_norm(&pc, f32::INFINITY).unwrap();
        let max_norm = unclipped / 3.0;
        let nc = clip_grad_norm(&pc, max_norm).unwrap();
        let ng = clip_grad_norm(&pg, max_norm).unwrap();
        assert_eq!(nc, unclipped);
        let e = ((ng - nc) / nc).abs();
        assert!(e < 1e-5, "{gdt}: norm {ng} vs {nc} (relative {e:e})");
        for (i, (a, b)) in pg.iter().zip(&pc).enumerate() {
            let (ga, gb) = (a.grad().unwrap(), b.grad().unwrap());
            assert_eq!((ga.device(), ga.dtype()), (GPU, gdt));
            check(&format!("{gdt} clipped grad {i}"), &ga, &gb, tol(gdt, 1e-5));
        }
        // Gradients split between the CPU and the GPU: one norm over both.
        let mixed = [pc[0].clone(), pg[1].clone(), pc[2].clone(), pg[3].clone()];
        let on_host: Vec<Parameter> = mixed
            .iter()
            .map(|p| {
                let g = p.grad().unwrap();
                let h = Parameter::new(Tensor::zeros(g.shape()));
                h.set_grad(Some(
                    g.to_device(Device::Cpu)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap(),
                ));
                h
            })
            .collect();
        let want = clip_grad_norm(&on_host, f32::INFINITY).unwrap();
        let got = clip_grad_norm(&mixed, f32::INFINITY).unwrap();
        assert!(
            ((got - want) / want).abs() < 1e-5,
            "{gdt} mixed: {got} vs {want}"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_adamw_errors_for_mixed_devices() {
    let config = AdamWConfig::default();
    // A GPU parameter with a CPU gradient, and the reverse: errors before anything changes.
    let w = Parameter::new(Tensor::ones(&[4, 4]).to_device(GPU).unwrap());
    let u = Parameter::new(Tensor::ones(&[3]));
    let mut opt = AdamW::new(
        vec![("w".into(), w.clone()), ("u".into(), u.clone())],
        config,
    );
    w.set_grad(Some(Tensor::ones(&[4, 4]).to_device(GPU).unwrap()));
    u.set_grad(Some(Tensor::ones(&[3]).to_device(GPU).unwrap()));
    let e = opt.step(0.1).unwrap_err();
    assert!(matches!(e, Error::Cuda { .. }), "{e}");
    assert!(e.to_string().contains("parameter u [3] is on cpu"), "{e}");
    assert_eq!(opt.steps(), 0);
    assert!(w.tensor().to_f64_vec().iter().all(|&x| x == 1.0));
    u.set_grad(None);
    w.set_grad(Some(Tensor::ones(&[4, 4])));
    let e = opt.step(0.1).unwrap_err();
    assert!(
        e.to_string().contains("parameter w [4, 4] is on cuda:0"),
        "{e}"
    );
    // A gradient of the wrong shape never reaches the kernel.
    w.set_grad(Some(Tensor::ones(&[5]).to_device(GPU).unwrap()));
    assert!(matches!(
        opt.step(0.1).unwrap_err(),
        Error::ShapeMismatch { .. }
    ));
    assert_eq!(opt.steps(), 0);
    // Moving a parameter between devices moves its moments with it.
    w.set_grad(Some(Tensor::ones(&[4, 4]).to_device(GPU).unwrap()));
    opt.step(0.1).unwrap();
    w.set(&w.tensor().to_device(Device::Cpu).unwrap()).unwrap();
    w.set_grad(Some(Tensor::ones(&[4, 4])));
    opt.step(0.1).unwrap();
    let st = opt.state().unwrap();
    assert!(st.moments[0].1.to_f64_vec().iter().all(|&m| m > 0.0));
}

// ---- attention dropout --------------------------------------------------------------------------

/// The largest elementwise difference relative to the largest magnitude of `want` under `tol`:
/// unlike the norm in `check`, one wrong element among many cannot hide in it.
fn check_elements(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let host = |t: &Tensor| t.to_device(Device::Cpu).unwrap().to_f64_vec();
    let (g, w) = (host(got), host(want));
    assert_eq!(g.len(), w.len(), "{what}: lengths");
    let scale = w.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
    let (i, e) = g
        .iter()
        .zip(&w)
        .map(|(a, b)| {
            if a.is_nan() {
                f64::INFINITY
            } else {
                (a - b).abs() / scale
            }
        })
        .enumerate()
        .fold(
            (0, 0.0),
            |best, (i, e)| if e > best.1 { (i, e) } else { best },
        );
    assert!(
        e < tol,
        "{what}: element {i} is {} against {} ({e:e} of the largest |value|, tolerance {tol:e})",
        g[i],
        w[i]
    );
}

#[test]
#[ignore = "needs a CUDA GPU (tools/gpu-check)"]
fn cuda_attention_dropout_matches_the_cpu() {
    // The dropped elements are a hash of (seed, head, query row, key), evaluated by every
    // kernel: the GPU must drop exactly the CPU's elements, forward and backward, which an
    // elementwise comparison shows (a wrongly dropped or kept element moves its output row by
    // about P_ij·|v_j|, beyond the bf16 tolerance). Contiguous bf16 operands with D 64/128
    // take the tensor-core kernels, the time-strided views (stride D + 1) the SIMT ones, f32
    // always the SIMT ones; some cases have fewer queries than keys (the hash takes the
    // query's row, not its position).
    let mut rng = Rng::new(seed("attention_dropout"));
    let mut trial = 0;
    for dtype in [DType::F32, DType::BF16] {
        for d in HEAD_DIMS {
            for strided in [false, true] {
                trial += 1;
                let (b, h) = (1 + rng.below(2) as usize, 1 + rng.below(3) as usize);
                // At least two keys: with one, dS = P·(Z·dP − δ) is exactly zero (δ = Z·dP),
                // and dq, dk are rounding noise that no relative tolerance can judge.
                let t = 2 + rng.below(149) as usize;
                let tq = if trial % 3 == 0 {
                    1 + rng.below(t as u64) as usize
                } else {
                    t
                };
                let p = [0.1f32, 0.5][trial % 2];
                let drop = AttentionDropout::new(p, rng.next_u64()).ok();
                let mut cpu = Vec::new();
                let mut gpu = Vec::new();
                for rows in [tq, t, t] {
                    let x = rand(&mut rng, &[b, h, rows, d + 1], -1.5, 1.5, DType::F32);
                    let (c, g) = pair(&x, dtype);
                    cpu.push(c.narrow(3, 0, d).unwrap().contiguous().unwrap());
                    let g = g.narrow(3, 0, d).unwrap();
                    gpu.push(if strided { g } else { g.contiguous().unwrap() });
                }
                let (gc, gg) = pair(
                    &rand(&mut rng, &[b, h, tq, d], -1.0, 1.0, DType::F32),
                    dtype,
                );
                let what = format!("{dtype} B{b} H{h} Tq{tq} Tk{t} D{d} p{p} strided {strided}");
                let (oc, dc) = attention_grads(&cpu[0], &cpu[1], &cpu[2], &gc, drop);
                let (og, dg) = attention_grads(&gpu[0], &gpu[1], &gpu[2], &gg, drop);
                assert_eq!(og.device(), GPU);
                check(&format!("{what}: out"), &og, &oc, tol(dtype, 1e-4));
                check_elements(&format!("{what}: out"), &og, &oc, 2.0 * tol(dtype, 1e-4));
                for (name, (got, want)) in ["dq", "dk", "dv"].iter().zip(dg.iter().zip(&dc)) {
                    let what = format!("{what}: {name}");
                    check(&what, got, want, 2.0 * tol(dtype, 1e-4));
                    check_elements(&what, got, want, 2.0 * tol(dtype, 1e-4));
                }
                // Dropout was applied: without it the output is another one.
                if tq > 40 {
                    let plain = Tensor::causal_attention(&gpu[0], &gpu[1], &gpu[2]).unwrap();
                    assert!(
                        rel_err(
                            &plain
                                .to_device(Device::Cpu)
                                .unwrap()
                                .to_dtype(DType::F32)
                                .unwrap(),
                            &oc
                        ) > 0.05,
                        "{what}: dropout had no effect"
                    );
                }
            }
        }
    }
    // The packed self-attention (the GPT block's op) drops the same elements as the split one.
    for (dtype, dh) in [(DType::F32, 64usize), (DType::BF16, 64), (DType::BF16, 32)] {
        let (b, t, h) = (2, 1 + rng.below(120) as usize, 3);
        let c = h * dh;
        let drop = AttentionDropout::new(0.3, rng.next_u64()).ok();
        let (xc, xg) = pair(
            &rand(&mut rng, &[b, t, 3 * c], -1.5, 1.5, DType::F32),
            dtype,
        );
        let (gc, gg) = pair(&rand(&mut rng, &[b, t, c], -1.0, 1.0, DType::F32), dtype);
        let (oc, dc) = self_attention_grads(&xc, h, &gc, drop);
        let (og, dg) = self_attention_grads(&xg, h, &gg, drop);
        let what = format!("packed {dtype} B{b} T{t} H{h} Dh{dh}");
        check(&format!("{what}: out"), &og, &oc, tol(dtype, 1e-4));
        check(&format!("{what}: d(qkv)"), &dg, &dc, 2.0 * tol(dtype, 1e-4));
    }
}
