use super::*;
use proptest::prelude::*;

/// SplitMix64: reproducible test data without a `rand` dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [−amp, amp).
    fn vec(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp)
            .collect()
    }
}

/// Random inputs of one attention problem.
#[derive(Clone)]
struct Case {
    shape: AttentionShape,
    scale: f32,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
    drop: Option<AttentionDropout>,
}

impl Case {
    fn new(shape: AttentionShape, seed: u64, amp: f32) -> Case {
        let AttentionShape { bh, tq, tk, d } = shape;
        let mut rng = Rng(seed);
        Case {
            shape,
            scale: 1.0 / (d as f32).sqrt(),
            q: rng.vec(bh * tq * d, amp),
            k: rng.vec(bh * tk * d, amp),
            v: rng.vec(bh * tk * d, 1.0),
            dout: rng.vec(bh * tq * d, 1.0),
            drop: None,
        }
    }

    fn forward_reference(&self) -> (Vec<f32>, Vec<f32>) {
        let s = self.shape;
        let (mut out, mut lse) = (vec![0.0; s.bh * s.tq * s.d], vec![0.0; s.bh * s.tq]);
        causal_attention_forward_reference(
            s, self.scale, self.drop, &self.q, &self.k, &self.v, &mut out, &mut lse,
        )
        .unwrap();
        (out, lse)
    }

    fn forward(&self, isa: Isa) -> (Vec<f32>, Vec<f32>) {
        let s = self.shape;
        // NaN-filled outputs: a kernel that skips an element cannot pass.
        let (mut out, mut lse) = (
            vec![f32::NAN; s.bh * s.tq * s.d],
            vec![f32::NAN; s.bh * s.tq],
        );
        causal_attention_forward_with(
            isa, s, self.scale, self.drop, &self.q, &self.k, &self.v, &mut out, &mut lse,
        )
        .unwrap();
        (out, lse)
    }

    /// (dq, dk, dv) from the reference backward, given the forward's `out` and `lse`.
    fn backward_reference(&self, out: &[f32], lse: &[f32]) -> [Vec<f32>; 3] {
        let s = self.shape;
        let mut g = [
            vec![0.0; self.q.len()],
            vec![0.0; self.k.len()],
            vec![0.0; self.v.len()],
        ];
        let [dq, dk, dv] = &mut g;
        causal_attention_backward_reference(
            s, self.scale, self.drop, &self.q, &self.k, &self.v, out, lse, &self.dout, dq, dk, dv,
        )
        .unwrap();
        g
    }

    fn backward(&self, isa: Isa, out: &[f32], lse: &[f32]) -> [Vec<f32>; 3] {
        let s = self.shape;
        let mut g = [
            vec![f32::NAN; self.q.len()],
            vec![f32::NAN; self.k.len()],
            vec![f32::NAN; self.v.len()],
        ];
        let [dq, dk, dv] = &mut g;
        causal_attention_backward_with(
            isa, s, self.scale, self.drop, &self.q, &self.k, &self.v, out, lse, &self.dout, dq, dk,
            dv,
        )
        .unwrap();
        g
    }
}

/// |a − b| ≤ tol · (1 + |b|) elementwise, with a message naming the first bad element.
fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: got {x}, expected {y} (tol {tol})"
        );
    }
}

/// Fused (every available instruction set) against the reference, forward and backward.
fn check_against_reference(case: &Case) {
    let (out_ref, lse_ref) = case.forward_reference();
    let grads_ref = case.backward_reference(&out_ref, &lse_ref);
    for isa in Isa::available() {
        let what = format!("{isa:?} {:?}", case.shape);
        let (out, lse) = case.forward(isa);
        assert_close(&format!("{what} out"), &out, &out_ref, 1e-5);
        assert_close(&format!("{what} lse"), &lse, &lse_ref, 1e-5);
        // The backward from the reference forward's out/lse, so only the backward is compared.
        let grads = case.backward(isa, &out_ref, &lse_ref);
        for ((name, g), r) in ["dq", "dk", "dv"].iter().zip(&grads).zip(&grads_ref) {
            assert_close(&format!("{what} {name}"), g, r, 5e-5);
        }
    }
}

