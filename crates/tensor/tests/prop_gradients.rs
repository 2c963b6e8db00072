//! Finite-difference gradient checks, on random shapes and values, for every differentiable op.
//!
//! Each property builds inputs from a proptest-drawn shape and seed, then compares the autograd
//! gradient with central differences through [`check_gradients`] (which projects the output on
//! fixed random weights, so every output element matters). Values are drawn away from kinks on
//! purpose: relu/abs/clamp inputs keep a gap around the kink larger than the step, max has no
//! near-ties, and log/sqrt/powf/div see positive inputs. Tolerances leave room for f32 rounding
//! (about 1e-7 of an output, divided by the step) while a wrong rule gives errors of order one;
//! `gradcheck_catches_a_wrong_rule` shows that the check does fail on a wrong gradient.
//!
//! Set `RLHF_GRADCHECK_LOG=1` (with `--nocapture`) to print every measured error, to recalibrate
//! after a kernel change.

use proptest::prelude::*;
use rlhf_tensor::gradcheck::check_gradients;
use rlhf_tensor::{DType, Result, Rng, Tensor};

/// Finite-difference step. The error of a central difference has two parts: truncation,
/// about h²·f'''/6, and f32 rounding of the outputs, about 6e-8 of their size divided by 2h.
/// Most ops here are linear or gently curved on the drawn inputs, so a large step keeps the
/// rounding part near 1e-5.
const H: f64 = 1e-2;

/// A smaller step for ops with a steep third derivative on their domain (log, sqrt, powf and
/// div near small arguments), where truncation would dominate at `H`.
const H_CURVED: f64 = 3e-3;

/// Largest accepted error relative to 1 + |gradient|. Calibrated on the scalar kernels with
/// 3000 cases per property: the worst error seen was about 2e-4, while a wrong rule gives
/// errors from about 1e-2 (a 1% slip in one gradient) to order 1 (a missing term); see
/// `gradcheck_catches_a_wrong_rule`.
const TOL: f64 = 1e-3;

mod common;
use common::run;

/// `cases` per property (see [`common::config_for`]), regressions saved beside this file.
fn config(cases: u32) -> ProptestConfig {
    common::config_for(file!(), cases)
}

// ------------------------------------------------------------------------------ input helpers

/// Shrinks the largest dims of `s` until it has at most `max_numel` elements.
fn cap_numel(mut s: Vec<usize>, max_numel: usize) -> Vec<usize> {
    while s.iter().product::<usize>() > max_numel {
        let i = (0..s.len()).max_by_key(|&i| s[i]).expect("non-empty");
        s[i] -= 1;
    }
    s
}

/// A shape with rank in `ranks`, dims in `1..=max_dim` and at most `max_numel` elements.
fn shape(
    ranks: std::ops::RangeInclusive<usize>,
    max_dim: usize,
    max_numel: usize,
) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1..=max_dim, ranks).prop_map(move |s| cap_numel(s, max_numel))
}

/// Operand shapes that broadcast to (a shape dividing) `out`: each operand independently
/// turns some dims into 1 and drops some leading dims, so either side may be the smaller.
fn broadcast_pair() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    (
        shape(1..=4, 4, 40),
        prop::collection::vec(any::<bool>(), 4),
        prop::collection::vec(any::<bool>(), 4),
        0usize..=4,
        0usize..=4,
    )
        .prop_map(|(out, ones_a, ones_b, drop_a, drop_b)| {
            let derive = |ones: &[bool], drop: usize| {
                let mut s: Vec<usize> = out
                    .iter()
                    .zip(ones)
                    .map(|(&d, &one)| if one { 1 } else { d })
                    .collect();
                s.drain(..drop.min(s.len()));
                s
            };
            (derive(&ones_a, drop_a), derive(&ones_b, drop_b))
        })
}

fn randn(shape: &[usize], std: f32, seed: u64) -> Tensor {
    Tensor::randn(shape, 0.0, std, seed)
}

fn uniform(shape: &[usize], lo: f32, hi: f32, seed: u64) -> Tensor {
    Tensor::rand_uniform(shape, lo, hi, seed)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.f32_data().expect("f32 test tensor").into_owned()
}