fn shape(bh: usize, tq: usize, tk: usize, d: usize) -> AttentionShape {
    AttentionShape { bh, tq, tk, d }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn fused_matches_reference(
        (bh, tk, tq) in (1usize..=4, 1usize..=80).prop_flat_map(|(bh, tk)| (Just(bh), Just(tk), 1..=tk)),
        d in 1usize..=70,
        seed in any::<u64>(),
        amp in prop_oneof![Just(0.5f32), Just(4.0f32)],
    ) {
        check_against_reference(&Case::new(shape(bh, tq, tk, d), seed, amp));
    }

    #[test]
    fn fused_matches_reference_with_dropout(
        (bh, tk, tq) in (1usize..=3, 1usize..=80).prop_flat_map(|(bh, tk)| (Just(bh), Just(tk), 1..=tk)),
        d in 1usize..=40,
        seed in any::<u64>(),
        p in prop_oneof![Just(0.1f32), Just(0.5f32), Just(0.9f32)],
    ) {
        let mut case = Case::new(shape(bh, tq, tk, d), seed, 2.0);
        case.drop = Some(AttentionDropout::new(p, seed ^ 0x5eed).unwrap());
        check_against_reference(&case);
    }
}

#[test]
fn fused_matches_reference_on_multi_tile_shapes() {
    for (i, s) in [
        shape(2, 200, 200, 64), // several query and key tiles, partial last tile
        shape(1, 130, 300, 17), // KV offset with a ragged head dimension
        shape(3, 1, 150, 64),   // one decoding step against a cache
        shape(1, 64, 128, 16),  // tiles aligned with the offset
        shape(33, 70, 70, 8),   // enough heads that the backward keeps each head in one task
        shape(2, 129, 129, 80), // d over one register tile of vectors
    ]
    .into_iter()
    .enumerate()
    {
        check_against_reference(&Case::new(s, 1000 + i as u64, 2.0));
        let mut case = Case::new(s, 2000 + i as u64, 2.0);
        case.drop = Some(AttentionDropout::new(0.2, i as u64).unwrap());
        check_against_reference(&case);
    }
}

/// Dropout changes the output (it is applied, not ignored), a zero-p dropout changes nothing,
/// and the same seed reproduces the same result while another seed does not.
#[test]
fn dropout_is_applied_and_keyed_by_its_seed() {
    let mut case = Case::new(shape(2, 50, 50, 16), 5, 1.0);
    let plain = case.forward(Isa::Scalar);
    let isa = crate::cpu::isa();
    case.drop = Some(AttentionDropout::new(0.0, 3).unwrap());
    assert_eq!(
        case.forward(isa).0,
        Case {
            drop: None,
            ..case.clone()
        }
        .forward(isa)
        .0
    );
    case.drop = Some(AttentionDropout::new(0.3, 3).unwrap());
    let a = case.forward(isa);
    assert_eq!(a, case.forward(isa));
    assert_ne!(a.0, plain.0);
    // The logsumexp is the undropped one.
    assert_close("lse", &a.1, &plain.1, 1e-6);
    case.drop = Some(AttentionDropout::new(0.3, 4).unwrap());
    assert_ne!(a.0, case.forward(isa).0);
}

#[test]
fn large_scores_stay_finite() {
    // Scores of several hundred: only a max-subtracted softmax avoids overflow; later keys with
    // much larger scores exercise the running-max rescale.
    let mut case = Case::new(shape(2, 90, 90, 32), 7, 1.0);
    case.scale = 1.0;
    for (j, x) in case.k.iter_mut().enumerate() {
        *x *= 1.0 + (j / 32 % 90) as f32 / 3.0;
    }
    for x in case.q.iter_mut() {
        *x *= 20.0;
    }
    let (out_ref, lse_ref) = case.forward_reference();
    assert!(out_ref.iter().chain(&lse_ref).all(|x| x.is_finite()));
    for isa in Isa::available() {
        let (out, lse) = case.forward(isa);
        assert_close("out", &out, &out_ref, 1e-4);
        // lse is large here; compare it relative to its size.
        assert_close("lse", &lse, &lse_ref, 1e-5);
    }
}