/// Moves every value closer than `gap` to `point` out to `point ± gap` (keeping its side), so
/// that a finite difference with a step below `gap` never straddles the kink at `point`.
/// Values farther away stay put, so kinks more than `2 * gap` apart can be cleared in turn.
fn away_from(t: &Tensor, point: f32, gap: f32) -> Tensor {
    let v = values(t)
        .into_iter()
        .map(|x| {
            if (x - point).abs() >= gap {
                x
            } else if x >= point {
                point + gap
            } else {
                point - gap
            }
        })
        .collect();
    Tensor::from_vec(v, t.shape()).unwrap()
}

/// A random permutation of 0..n.
fn permutation(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, rng.below(i as u64 + 1) as usize);
    }
    p
}

/// Values that pairwise differ by at least `0.8 * spacing` (a shuffled ladder plus small
/// noise, centred on 0): no ties for max, and spread rows for layer_norm.
fn distinct(shape: &[usize], spacing: f32, seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut rng = Rng::new(seed);
    let v = permutation(n, &mut rng)
        .into_iter()
        .map(|p| (p as f32 - n as f32 / 2.0 + 0.2 * rng.next_f32()) * spacing)
        .collect();
    Tensor::from_vec(v, shape).unwrap()
}

/// Integer ids in `0..limit` as i64.
fn ids(shape: &[usize], limit: usize, seed: u64) -> Vec<i64> {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    (0..n).map(|_| rng.below(limit as u64) as i64).collect()
}

/// Runs the gradient check and fails the case when the worst relative error reaches `tol`.
fn check(
    name: &str,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    h: f64,
    tol: f64,
) -> std::result::Result<(), TestCaseError> {
    let shapes: Vec<&[usize]> = inputs.iter().map(|t| t.shape()).collect();
    let err = check_gradients(inputs, f, h)
        .map_err(|e| TestCaseError::fail(format!("{name} on {shapes:?}: {e}")))?;
    if std::env::var_os("RLHF_GRADCHECK_LOG").is_some() {
        eprintln!("gradcheck {name:<28} {err:.3e} {shapes:?}");
    }
    prop_assert!(
        err < tol,
        "{name} on {shapes:?}: worst relative gradient error {err:.3e} (tolerance {tol:.0e})"
    );
    Ok(())
}

// ------------------------------------------------------------------------------ the harness

/// The check must be able to fail: x·stop_grad(x) has derivative 2x but autograd sees x
/// (a halved gradient), and exp(x) with its gradient cut has derivative eˣ but autograd
/// sees 0 (a missing gradient).
#[test]
fn gradcheck_catches_a_wrong_rule() {
    run(
        config(32),
        &(shape(1..=3, 4, 24), any::<u64>()),
        |(s, seed)| {
            let x = uniform(&s, 0.5, 2.0, seed);
            let xs = std::slice::from_ref(&x);
            // Relative error per element: |w·x| / (1 + 2|w·x|), w the projection weight.
            let halved = check_gradients(xs, |t| t[0].mul(&t[0].detach()), H).unwrap();
            prop_assert!(
                halved > 0.05,
                "a halved gradient went unnoticed: {halved:.3e}"
            );
            let missing =
                check_gradients(xs, |t| t[0].exp()?.detach().add(&t[0].mul_scalar(0.0)?), H)
                    .unwrap();
            prop_assert!(
                missing > 0.1,
                "a missing gradient went unnoticed: {missing:.3e}"
            );
            Ok(())
        },
    );
}

// ------------------------------------------------------------------------------ elementwise