/// Forward in f64 from the textbook formula, dropout factors applied to the normalised
/// probabilities: the ground truth for the finite differences.
fn forward_f64(
    s: AttentionShape,
    scale: f64,
    drop: Option<AttentionDropout>,
    (q, k, v): (&[f64], &[f64], &[f64]),
) -> Vec<f64> {
    let AttentionShape { bh, tq, tk, d } = s;
    let mut out = vec![0.0; bh * tq * d];
    for b in 0..bh {
        for i in 0..tq {
            let p = tk - tq + i;
            let scores: Vec<f64> = (0..=p)
                .map(|j| {
                    (0..d)
                        .map(|c| q[(b * tq + i) * d + c] * k[(b * tk + j) * d + c])
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
            let l: f64 = e.iter().sum();
            let z = |j: usize| drop.map_or(1.0, |dr| f64::from(dr.factor(b, i, j)));
            for c in 0..d {
                out[(b * tq + i) * d + c] = (0..=p)
                    .map(|j| e[j] / l * z(j) * v[(b * tk + j) * d + c])
                    .sum::<f64>();
            }
        }
    }
    out
}

#[test]
fn reference_backward_matches_finite_differences() {
    let half = AttentionDropout::new(0.5, 11).unwrap();
    for (s, drop) in [
        (shape(2, 3, 5, 3), None),
        (shape(1, 4, 4, 2), None),
        (shape(2, 4, 6, 3), Some(half)),
    ] {
        let mut case = Case::new(s, 42, 1.5);
        case.drop = drop;
        let (out, lse) = case.forward_reference();
        let to64 = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        let (q, k, v, g) = (
            to64(&case.q),
            to64(&case.k),
            to64(&case.v),
            to64(&case.dout),
        );
        let scale = case.scale as f64;
        // The reference forward itself against the f64 formula.
        let out64 = forward_f64(s, scale, drop, (&q, &k, &v));
        assert_close(
            "reference out",
            &out,
            &out64.iter().map(|&x| x as f32).collect::<Vec<_>>(),
            1e-5,
        );
        // L = Σ dout ⊙ out, so ∂L/∂x is what the backward returns for x.
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            forward_f64(s, scale, drop, (q, k, v))
                .iter()
                .zip(&g)
                .map(|(o, g)| o * g)
                .sum()
        };
        let grads = case.backward_reference(&out, &lse);
        let h = 1e-5;
        for (which, analytic) in grads.iter().enumerate() {
            let base = [&q, &k, &v][which];
            for idx in 0..base.len() {
                let mut plus = [q.clone(), k.clone(), v.clone()];
                let mut minus = plus.clone();
                plus[which][idx] += h;
                minus[which][idx] -= h;
                let fd = (loss(&plus[0], &plus[1], &plus[2])
                    - loss(&minus[0], &minus[1], &minus[2]))
                    / (2.0 * h);
                let a = analytic[idx] as f64;
                assert!(
                    (a - fd).abs() <= 1e-4 * (1.0 + fd.abs()),
                    "{s:?} d{}[{idx}]: backward {a}, finite difference {fd}",
                    ["q", "k", "v"][which]
                );
            }
        }
    }
}

#[test]
fn bitwise_identical_for_one_and_two_threads() {
    let run = |threads: usize, case: &Case, isa: Isa| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let (out, lse) = case.forward(isa);
            let grads = case.backward(isa, &out, &lse);
            let mut all = out;
            all.extend(lse);
            for g in grads {
                all.extend(g);
            }
            all.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
        })
    };
    // Few heads (split into key groups), many heads (one task per head), a KV offset.
    for (i, s) in [
        shape(2, 150, 150, 24),
        shape(33, 66, 66, 8),
        shape(3, 70, 200, 64),
    ]
    .into_iter()
    .enumerate()
    {
        let mut case = Case::new(s, 77 + i as u64, 1.0);
        if i == 0 {
            case.drop = Some(AttentionDropout::new(0.25, 9).unwrap());
        }
        for isa in Isa::available() {
            assert_eq!(run(1, &case, isa), run(2, &case, isa), "{isa:?} {s:?}");
        }
    }
}

#[test]
fn vector_exp_matches_std() {
    use super::simd::Simd;
    fn check<S: Simd>() {
        let mut xs: Vec<f32> = (-1000..=400).map(|i| i as f32 * 0.2173).collect();
        xs.extend([
            0.0,
            -0.0,
            -87.0,
            -87.29,
            -87.31,
            -100.0,
            f32::NEG_INFINITY,
            f32::NAN,
        ]);
        xs.resize(xs.len().next_multiple_of(S::W), 0.0);
        for chunk in xs.chunks(S::W) {
            let mut y = vec![0.0; S::W];
            // SAFETY: `check` is only called for available instruction sets; `chunk` and `y`
            // hold W floats each.
            unsafe { S::store(y.as_mut_ptr(), S::exp(S::load(chunk.as_ptr()))) };
            for (&x, &e) in chunk.iter().zip(&y) {
                let want = x.exp();
                if x.is_nan() {
                    assert!(e.is_nan(), "exp(NaN) = {e}");
                } else if x < -87.3 {
                    assert!((0.0..=1.22e-38).contains(&e), "exp({x}) = {e}");
                    assert!(x > f32::NEG_INFINITY || e == 0.0, "exp(-inf) = {e}");
                } else {
                    assert!(
                        (e - want).abs() <= 3e-7 * want,
                        "exp({x}) = {e}, want {want}"
                    );
                }
            }
        }
    }
    check::<super::simd::Scalar>();
    #[cfg(target_arch = "x86_64")]
    {
        if Isa::Avx2.is_available() {
            check::<super::simd::Avx2>();
        }
        if Isa::Avx512.is_available() {
            check::<super::simd::Avx512>();
        }
    }
}