#[test]
fn binary_ops_broadcast() {
    run(
        config(64),
        &(broadcast_pair(), any::<u64>()),
        |((sa, sb), seed)| {
            let a = randn(&sa, 1.0, seed);
            let b = randn(&sb, 1.0, seed ^ 1);
            // Denominators in [0.5, 2] with a random sign: d(a/b)/db = -a/b² stays moderate.
            let sign = if seed % 2 == 0 { 1.0 } else { -1.0 };
            let denom = uniform(&sb, 0.5, 2.0, seed ^ 2).mul_scalar(sign).unwrap();
            let ab = [a.clone(), b.clone()];
            check("add", &ab, |x| x[0].add(&x[1]), H, TOL)?;
            check("sub", &ab, |x| x[0].sub(&x[1]), H, TOL)?;
            check("mul", &ab, |x| x[0].mul(&x[1]), H, TOL)?;
            check(
                "div",
                &[a.clone(), denom.clone()],
                |x| x[0].div(&x[1]),
                H_CURVED,
                TOL,
            )?;
            // The same ops with the operands swapped: the broadcast side changes.
            check(
                "add (swapped)",
                &[b.clone(), a.clone()],
                |x| x[0].add(&x[1]),
                H,
                TOL,
            )?;
            check(
                "sub (swapped)",
                &[b.clone(), a.clone()],
                |x| x[0].sub(&x[1]),
                H,
                TOL,
            )?;
            check(
                "mul (swapped)",
                &[b.clone(), a.clone()],
                |x| x[0].mul(&x[1]),
                H,
                TOL,
            )?;
            let denom_a = uniform(&sa, 0.5, 2.0, seed ^ 3).mul_scalar(-sign).unwrap();
            check(
                "div (swapped)",
                &[b, denom_a],
                |x| x[0].div(&x[1]),
                H_CURVED,
                TOL,
            )?;
            // One operand used twice: both gradient contributions must add up.
            check(
                "mul (self)",
                std::slice::from_ref(&a),
                |x| x[0].mul(&x[0]),
                H,
                TOL,
            )?;
            Ok(())
        },
    );
}

#[test]
fn scalar_ops() {
    run(
        config(64),
        &(shape(0..=3, 5, 60), any::<u64>(), -3.0f32..3.0),
        |(s, seed, c)| {
            let x = randn(&s, 1.5, seed);
            let xs = std::slice::from_ref(&x);
            check("add_scalar", xs, |t| t[0].add_scalar(c), H, TOL)?;
            check("sub_scalar", xs, |t| t[0].sub_scalar(c), H, TOL)?;
            check("mul_scalar", xs, |t| t[0].mul_scalar(c), H, TOL)?;
            check("div_scalar", xs, |t| t[0].div_scalar(c.abs() + 0.5), H, TOL)?;
            check("neg", xs, |t| t[0].neg(), H, TOL)?;
            check("square", xs, |t| t[0].square(), H, TOL)?;
            Ok(())
        },
    );
}

#[test]
fn smooth_unary_ops() {
    run(
        config(64),
        &(shape(0..=3, 5, 60), any::<u64>(), -2.0f32..3.0),
        |(s, seed, p)| {
            let x = randn(&s, 1.5, seed);
            let pos = uniform(&s, 0.3, 3.0, seed ^ 1);
            let xs = std::slice::from_ref(&x);
            let ps = std::slice::from_ref(&pos);
            check("exp", xs, |t| t[0].exp(), H, TOL)?;
            check("tanh", xs, |t| t[0].tanh(), H, TOL)?;
            check(
                "gelu",
                &[x.mul_scalar(2.0).unwrap()],
                |t| t[0].gelu(),
                H,
                TOL,
            )?;
            check(
                "sigmoid",
                &[x.mul_scalar(2.0).unwrap()],
                |t| t[0].sigmoid(),
                H,
                TOL,
            )?;
            check(
                "log_sigmoid",
                &[x.mul_scalar(3.0).unwrap()],
                |t| t[0].log_sigmoid(),
                H,
                TOL,
            )?;
            check("log", ps, |t| t[0].log(), H_CURVED, TOL)?;
            check("sqrt", ps, |t| t[0].sqrt(), H_CURVED, TOL)?;
            check("powf", ps, |t| t[0].powf(p), H_CURVED, TOL)?;
            Ok(())
        },
    );
}

#[test]
fn kinked_unary_ops() {
    run(
        config(64),
        &(shape(0..=3, 5, 60), any::<u64>(), -1.5f32..0.5, 0.3f32..2.0),
        |(s, seed, lo, width)| {
            // A gap of 0.05 around each kink is well beyond the step H.
            let x = away_from(&randn(&s, 1.0, seed), 0.0, 0.05);
            let xs = std::slice::from_ref(&x);
            check("relu", xs, |t| t[0].relu(), H, TOL)?;
            check("abs", xs, |t| t[0].abs(), H, TOL)?;
            let hi = lo + width;
            let c = away_from(&away_from(&randn(&s, 1.5, seed ^ 1), lo, 0.05), hi, 0.05);
            check("clamp", &[c], |t| t[0].clamp(lo, hi), H, TOL)?;
            Ok(())
        },
    );
}