#[test]
fn errors_on_bad_lengths_and_shapes() {
    let s = shape(2, 3, 5, 4);
    let case = Case::new(s, 1, 1.0);
    let (q, k, v) = (&case.q, &case.k, &case.v);
    let (mut out, mut lse) = (vec![0.0; 24], vec![0.0; 6]);
    let fwd =
        |s: AttentionShape, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], lse: &mut [f32]| {
            [
                causal_attention_forward(s, 0.5, None, q, k, v, out, lse).is_err(),
                causal_attention_forward_reference(s, 0.5, None, q, k, v, out, lse).is_err(),
            ]
        };
    assert_eq!(fwd(s, q, k, v, &mut out, &mut lse), [false, false]);
    assert_eq!(fwd(s, &q[1..], k, v, &mut out, &mut lse), [true, true]);
    assert_eq!(fwd(s, q, &k[1..], v, &mut out, &mut lse), [true, true]);
    assert_eq!(fwd(s, q, k, &v[..4], &mut out, &mut lse), [true, true]);
    assert_eq!(fwd(s, q, k, v, &mut out[1..], &mut lse), [true, true]);
    assert_eq!(fwd(s, q, k, v, &mut out, &mut lse[1..]), [true, true]);
    // tq > tk, d == 0, and a count that overflows.
    assert_eq!(
        fwd(shape(2, 5, 3, 4), q, k, v, &mut out, &mut lse),
        [true, true]
    );
    assert_eq!(
        fwd(shape(2, 3, 5, 0), &[], &[], &[], &mut [], &mut lse),
        [true, true]
    );
    assert_eq!(
        fwd(shape(usize::MAX, 2, 2, 2), q, k, v, &mut out, &mut lse),
        [true, true]
    );

    let err =
        causal_attention_forward(s, 0.5, None, q, &k[1..], v, &mut out, &mut lse).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("k has 39 elements") && msg.contains("40"),
        "{msg}"
    );

    causal_attention_forward(s, 0.5, None, q, k, v, &mut out, &mut lse).unwrap();
    let d = &case.dout;
    let (mut dq, mut dk, mut dv) = (vec![0.0; 24], vec![0.0; 40], vec![0.0; 40]);
    let mut bwd = |o: &[f32], l: &[f32], g: &[f32], dq: &mut [f32], dk: &mut [f32]| {
        [
            causal_attention_backward(s, 0.5, None, q, k, v, o, l, g, dq, dk, &mut dv).is_err(),
            causal_attention_backward_reference(s, 0.5, None, q, k, v, o, l, g, dq, dk, &mut dv)
                .is_err(),
        ]
    };
    assert_eq!(bwd(&out, &lse, d, &mut dq, &mut dk), [false, false]);
    assert_eq!(bwd(&out[1..], &lse, d, &mut dq, &mut dk), [true, true]);
    assert_eq!(bwd(&out, &lse[1..], d, &mut dq, &mut dk), [true, true]);
    assert_eq!(bwd(&out, &lse, &d[1..], &mut dq, &mut dk), [true, true]);
    assert_eq!(bwd(&out, &lse, d, &mut dq[1..], &mut dk), [true, true]);
    assert_eq!(bwd(&out, &lse, d, &mut dq, &mut dk[1..]), [true, true]);
}

#[test]
fn empty_problems_are_fine() {
    // No heads, or no query rows: nothing to compute, key gradients are zero.
    let s = shape(2, 0, 3, 4);
    let (k, v) = (vec![1.0; 24], vec![1.0; 24]);
    causal_attention_forward(s, 1.0, None, &[], &k, &v, &mut [], &mut []).unwrap();
    let (mut dk, mut dv) = (vec![f32::NAN; 24], vec![f32::NAN; 24]);
    causal_attention_backward(
        s,
        1.0,
        None,
        &[],
        &k,
        &v,
        &[],
        &[],
        &[],
        &mut [],
        &mut dk,
        &mut dv,
    )
    .unwrap();
    assert!(dk.iter().chain(&dv).all(|&x| x == 0.0));
    causal_attention_forward(
        shape(0, 4, 4, 8),
        1.0,
        None,
        &[],
        &[],
        &[],
        &mut [],
        &mut [],
    )
    .unwrap();
}