#[test]
fn where_and_masked_fill() {
    run(
        config(64),
        &(
            broadcast_pair(),
            shape(0..=2, 4, 16),
            any::<u64>(),
            -5.0f32..5.0,
        ),
        |((sa, sb), sc, seed, fill)| {
            let a = randn(&sa, 1.0, seed);
            let b = randn(&sb, 1.0, seed ^ 1);
            // The condition broadcasts too: take it from the trailing dims of the joint shape when
            // that fits, else from an independent shape that may fail to broadcast (then skip).
            let ab: Vec<usize> = {
                let r = sa.len().max(sb.len());
                (0..r)
                    .map(|i| {
                        let da = if i + sa.len() >= r {
                            sa[i + sa.len() - r]
                        } else {
                            1
                        };
                        let db = if i + sb.len() >= r {
                            sb[i + sb.len() - r]
                        } else {
                            1
                        };
                        da.max(db)
                    })
                    .collect()
            };
            let cond_shape: Vec<usize> = if seed % 3 == 0 {
                sc
            } else {
                let keep = (seed as usize / 3) % (ab.len() + 1);
                ab[ab.len() - keep..].to_vec()
            };
            let cond_ids = ids(&cond_shape, 2, seed ^ 2);
            let cond = Tensor::from_vec(
                cond_ids.iter().map(|&c| c as u8).collect::<Vec<u8>>(),
                &cond_shape,
            )
            .unwrap();
            if Tensor::where_(&cond, &a, &b).is_ok() {
                check(
                    "where_",
                    &[a.clone(), b],
                    |x| Tensor::where_(&cond, &x[0], &x[1]),
                    H,
                    TOL,
                )?;
            }
            // masked_fill: the mask broadcasts to self's shape.
            let keep = (seed as usize / 7) % (sa.len() + 1);
            let mask_shape = sa[sa.len() - keep..].to_vec();
            let mask_vals = ids(&mask_shape, 2, seed ^ 3);
            let mask = Tensor::from_vec(mask_vals, &mask_shape).unwrap();
            check(
                "masked_fill",
                &[a],
                |x| x[0].masked_fill(&mask, fill),
                H,
                TOL,
            )?;
            Ok(())
        },
    );
}

// ------------------------------------------------------------------------------ reductions

#[test]
fn reductions() {
    run(
        config(64),
        &(
            shape(1..=4, 5, 60),
            any::<prop::sample::Index>(),
            any::<bool>(),
            any::<bool>(),
            any::<u64>(),
        ),
        |(s, dim_pick, negative, keepdim, seed)| {
            let rank = s.len();
            let d = dim_pick.index(rank);
            let dim = if negative {
                d as isize - rank as isize
            } else {
                d as isize
            };
            let x = randn(&s, 1.0, seed);
            let xs = std::slice::from_ref(&x);
            check("sum", xs, |t| t[0].sum(dim, keepdim), H, TOL)?;
            check("mean", xs, |t| t[0].mean(dim, keepdim), H, TOL)?;
            check("sum_all", xs, |t| t[0].sum_all(), H, TOL)?;
            check("mean_all", xs, |t| t[0].mean_all(), H, TOL)?;
            check(
                "logsumexp",
                &[x.mul_scalar(2.0).unwrap()],
                |t| t[0].logsumexp(dim, keepdim),
                H,
                TOL,
            )?;
            check(
                "var (biased)",
                xs,
                |t| t[0].var(dim, keepdim, false),
                H,
                TOL,
            )?;
            if s[d] > 1 {
                check(
                    "var (unbiased)",
                    xs,
                    |t| t[0].var(dim, keepdim, true),
                    H,
                    TOL,
                )?;
            }
            // Gaps of at least 0.08 between any two values: no tie flips under a step of H.
            check(
                "max",
                &[distinct(&s, 0.1, seed ^ 1)],
                |t| t[0].max(dim, keepdim),
                H,
                TOL,
            )?;
            Ok(())
        },
    );
}

#[test]
fn softmax_and_log_softmax() {
    run(
        config(64),
        &(
            shape(1..=4, 5, 60),
            any::<prop::sample::Index>(),
            any::<bool>(),
            any::<u64>(),
        ),
        |(s, dim_pick, negative, seed)| {
            let rank = s.len();
            let d = dim_pick.index(rank);
            let dim = if negative {
                d as isize - rank as isize
            } else {
                d as isize
            };
            let x = randn(&s, 2.0, seed);
            let xs = std::slice::from_ref(&x);
            check("softmax", xs, |t| t[0].softmax(dim), H, TOL)?;
            check("log_softmax", xs, |t| t[0].log_softmax(dim), H, TOL)?;
            Ok(())
        },
    );
}

// ------------------------------------------------------------------------------ matmul

/// Batch shapes for the two operands of a batched matmul: each derived from a common batch
/// shape by setting dims to 1 and dropping leading dims, so that either side may broadcast
/// and either may have more dims (including extra leading 1s).
fn batch_pair() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    (
        shape(1..=3, 3, 6),
        prop::collection::vec(any::<bool>(), 3),
        prop::collection::vec(any::<bool>(), 3),
        0usize..=3,
        0usize..=3,
    )
        .prop_map(|(out, ones_a, ones_b, drop_a, drop_b)| {
            let derive = |ones: &[bool], drop: usize| {
                let mut s: Vec<usize> = out
                    .iter()
                    .zip(ones)
                    .map(|(&d, &one)| if one { 1 } else { d })
                    .collect();
                s.drain(..drop.min(s.len()));
                s
            };
            (derive(&ones_a, drop_a), derive(&ones_b, drop_b))
        })
}

/// An operand stored either as `[.., rows, cols]` or as its transpose `[.., cols, rows]`
/// (read back through a `.t()` view inside the checked function).
fn operand(batch: &[usize], rows: usize, cols: usize, transposed: bool, seed: u64) -> Tensor {
    let mut s = batch.to_vec();
    if transposed {
        s.extend([cols, rows]);
    } else {
        s.extend([rows, cols]);
    }
    randn(&s, 1.0, seed)
}

fn view(t: &Tensor, transposed: bool) -> Result<Tensor> {
    if transposed {
        t.t()
    } else {
        Ok(t.clone())
    }
}

#[test]
fn matmul_2d() {
    run(
        config(64),
        &(
            1usize..7,
            1usize..7,
            1usize..7,
            any::<bool>(),
            any::<bool>(),
            any::<u64>(),
        ),
        |(m, k, n, ta, tb, seed)| {
            let a = operand(&[], m, k, ta, seed);
            let b = operand(&[], k, n, tb, seed ^ 1);
            check(
                "matmul 2-D",
                &[a, b],
                |x| view(&x[0], ta)?.matmul(&view(&x[1], tb)?),
                H,
                TOL,
            )?;
            Ok(())
        },
    );
}

#[test]
fn matmul_batched() {
    run(
        config(64),
        &(
            batch_pair(),
            1usize..4,
            1usize..4,
            1usize..4,
            any::<bool>(),
            any::<bool>(),
            any::<u64>(),
        ),
        |((ba, bb), m, k, n, ta, tb, seed)| {
            let a = operand(&ba, m, k, ta, seed);
            let b = operand(&bb, k, n, tb, seed ^ 1);
            check(
                "matmul batched",
                &[a.clone(), b.clone()],
                |x| view(&x[0], ta)?.matmul(&view(&x[1], tb)?),
                H,
                TOL,
            )?;
            // A 2-D weight against a batched input: the linear-layer fast path and its folded
            // weight gradient.
            let w = operand(&[], k, n, tb, seed ^ 2);
            check(
                "matmul batched x 2-D",
                &[a, w],
                |x| view(&x[0], ta)?.matmul(&view(&x[1], tb)?),
                H,
                TOL,
            )?;
            Ok(())
        },
    );
}

// ------------------------------------------------------------------------------ model ops

#[test]
fn layer_norm() {
    run(
        config(48),
        &(
            shape(0..=2, 4, 8),
            1usize..8,
            any::<u64>(),
            prop::sample::select(vec![1e-5f32, 1e-3, 0.1]),
        ),
        |(lead, d, seed, eps)| {
            let mut s = lead;
            s.push(d);
            // Spread values keep every row's variance well above zero: rstd stays moderate, so
            // the curvature the finite difference sees does too.
            let x = distinct(&s, 0.5, seed);
            let w = Tensor::randn(&[d], 1.0, 0.3, seed ^ 1);
            let b = Tensor::randn(&[d], 0.0, 0.3, seed ^ 2);
            check(
                "layer_norm",
                &[x, w, b],
                |t| t[0].layer_norm(&t[1], &t[2], eps),
                H,
                TOL,
            )?;
            Ok(())
        },
    );
}

#[test]
fn embedding() {
    run(
        config(48),
        &(
            shape(1..=2, 6, 12),
            1usize..6,
            1usize..5,
            prop::sample::select(vec![DType::I64, DType::I32, DType::U32, DType::U8]),
            any::<u64>(),
        ),
        |(id_shape, vocab, d, dtype, seed)| {
            // With at most 5 rows and up to 12 ids, rows repeat: their gradients must add up.
            let v = ids(&id_shape, vocab, seed);
            let id_tensor = Tensor::from_vec(v, &id_shape)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let table = randn(&[vocab, d], 1.0, seed ^ 1);
            check(
                "embedding",
                &[table],
                |t| Tensor::embedding(&id_tensor, &t[0]),
                H,
                TOL,
            )?;
            Ok(())
        },
    );
}

#[test]
fn cross_entropy() {
    run(
        config(48),
        &(
            shape(1..=2, 4, 8),
            1usize..7,
            any::<u64>(),
            any::<bool>(),
            any::<bool>(),
        ),
        |(lead, vocab, seed, use_ignore, use_weights)| {
            let mut s = lead.clone();
            s.push(vocab);
            let logits = randn(&s, 2.0, seed);
            let mut targets = ids(&lead, vocab, seed ^ 1);
            if use_ignore {
                let mut rng = Rng::new(seed ^ 2);
                for t in targets.iter_mut() {
                    if rng.below(4) == 0 {
                        *t = -100;
                    }
                }
            }
            let targets = Tensor::from_vec(targets, &lead).unwrap();
            let ignore = use_ignore.then_some(-100);
            // Weights in [0, 2): a zero weight drops a token like the ignore index does.
            let weights = use_weights.then(|| {
                let w = uniform(&lead, -0.5, 2.0, seed ^ 3);
                w.relu().unwrap()
            });
            check(
                "cross_entropy",
                &[logits],
                |t| t[0].cross_entropy(&targets, ignore, weights.as_ref()),
                H,
                TOL,
            )?;
            Ok(())
        },
    );
}

#[test]
fn gather_last() {
    run(
        config(48),
        &(shape(0..=2, 4, 8), 1usize..6, 1usize..5, any::<u64>()),
        |(lead, vocab, k, seed)| {
            let mut xs = lead.clone();
            xs.push(vocab);
            let mut is = lead;
            is.push(k);
            let idx = Tensor::from_vec(ids(&is, vocab, seed), &is).unwrap();
            check(
                "gather_last",
                &[randn(&xs, 1.0, seed ^ 1)],
                |t| t[0].gather_last(&idx),
                H,
                TOL,
            )?;
            Ok(())
        },
    );
}

#[test]
fn concat_and_stack() {
    run(
        config(48),
        &(
            shape(1..=3, 4, 16),
            1usize..4,
            any::<prop::sample::Index>(),
            prop::collection::vec(0usize..4, 3),
            any::<u64>(),
        ),
        |(base, parts, dim_pick, sizes, seed)| {
            let rank = base.len();
            let d = dim_pick.index(rank);
            let inputs: Vec<Tensor> = (0..parts)
                .map(|i| {
                    let mut s = base.clone();
                    s[d] = sizes[i];
                    randn(&s, 1.0, seed ^ i as u64)
                })
                .collect();
            check(
                "concat",
                &inputs,
                |t| Tensor::concat(&t.iter().collect::<Vec<_>>(), d as isize),
                H,
                TOL,
            )?;
            let same: Vec<Tensor> = (0..parts)
                .map(|i| randn(&base, 1.0, seed ^ (7 + i as u64)))
                .collect();
            // stack inserts a dim: any position 0..=rank, also counted from the end.
            let sd = dim_pick.index(rank + 1) as isize
                - if seed % 2 == 0 { 0 } else { rank as isize + 1 };
            check(
                "stack",
                &same,
                |t| Tensor::stack(&t.iter().collect::<Vec<_>>(), sd),
                H,
                TOL,
            )?;
            Ok(())
        },
    );
}

#[test]
fn dropout() {
    run(
        config(48),
        &(shape(1..=3, 5, 60), 0.0f32..0.9, any::<u64>(), any::<u64>()),
        |(s, p, mask_seed, seed)| {
            let x = randn(&s, 1.0, seed);
            check("dropout", &[x], |t| t[0].dropout(p, mask_seed), H, TOL)?;
            Ok(())
        },
    );
}

#[test]
fn causal_attention() {
    run(
        config(48),
        &(
            shape(0..=2, 2, 4),
            1usize..6,
            0usize..6,
            1usize..5,
            any::<bool>(),
            any::<u64>(),
        ),
        |(lead, tk, dq, d, transposed_q, seed)| {
            // tq <= tk: with fewer queries, query i sits at position tk - tq + i (decoding).
            let tq = tk - dq.min(tk - 1);
            let q = operand(&lead, tq, d, transposed_q, seed);
            let k = operand(&lead, tk, d, false, seed ^ 1);
            let v = operand(&lead, tk, d, false, seed ^ 2);
            let qkv = [q, k, v];
            check(
                "causal_attention",
                &qkv,
                |t| Tensor::causal_attention(&view(&t[0], transposed_q)?, &t[1], &t[2]),
                H,
                TOL,
            )?;
            check(
                "causal_attention_reference",
                &qkv,
                |t| Tensor::causal_attention_reference(&view(&t[0], transposed_q)?, &t[1], &t[2]),
                H,
                TOL,
            )?;
            Ok(())
        },
    );
}

// ------------------------------------------------------------------------------ views

/// A random factorisation of `n` into one to three dims (product exactly `n`).
fn factorise(n: usize, rng: &mut Rng) -> Vec<usize> {
    let parts = 1 + rng.below(3) as usize;
    if n == 0 {
        let mut dims: Vec<usize> = (1..parts).map(|_| 1 + rng.below(3) as usize).collect();
        dims.push(0);
        return dims;
    }
    let mut dims = Vec::with_capacity(parts);
    let mut rest = n;
    for _ in 1..parts {
        let divisors: Vec<usize> = (1..=rest).filter(|&d| rest.is_multiple_of(d)).collect();
        let d = divisors[rng.below(divisors.len() as u64) as usize];
        dims.push(d);
        rest /= d;
    }
    dims.push(rest);
    dims
}

/// Names of the views [`apply_view`] knows, by index.
const VIEWS: [&str; 9] = [
    "transpose",
    "permute",
    "narrow",
    "broadcast_to",
    "reshape",
    "squeeze",
    "unsqueeze",
    "contiguous",
    "t",
];

/// Applies view number `kind` with parameters drawn from `rng` (valid for `t`'s shape).
fn apply_view(t: &Tensor, kind: usize, rng: &mut Rng) -> Result<Tensor> {
    let shape = t.shape().to_vec();
    let rank = shape.len();
    let pick = |rng: &mut Rng, n: usize| rng.below(n.max(1) as u64) as usize;
    let signed = |rng: &mut Rng, d: usize, r: usize| {
        if rng.below(2) == 0 {
            d as isize
        } else {
            d as isize - r as isize
        }
    };
    match VIEWS[kind] {
        "transpose" if rank > 0 => {
            let (a, b) = (pick(rng, rank), pick(rng, rank));
            let (a, b) = (signed(rng, a, rank), signed(rng, b, rank));
            t.transpose(a, b)
        }
        "permute" => t.permute(&permutation(rank, rng)),
        "narrow" if rank > 0 => {
            let d = pick(rng, rank);
            let start = pick(rng, shape[d] + 1);
            let len = pick(rng, shape[d] - start + 1);
            // Mostly non-empty: an empty slice is valid but checks little.
            let len = if len == 0 && start < shape[d] && rng.below(4) != 0 {
                1
            } else {
                len
            };
            t.narrow(signed(rng, d, rank), start, len)
        }
        "broadcast_to" => {
            // Grow only small tensors, so that a chain of broadcasts stays cheap to check.
            let grow = if t.numel() <= 64 { 3 } else { 1 };
            let mut target: Vec<usize> = (0..pick(rng, 2)).map(|_| 1 + pick(rng, grow)).collect();
            target.extend(
                shape
                    .iter()
                    .map(|&d| if d == 1 { 1 + pick(rng, grow) } else { d }),
            );
            t.broadcast_to(&target)
        }
        "reshape" => {
            let dims = factorise(t.numel(), rng);
            let mut spec: Vec<isize> = dims.iter().map(|&d| d as isize).collect();
            if !spec.is_empty() && t.numel() > 0 && rng.below(2) == 0 {
                let i = pick(rng, spec.len());
                spec[i] = -1;
            }
            t.reshape(&spec)
        }
        "squeeze" => {
            let ones: Vec<usize> = (0..rank).filter(|&d| shape[d] == 1).collect();
            if ones.is_empty() {
                // No size-1 dim to remove: insert one, then squeeze that one.
                let p = pick(rng, rank + 1);
                t.unsqueeze(p as isize)?.squeeze(signed(rng, p, rank + 1))
            } else {
                let d = ones[pick(rng, ones.len())];
                t.squeeze(signed(rng, d, rank))
            }
        }
        "unsqueeze" => {
            let p = pick(rng, rank + 1);
            t.unsqueeze(signed(rng, p, rank + 1))
        }
        "contiguous" => t.contiguous(),
        "t" if rank >= 2 => t.t(),
        _ => Ok(t.clone()),
    }
}

/// Each view alone, then the views composed in a random order; a smooth op after the
/// chain reads the strided result, so its input gradient lands back through every view.
#[test]
fn views() {
    run(
        config(64),
        &(
            shape(1..=4, 4, 36),
            prop::collection::vec(0usize..VIEWS.len(), 1..5),
            any::<u64>(),
        ),
        |(s, chain, seed)| {
            let x = randn(&s, 1.0, seed);
            let xs = std::slice::from_ref(&x);
            for (kind, name) in VIEWS.iter().enumerate() {
                check(
                    name,
                    xs,
                    |t| apply_view(&t[0], kind, &mut Rng::new(seed)),
                    H,
                    TOL,
                )?;
            }
            let name = chain
                .iter()
                .map(|&k| VIEWS[k])
                .collect::<Vec<_>>()
                .join(" > ");
            check(
                &name,
                xs,
                |t| {
                    let mut rng = Rng::new(seed);
                    let mut y = t[0].clone();
                    for &k in &chain {
                        y = apply_view(&y, k, &mut rng)?;
                    }
                    y.tanh()?.mul(&y)
                },
                H,
                TOL,
            )?;
            Ok(())
        },
    );
}

/// Compute ops reading strided inputs (transposed, narrowed, broadcast views) directly.
#[test]
fn ops_on_strided_views() {
    run(
        config(64),
        &(1usize..5, 2usize..6, any::<u64>()),
        |(r, c, seed)| {
            let a = randn(&[c, r], 1.0, seed);
            let b = randn(&[r, c + 1], 1.0, seed ^ 1);
            let col = randn(&[r, 1], 1.0, seed ^ 2);
            check(
                "strided mix",
                &[a, b, col],
                |t| {
                    let at = t[0].t()?; // [r, c], strided
                    let bn = t[1].narrow(1, 1, c)?; // [r, c], offset view
                    let cb = t[2].broadcast_to(&[r, c])?; // stride 0
                    let y = at.mul(&bn)?.add(&cb)?.tanh()?;
                    y.softmax(0)?.log_softmax(-1)?.sum(0, false)
                },
                H,
                TOL,
            )?;
            Ok(())
        },
    );
}
