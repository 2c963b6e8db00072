//! Algebraic properties of the engine on random shapes and values: views against an
//! index-by-index oracle, broadcasting against explicit expansion, matmul against a triple
//! loop, softmax identities, reduction order, fused and kernel-backed ops against their
//! definitions in f64, autograd bookkeeping (accumulation, no-grad, detach), fused attention
//! against its composed reference, and seeded randomness.
//!
//! The last section feeds random, often invalid, shapes and indices to every op that takes
//! user input and holds it to two rules: never panic, and return `Ok` exactly when the
//! input is valid (by a rule written out independently here).

use proptest::prelude::*;
use rlhf_tensor::autograd::is_no_grad;
use rlhf_tensor::{no_grad, DType, NoGradGuard, Parameter, Rng, Tensor};

mod common;
use common::run;

/// `cases` per property (see [`common::config_for`]), regressions saved beside this file.
fn config(cases: u32) -> ProptestConfig {
    common::config_for(file!(), cases)
}

/// f32 unit roundoff.
const U: f64 = f32::EPSILON as f64 / 2.0;

// ------------------------------------------------------------------------------ helpers

/// Shrinks the largest dims of `s` until it has at most `max_numel` elements.
fn cap_numel(mut s: Vec<usize>, max_numel: usize) -> Vec<usize> {
    while s.iter().product::<usize>() > max_numel {
        let i = (0..s.len()).max_by_key(|&i| s[i]).expect("non-empty");
        s[i] -= 1;
    }
    s
}

/// A shape with rank in `ranks`, dims in `dims` and at most `max_numel` elements.
fn shape(
    ranks: std::ops::RangeInclusive<usize>,
    dims: std::ops::RangeInclusive<usize>,
    max_numel: usize,
) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(dims, ranks).prop_map(move |s| cap_numel(s, max_numel))
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 0.0, 1.0, seed)
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.f32_data().expect("f32 tensor").into_owned()
}

fn bits(t: &Tensor) -> Vec<u32> {
    f32s(t).into_iter().map(f32::to_bits).collect()
}

/// Resolves a possibly negative dim against `rank`; `None` when out of range.
fn resolve(dim: isize, rank: usize) -> Option<usize> {
    let d = if dim < 0 { dim + rank as isize } else { dim };
    (0..rank as isize).contains(&d).then_some(d as usize)
}

/// The NumPy broadcast of two shapes, written out independently of the engine's.
fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    let pad = |s: &[usize]| {
        let mut p = vec![1; r - s.len()];
        p.extend_from_slice(s);
        p
    };
    pad(a)
        .into_iter()
        .zip(pad(b))
        .map(|(x, y)| match (x, y) {
            _ if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

/// Whether `from` expands to `to` (size-1 or missing leading dims only).
fn expands_to(from: &[usize], to: &[usize]) -> bool {
    from.len() <= to.len()
        && from
            .iter()
            .zip(&to[to.len() - from.len()..])
            .all(|(&f, &t)| f == t || f == 1)
}

fn permutation(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, rng.below(i as u64 + 1) as usize);
    }
    p
}

fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (x, &d) in idx.iter_mut().zip(shape).rev() {
        *x = i % d;
        i /= d;
    }
    idx
}

fn ravel(idx: &[usize], shape: &[usize]) -> usize {
    idx.iter().zip(shape).fold(0, |acc, (&i, &d)| acc * d + i)
}

// ------------------------------------------------------------------------------ view oracle

/// A row-major array whose views are explicit copies, index by index: the oracle for the
/// engine's strided views.
#[derive(Clone, Debug, PartialEq)]
struct Dense {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Dense {
    /// Builds `shape` by reading, for each output index, the element at `src(index)`.
    fn gather(&self, shape: Vec<usize>, src: impl Fn(&[usize]) -> Vec<usize>) -> Dense {
        let n = shape.iter().product();
        let data = (0..n)
            .map(|i| self.data[ravel(&src(&unravel(i, &shape)), &self.shape)])
            .collect();
        Dense { shape, data }
    }
}

/// One view with its parameters fixed.
#[derive(Clone, Debug)]
enum ViewOp {
    Transpose(isize, isize),
    Permute(Vec<usize>),
    Narrow(isize, usize, usize),
    BroadcastTo(Vec<usize>),
    Unsqueeze(isize),
    Squeeze(isize),
    Reshape(Vec<usize>),
}

fn signed(d: usize, rank: usize, rng: &mut Rng) -> isize {
    if rng.below(2) == 0 {
        d as isize
    } else {
        d as isize - rank as isize
    }
}

/// A random view valid for `shape`.
fn random_view(shape: &[usize], rng: &mut Rng) -> ViewOp {
    let rank = shape.len();
    let numel: usize = shape.iter().product();
    let pick = |rng: &mut Rng, n: usize| rng.below(n.max(1) as u64) as usize;
    loop {
        match rng.below(7) {
            0 if rank > 0 => {
                let (a, b) = (pick(rng, rank), pick(rng, rank));
                return ViewOp::Transpose(signed(a, rank, rng), signed(b, rank, rng));
            }
            1 => return ViewOp::Permute(permutation(rank, rng)),
            2 if rank > 0 => {
                let d = pick(rng, rank);
                let start = pick(rng, shape[d] + 1);
                let len = pick(rng, shape[d] - start + 1);
                return ViewOp::Narrow(signed(d, rank, rng), start, len);
            }
            3 if numel <= 64 => {
                let mut to: Vec<usize> = (0..pick(rng, 2)).map(|_| 1 + pick(rng, 3)).collect();
                to.extend(
                    shape
                        .iter()
                        .map(|&d| if d == 1 { 1 + pick(rng, 3) } else { d }),
                );
                return ViewOp::BroadcastTo(to);
            }
            4 if rank < 6 => {
                let d = pick(rng, rank + 1);
                return ViewOp::Unsqueeze(signed(d, rank + 1, rng));
            }
            5 => {
                let ones: Vec<usize> = (0..rank).filter(|&d| shape[d] == 1).collect();
                if !ones.is_empty() {
                    let d = ones[pick(rng, ones.len())];
                    return ViewOp::Squeeze(signed(d, rank, rng));
                }
            }
            6 => {
                // Split the element count into up to three factors (or move a size-1 dim).
                let mut dims = Vec::new();
                let mut rest = numel;
                for _ in 0..pick(rng, 3) {
                    let divisors: Vec<usize> =
                        (1..=rest).filter(|&d| rest.is_multiple_of(d)).collect();
                    if divisors.is_empty() {
                        break;
                    }
                    let d = divisors[pick(rng, divisors.len())];
                    dims.push(d);
                    rest /= d;
                }
                dims.push(rest);
                return ViewOp::Reshape(dims);
            }
            _ => {}
        }
    }
}

fn apply_tensor(t: &Tensor, op: &ViewOp) -> rlhf_tensor::Result<Tensor> {
    match op {
        ViewOp::Transpose(a, b) => t.transpose(*a, *b),
        ViewOp::Permute(p) => t.permute(p),
        ViewOp::Narrow(d, s, l) => t.narrow(*d, *s, *l),
        ViewOp::BroadcastTo(s) => t.broadcast_to(s),
        ViewOp::Unsqueeze(d) => t.unsqueeze(*d),
        ViewOp::Squeeze(d) => t.squeeze(*d),
        ViewOp::Reshape(s) => t.reshape_to(s),
    }
}

fn apply_dense(x: &Dense, op: &ViewOp) -> Dense {
    let rank = x.shape.len();
    match op {
        ViewOp::Transpose(a, b) => {
            let (a, b) = (resolve(*a, rank).unwrap(), resolve(*b, rank).unwrap());
            let mut p: Vec<usize> = (0..rank).collect();
            p.swap(a, b);
            apply_dense(x, &ViewOp::Permute(p))
        }
        ViewOp::Permute(p) => {
            let shape = p.iter().map(|&i| x.shape[i]).collect();
            x.gather(shape, |o| {
                let mut src = vec![0; rank];
                for (i, &pi) in p.iter().enumerate() {
                    src[pi] = o[i];
                }
                src
            })
        }
        ViewOp::Narrow(d, start, len) => {
            let d = resolve(*d, rank).unwrap();
            let mut shape = x.shape.clone();
            shape[d] = *len;
            x.gather(shape, |o| {
                let mut src = o.to_vec();
                src[d] += start;
                src
            })
        }
        ViewOp::BroadcastTo(to) => {
            let lead = to.len() - rank;
            x.gather(to.clone(), |o| {
                (0..rank)
                    .map(|i| if x.shape[i] == 1 { 0 } else { o[lead + i] })
                    .collect()
            })
        }
        ViewOp::Unsqueeze(d) => {
            let d = resolve(*d, rank + 1).unwrap();
            let mut shape = x.shape.clone();
            shape.insert(d, 1);
            x.gather(shape, |o| {
                let mut src = o.to_vec();
                src.remove(d);
                src
            })
        }
        ViewOp::Squeeze(d) => {
            let d = resolve(*d, rank).unwrap();
            let mut shape = x.shape.clone();
            shape.remove(d);
            x.gather(shape, |o| {
                let mut src = o.to_vec();
                src.insert(d, 0);
                src
            })
        }
        ViewOp::Reshape(s) => Dense {
            shape: s.clone(),
            data: x.data.clone(),
        },
    }
}

/// Random chains of views equal the oracle's explicit copies (shape and every value);
/// every view but a reshape of strided data shares the storage, that reshape copies,
/// and contiguous() of a strided view is the oracle's gather in row-major order.
#[test]
fn views_match_an_index_by_index_oracle() {
    run(
        config(64),
        &(shape(0..=4, 0..=4, 96), 1usize..7, any::<u64>()),
        |(s, steps, seed)| {
            let base = randn(&s, seed);
            let mut t = base.clone();
            let mut d = Dense {
                shape: s.clone(),
                data: f32s(&base),
            };
            let mut rng = Rng::new(seed);
            for _ in 0..steps {
                let op = random_view(t.shape(), &mut rng);
                let next = apply_tensor(&t, &op)
                    .map_err(|e| TestCaseError::fail(format!("{op:?} on {:?}: {e}", t.shape())))?;
                d = apply_dense(&d, &op);
                prop_assert_eq!(next.shape(), &d.shape[..], "{:?}", op);
                prop_assert_eq!(
                    bits(&next),
                    d.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "{:?}",
                    op
                );
                let copies = matches!(op, ViewOp::Reshape(_)) && !t.is_contiguous();
                prop_assert_eq!(
                    next.shares_storage(&t),
                    !copies,
                    "{:?} on {:?} (contiguous: {})",
                    op,
                    t.shape(),
                    t.is_contiguous()
                );
                t = next;
            }
            let c = t.contiguous().unwrap();
            prop_assert!(c.is_contiguous());
            prop_assert_eq!(c.shape(), &d.shape[..]);
            prop_assert_eq!(c.shares_storage(&t), t.is_contiguous());
            prop_assert_eq!(
                bits(&c),
                d.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            if !t.is_contiguous() {
                prop_assert_eq!(
                    c.layout().strides(),
                    &rlhf_tensor::layout::contiguous_strides(c.shape())[..]
                );
            }
            Ok(())
        },
    );
}

/// transpose(a, b) twice and permute then its inverse give back the same layout over the
/// same storage: the same shape, strides, offset and values, with no copy.
#[test]
fn transpose_twice_is_the_identity() {
    run(
        config(64),
        &(
            shape(1..=5, 1..=4, 200),
            any::<prop::sample::Index>(),
            any::<prop::sample::Index>(),
            any::<bool>(),
            any::<u64>(),
        ),
        |(s, a, b, narrow_first, seed)| {
            let mut x = randn(&s, seed);
            if narrow_first && s[0] > 1 {
                // A view with an offset, so that offsets are checked too.
                x = x.narrow(0, 1, s[0] - 1).unwrap();
            }
            let r = s.len();
            let (a, b) = (a.index(r) as isize, b.index(r) as isize - r as isize);
            let y = x.transpose(a, b).unwrap().transpose(a, b).unwrap();
            prop_assert_eq!(y.layout(), x.layout());
            prop_assert!(y.shares_storage(&x));
            prop_assert_eq!(bits(&y), bits(&x));
            let p = permutation(r, &mut Rng::new(seed));
            let mut inv = vec![0; r];
            for (i, &pi) in p.iter().enumerate() {
                inv[pi] = i;
            }
            let z = x.permute(&p).unwrap().permute(&inv).unwrap();
            prop_assert_eq!(z.layout(), x.layout());
            prop_assert!(z.shares_storage(&x));
            if r >= 2 {
                let tt = x.t().unwrap().t().unwrap();
                prop_assert_eq!(tt.layout(), x.layout());
            }
            Ok(())
        },
    );
}

// ------------------------------------------------------------------------------ broadcasting

/// A broadcasting op equals the same op on operands expanded explicitly (broadcast_to then
/// contiguous), bit for bit: broadcasting only decides which elements meet.
#[test]
fn broadcasting_equals_explicit_expansion() {
    run(
        config(64),
        &(
            shape(1..=4, 1..=4, 64),
            prop::collection::vec(any::<bool>(), 4),
            prop::collection::vec(any::<bool>(), 4),
            0usize..=4,
            0usize..=4,
            any::<u64>(),
        ),
        |(out, ones_a, ones_b, drop_a, drop_b, seed)| {
            let derive = |ones: &[bool], drop: usize| {
                let mut s: Vec<usize> = out
                    .iter()
                    .zip(ones)
                    .map(|(&d, &o)| if o { 1 } else { d })
                    .collect();
                s.drain(..drop.min(s.len()));
                s
            };
            let (sa, sb) = (derive(&ones_a, drop_a), derive(&ones_b, drop_b));
            let full = broadcast(&sa, &sb).expect("derived shapes broadcast");
            let a = randn(&sa, seed);
            let b = Tensor::rand_uniform(&sb, 0.5, 2.0, seed ^ 1);
            let ea = a.broadcast_to(&full).unwrap().contiguous().unwrap();
            let eb = b.broadcast_to(&full).unwrap().contiguous().unwrap();
            type Op = fn(&Tensor, &Tensor) -> rlhf_tensor::Result<Tensor>;
            let ops: [(&str, Op); 4] = [
                ("add", Tensor::add),
                ("sub", Tensor::sub),
                ("mul", Tensor::mul),
                ("div", Tensor::div),
            ];
            for (name, op) in ops {
                let got = op(&a, &b).unwrap();
                let want = op(&ea, &eb).unwrap();
                prop_assert_eq!(got.shape(), &full[..], "{}", name);
                prop_assert_eq!(bits(&got), bits(&want), "{}", name);
                let swapped = op(&b, &a).unwrap();
                prop_assert_eq!(
                    bits(&swapped),
                    bits(&op(&eb, &ea).unwrap()),
                    "{} swapped",
                    name
                );
            }
            // where_ broadcasts all three operands.
            let cond = Tensor::rand_uniform(&sb, 0.0, 1.0, seed ^ 2)
                .gt(&Tensor::scalar(0.5))
                .unwrap();
            let ec = cond.broadcast_to(&full).unwrap().contiguous().unwrap();
            let w = Tensor::where_(&cond, &a, &b).unwrap();
            prop_assert_eq!(bits(&w), bits(&Tensor::where_(&ec, &ea, &eb).unwrap()));
            Ok(())
        },
    );
}

// ------------------------------------------------------------------------------ matmul

/// C = A·B in f64 over the row-major values of `a` [.., m, k] and `b` [.., k, n] of one batch
/// element each, with the bound γ_k·Σ|a||b| on any f32 summation order's error.
fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut c, mut bound) = (vec![0.0; m * n], vec![0.0; m * n]);
    for i in 0..m {
        for p in 0..k {
            let x = a[i * k + p];
            for j in 0..n {
                c[i * n + j] += x * b[p * n + j];
                bound[i * n + j] += (x * b[p * n + j]).abs();
            }
        }
    }
    let gamma = 1.01 * k as f64 * U / (1.0 - k as f64 * U);
    bound.iter_mut().for_each(|x| *x = *x * gamma + 1e-30);
    (c, bound)
}

/// An [rows, cols] operand stored plain, transposed (read back through .t()), or as a
/// narrowed window of a larger matrix (offset and row stride differ from a contiguous one).
fn strided_operand(rows: usize, cols: usize, kind: u8, seed: u64) -> Tensor {
    match kind % 3 {
        0 => randn(&[rows, cols], seed),
        1 => randn(&[cols, rows], seed).t().unwrap(),
        _ => randn(&[rows + 3, cols + 5], seed)
            .narrow(0, 2, rows)
            .unwrap()
            .narrow(1, 3, cols)
            .unwrap(),
    }
}

/// Large random shapes (1..300 per dim) with plain, transposed and narrowed operands.
#[test]
fn matmul_matches_triple_loop() {
    run(
        config(6),
        &(
            1usize..300,
            1usize..300,
            1usize..300,
            0u8..3,
            0u8..3,
            any::<u64>(),
        ),
        |(m, k, n, ka, kb, seed)| {
            let a = strided_operand(m, k, ka, seed);
            let b = strided_operand(k, n, kb, seed ^ 1);
            let c = a.matmul(&b).unwrap();
            prop_assert_eq!(c.shape(), &[m, n][..]);
            let (want, bound) = naive(&a.to_f64_vec(), &b.to_f64_vec(), m, k, n);
            for (i, ((x, y), e)) in c.to_f64_vec().iter().zip(&want).zip(&bound).enumerate() {
                prop_assert!(
                    (x - y).abs() <= *e,
                    "C[{}, {}] = {} but the triple loop gives {} (bound {:e})",
                    i / n,
                    i % n,
                    x,
                    y,
                    e
                );
            }
            Ok(())
        },
    );
}

/// Batched products with broadcast batch dims and strided operands, per batch element.
#[test]
fn batched_matmul_matches_triple_loop() {
    run(
        config(48),
        &(
            shape(1..=3, 1..=3, 12),
            prop::collection::vec(any::<bool>(), 3),
            prop::collection::vec(any::<bool>(), 3),
            0usize..=3,
            0usize..=3,
            1usize..20,
            1usize..20,
            1usize..20,
            any::<bool>(),
            any::<bool>(),
            any::<u64>(),
        ),
        |(batch, ones_a, ones_b, drop_a, drop_b, m, k, n, ta, tb, seed)| {
            let derive = |ones: &[bool], drop: usize| {
                let mut s: Vec<usize> = batch
                    .iter()
                    .zip(ones)
                    .map(|(&d, &o)| if o { 1 } else { d })
                    .collect();
                s.drain(..drop.min(s.len()));
                s
            };
            let (ba, bb) = (derive(&ones_a, drop_a), derive(&ones_b, drop_b));
            let make = |bs: &[usize], r: usize, c: usize, t: bool, seed: u64| {
                let mut s = bs.to_vec();
                if t {
                    s.extend([c, r]);
                    randn(&s, seed).t().unwrap()
                } else {
                    s.extend([r, c]);
                    randn(&s, seed)
                }
            };
            let a = make(&ba, m, k, ta, seed);
            let b = make(&bb, k, n, tb, seed ^ 1);
            let out_batch = broadcast(&ba, &bb).unwrap();
            let c = a.matmul(&b).unwrap();
            let mut want_shape = out_batch.clone();
            want_shape.extend([m, n]);
            prop_assert_eq!(c.shape(), &want_shape[..]);
            let (av, bv, cv) = (a.to_f64_vec(), b.to_f64_vec(), c.to_f64_vec());
            let nb: usize = out_batch.iter().product();
            for bi in 0..nb {
                let idx = unravel(bi, &out_batch);
                // The batch element each operand contributes (size-1 dims broadcast).
                let pick = |bs: &[usize]| {
                    let lead = out_batch.len() - bs.len();
                    let own: Vec<usize> = (0..bs.len())
                        .map(|i| if bs[i] == 1 { 0 } else { idx[lead + i] })
                        .collect();
                    ravel(&own, bs)
                };
                let (ia, ib) = (pick(&ba), pick(&bb));
                let (want, bound) = naive(
                    &av[ia * m * k..][..m * k],
                    &bv[ib * k * n..][..k * n],
                    m,
                    k,
                    n,
                );
                for ((x, y), e) in cv[bi * m * n..][..m * n].iter().zip(&want).zip(&bound) {
                    prop_assert!((x - y).abs() <= *e, "batch {:?}: {} vs {}", idx, x, y);
                }
            }
            Ok(())
        },
    );
}

// ------------------------------------------------------------------------------ softmax, sums

/// softmax along any dim: every value in [0, 1], each row sums to 1, and log_softmax is
/// log(softmax) (compared where softmax has not underflowed), even with large logits.
#[test]
fn softmax_rows_are_distributions() {
    run(
        config(64),
        &(
            shape(1..=4, 1..=6, 120),
            any::<prop::sample::Index>(),
            prop::sample::select(vec![0.1f32, 1.0, 10.0, 50.0]),
            -100.0f32..100.0,
            any::<u64>(),
        ),
        |(s, d, scale, offset, seed)| {
            let dim = d.index(s.len()) as isize;
            let x = Tensor::randn(&s, offset, scale, seed);
            let p = x.softmax(dim).unwrap();
            let lp = x.log_softmax(dim).unwrap();
            prop_assert_eq!(p.shape(), &s[..]);
            for v in p.to_f64_vec() {
                prop_assert!((0.0..=1.0).contains(&v), "softmax value {}", v);
            }
            let n = s[dim as usize] as f64;
            for row in p.sum(dim, false).unwrap().to_f64_vec() {
                prop_assert!(
                    (row - 1.0).abs() <= 4.0 * n * U + 1e-6,
                    "row sums to {}",
                    row
                );
            }
            for (l, q) in lp.to_f64_vec().iter().zip(p.to_f64_vec()) {
                prop_assert!(*l <= 1e-6, "log_softmax value {} > 0", l);
                if q > 1e-30 {
                    prop_assert!(
                        (l - q.ln()).abs() <= 1e-5 * (1.0 + l.abs()),
                        "log_softmax {} vs log(softmax) {}",
                        l,
                        q.ln()
                    );
                }
            }
            Ok(())
        },
    );
}

/// Summing out every dim, in any order, gives the total (within the rounding bound of
/// any summation order); keepdim=true keeps a shape of ones.
#[test]
fn sum_over_all_dims_in_any_order() {
    run(
        config(64),
        &(shape(1..=5, 1..=6, 300), any::<u64>()),
        |(s, seed)| {
            let x = randn(&s, seed);
            let v = x.to_f64_vec();
            let exact: f64 = v.iter().sum();
            let bound = 2.0 * v.len() as f64 * U * v.iter().map(|a| a.abs()).sum::<f64>() + 1e-30;
            let mut rng = Rng::new(seed);
            for _ in 0..3 {
                let order = permutation(s.len(), &mut rng);
                let mut remaining: Vec<usize> = (0..s.len()).collect();
                let (mut t, mut k) = (x.clone(), x.clone());
                for &d in &order {
                    let pos = remaining.iter().position(|&r| r == d).unwrap();
                    t = t.sum(pos as isize, false).unwrap();
                    remaining.remove(pos);
                    k = k.sum(d as isize, true).unwrap();
                }
                prop_assert_eq!(t.shape(), &[] as &[usize]);
                prop_assert_eq!(k.shape(), &vec![1; s.len()][..]);
                let (got, kept) = (t.item().unwrap() as f64, k.item().unwrap() as f64);
                prop_assert!(
                    (got - exact).abs() <= bound,
                    "order {:?}: {} vs {}",
                    order,
                    got,
                    exact
                );
                prop_assert!(
                    (kept - exact).abs() <= bound,
                    "keepdim, order {:?}: {} vs {}",
                    order,
                    kept,
                    exact
                );
            }
            let all = x.sum_all().unwrap().item().unwrap() as f64;
            prop_assert!((all - exact).abs() <= bound);
            Ok(())
        },
    );
}

// ------------------------------------------------------------------------------ definitions

/// `|got - want| <= rel * (1 + |want|)` for every element, or a failure naming `what`.
fn close(what: &str, got: &[f64], want: &[f64], rel: f64) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len(), "{}: lengths", what);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        prop_assert!(
            (g - w).abs() <= rel * (1.0 + w.abs()),
            "{}[{}]: {} but the definition gives {}",
            what,
            i,
            g,
            w
        );
    }
    Ok(())
}

/// Fused and kernel-backed ops equal their textbook definitions, evaluated in f64 on the same
/// inputs. (A gradient check cannot see a forward that is wrong but consistent with its own
/// backward, say a loss divided by the wrong count.)
#[test]
fn ops_equal_their_definitions() {
    run(
        config(64),
        &(
            shape(1..=3, 1..=5, 40),
            1usize..8,
            any::<u64>(),
            any::<bool>(),
            any::<bool>(),
        ),
        |(lead, v, seed, use_ignore, use_weights)| {
            let mut s = lead.clone();
            s.push(v);
            let x = Tensor::randn(&s, 0.0, 3.0, seed);
            let xv = x.to_f64_vec();
            let rows = xv.len() / v;
            let row = |r: usize| &xv[r * v..(r + 1) * v];
            let lse: Vec<f64> = (0..rows)
                .map(|r| {
                    let m = row(r).iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    m + row(r).iter().map(|a| (a - m).exp()).sum::<f64>().ln()
                })
                .collect();
            close(
                "logsumexp",
                &x.logsumexp(-1, false).unwrap().to_f64_vec(),
                &lse,
                1e-5,
            )?;
            let softmax: Vec<f64> = (0..rows)
                .flat_map(|r| {
                    row(r)
                        .iter()
                        .map(|a| (a - lse[r]).exp())
                        .collect::<Vec<_>>()
                })
                .collect();
            close(
                "softmax",
                &x.softmax(-1).unwrap().to_f64_vec(),
                &softmax,
                1e-5,
            )?;

            // Cross-entropy: Σ w·(lse - x[target]) / Σ w over the counted targets.
            let mut rng = Rng::new(seed ^ 1);
            let targets: Vec<i64> = (0..rows)
                .map(|_| {
                    if use_ignore && rng.below(4) == 0 {
                        -100
                    } else {
                        rng.below(v as u64) as i64
                    }
                })
                .collect();
            let w: Vec<f32> = (0..rows)
                .map(|_| {
                    if use_weights {
                        2.0 * rng.next_f32()
                    } else {
                        1.0
                    }
                })
                .collect();
            let (mut num, mut den) = (0.0, 0.0);
            for r in 0..rows {
                if targets[r] != -100 {
                    num += f64::from(w[r]) * (lse[r] - row(r)[targets[r] as usize]);
                    den += f64::from(w[r]);
                }
            }
            let want = if den == 0.0 { 0.0 } else { num / den };
            let tt = Tensor::from_vec(targets.clone(), &lead).unwrap();
            let wt = Tensor::from_vec(w.clone(), &lead).unwrap();
            let ce = x
                .cross_entropy(&tt, use_ignore.then_some(-100), use_weights.then_some(&wt))
                .unwrap();
            close("cross_entropy", &ce.to_f64_vec(), &[want], 1e-5)?;
            // gather_last picks the same logits; embedding picks whole rows.
            let picked = x
                .gather_last(
                    &Tensor::from_vec(
                        targets.iter().map(|&t| t.max(0)).collect(),
                        &[&lead[..], &[1]].concat(),
                    )
                    .unwrap(),
                )
                .unwrap()
                .to_f64_vec();
            let want: Vec<f64> = (0..rows)
                .map(|r| row(r)[targets[r].max(0) as usize])
                .collect();
            prop_assert_eq!(picked, want);
            let table = x.reshape_to(&[rows, v]).unwrap();
            let ids: Vec<i64> = targets.iter().map(|&t| t.max(0) % rows as i64).collect();
            let emb = Tensor::embedding(
                &Tensor::from_vec(ids.clone(), &[ids.len()]).unwrap(),
                &table,
            )
            .unwrap()
            .to_f64_vec();
            let want: Vec<f64> = ids.iter().flat_map(|&i| row(i as usize).to_vec()).collect();
            prop_assert_eq!(emb, want);

            // var (biased and, for more than one element, unbiased) and layer_norm.
            let mean: Vec<f64> = (0..rows)
                .map(|r| row(r).iter().sum::<f64>() / v as f64)
                .collect();
            let ss: Vec<f64> = (0..rows)
                .map(|r| row(r).iter().map(|a| (a - mean[r]).powi(2)).sum::<f64>())
                .collect();
            let biased: Vec<f64> = ss.iter().map(|s| s / v as f64).collect();
            close(
                "var",
                &x.var(-1, false, false).unwrap().to_f64_vec(),
                &biased,
                1e-5,
            )?;
            if v > 1 {
                let unbiased: Vec<f64> = ss.iter().map(|s| s / (v - 1) as f64).collect();
                close(
                    "var unbiased",
                    &x.var(-1, false, true).unwrap().to_f64_vec(),
                    &unbiased,
                    1e-5,
                )?;
            }
            let (g, b) = (randn(&[v], seed ^ 2), randn(&[v], seed ^ 3));
            let (gv, bv) = (g.to_f64_vec(), b.to_f64_vec());
            let eps = 1e-5;
            let y = x.layer_norm(&g, &b, eps as f32).unwrap().to_f64_vec();
            for r in 0..rows {
                let rstd = 1.0 / (biased[r] + eps).sqrt();
                let scale = row(r).iter().fold(0.0f64, |m, a| m.max(a.abs()));
                for j in 0..v {
                    let want = (row(r)[j] - mean[r]) * rstd * gv[j] + bv[j];
                    // f32 centring loses about u·max|x| before the scale by rstd.
                    let tol = 1e-5 * (1.0 + want.abs()) + 64.0 * U * scale * rstd * gv[j].abs();
                    prop_assert!(
                        (y[r * v + j] - want).abs() <= tol,
                        "layer_norm {} vs {}",
                        y[r * v + j],
                        want
                    );
                }
            }

            // Elementwise definitions.
            let map = |f: fn(f64) -> f64| xv.iter().map(|&a| f(a)).collect::<Vec<f64>>();
            close("exp", &x.exp().unwrap().to_f64_vec(), &map(f64::exp), 1e-5)?;
            close(
                "tanh",
                &x.tanh().unwrap().to_f64_vec(),
                &map(f64::tanh),
                1e-5,
            )?;
            close(
                "sigmoid",
                &x.sigmoid().unwrap().to_f64_vec(),
                &map(|a| 1.0 / (1.0 + (-a).exp())),
                1e-5,
            )?;
            let log_sigmoid = |a: f64| {
                if a >= 0.0 {
                    -(-a).exp().ln_1p()
                } else {
                    a - a.exp().ln_1p()
                }
            };
            close(
                "log_sigmoid",
                &x.log_sigmoid().unwrap().to_f64_vec(),
                &map(log_sigmoid),
                1e-5,
            )?;
            let gelu = |a: f64| {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * a * (1.0 + (c * (a + 0.044715 * a * a * a)).tanh())
            };
            close("gelu", &x.gelu().unwrap().to_f64_vec(), &map(gelu), 1e-5)?;
            Ok(())
        },
    );
}

// ------------------------------------------------------------------------------ autograd

/// A scalar loss with a nontrivial gradient: Σ tanh(x)·c + x².
fn loss(x: &Tensor, c: &Tensor) -> rlhf_tensor::Result<Tensor> {
    x.tanh()?.mul(c)?.add(&x.square()?)?.sum_all()
}

/// Two backward calls (on the same graph, or on a rebuilt one) accumulate twice the
/// gradient; zero_grad clears it, and the next backward starts from scratch (bit for
/// bit the first gradient).
#[test]
fn gradients_accumulate_until_zero_grad() {
    run(
        config(32),
        &(shape(0..=3, 1..=5, 60), any::<u64>()),
        |(s, seed)| {
            let p = Parameter::new(randn(&s, seed));
            let c = randn(&s, seed ^ 1);
            prop_assert!(p.grad().is_none());
            let l = loss(&p.tensor(), &c).unwrap();
            l.backward().unwrap();
            let g1 = p.grad().unwrap();
            prop_assert_eq!(g1.shape(), &s[..]);
            // The leaf's three contributions (tanh path, both factors of x²) are added to its
            // cell one by one, so twice the gradient is exact only up to that rounding.
            let (xv, cv) = (f32s(&p.tensor()), f32s(&c));
            let twice_close =
                |g: &Tensor| -> bool {
                    f32s(g).iter().zip(f32s(&g1)).zip(xv.iter().zip(&cv)).all(
                        |((acc, g1), (x, c))| {
                            let bound =
                                8.0 * U * (f64::from(c.abs()) + 2.0 * f64::from(x.abs())) + 1e-30;
                            (f64::from(*acc) - 2.0 * f64::from(g1)).abs() <= 2.0 * bound
                        },
                    )
                };
            l.backward().unwrap();
            prop_assert!(
                twice_close(&p.grad().unwrap()),
                "{:?} is not twice {:?}",
                p.grad(),
                g1
            );
            p.zero_grad();
            prop_assert!(p.grad().is_none());
            loss(&p.tensor(), &c).unwrap().backward().unwrap();
            prop_assert_eq!(bits(&p.grad().unwrap()), bits(&g1));
            loss(&p.tensor(), &c).unwrap().backward().unwrap();
            prop_assert!(twice_close(&p.grad().unwrap()));
            // A leaf with a single contribution per backward accumulates exactly: g + g = 2g.
            let q = Parameter::new(randn(&s, seed ^ 2));
            let lq = q
                .tensor()
                .tanh()
                .unwrap()
                .mul(&c)
                .unwrap()
                .sum_all()
                .unwrap();
            lq.backward().unwrap();
            let gq = f32s(&q.grad().unwrap());
            lq.backward().unwrap();
            prop_assert_eq!(
                bits(&q.grad().unwrap()),
                gq.iter().map(|g| (2.0 * g).to_bits()).collect::<Vec<_>>()
            );
            // Each backward adds only its own graph's gradient: a parameter used in one of two
            // losses gets the same gradient as from that loss alone.
            q.zero_grad();
            p.zero_grad();
            loss(&p.tensor(), &c).unwrap().backward().unwrap();
            loss(&p.tensor().mul(&q.tensor()).unwrap(), &c)
                .unwrap()
                .backward()
                .unwrap();
            let qg = q.grad().unwrap();
            q.zero_grad();
            loss(&p.tensor().mul(&q.tensor()).unwrap(), &c)
                .unwrap()
                .backward()
                .unwrap();
            prop_assert_eq!(bits(&q.grad().unwrap()), bits(&qg));
            Ok(())
        },
    );
}

/// Under no_grad nothing tracks, so backward is an error and no gradient appears;
/// tracking resumes when the guard ends, nested guards included.
#[test]
fn no_grad_outputs_do_not_track() {
    run(
        config(32),
        &(shape(0..=3, 1..=5, 60), any::<u64>()),
        |(s, seed)| {
            let p = Parameter::new(randn(&s, seed));
            let c = randn(&s, seed ^ 1);
            let y = no_grad(|| {
                prop_assert!(is_no_grad());
                {
                    let _inner = NoGradGuard::new();
                    prop_assert!(is_no_grad());
                }
                prop_assert!(
                    is_no_grad(),
                    "an inner guard must restore the outer no-grad mode"
                );
                Ok(loss(&p.tensor(), &c).unwrap())
            })?;
            prop_assert!(!is_no_grad());
            prop_assert!(!y.tracks_grad());
            prop_assert!(y.backward().is_err());
            prop_assert!(p.grad().is_none());
            // The same computation outside no_grad tracks and gives the same value.
            let z = loss(&p.tensor(), &c).unwrap();
            prop_assert!(z.tracks_grad());
            prop_assert_eq!(bits(&z), bits(&y));
            z.backward().unwrap();
            prop_assert!(p.grad().is_some());
            Ok(())
        },
    );
}

/// detach() keeps the data (same storage) and cuts the graph: x·detach(x) has gradient
/// x (not 2x), and a loss built only from detached values cannot backpropagate.
#[test]
fn detach_stops_gradients() {
    run(
        config(32),
        &(shape(0..=3, 1..=5, 60), any::<u64>()),
        |(s, seed)| {
            let p = Parameter::new(randn(&s, seed));
            let x = p.tensor();
            let d = x.detach();
            prop_assert!(x.tracks_grad() && !d.tracks_grad());
            prop_assert!(d.shares_storage(&x));
            x.mul(&d).unwrap().sum_all().unwrap().backward().unwrap();
            prop_assert_eq!(bits(&p.grad().unwrap()), bits(&x));
            p.zero_grad();
            let e = x.exp().unwrap().detach();
            prop_assert!(e.sum_all().unwrap().backward().is_err());
            prop_assert!(p.grad().is_none());
            x.mul(&e).unwrap().sum_all().unwrap().backward().unwrap();
            prop_assert_eq!(bits(&p.grad().unwrap()), bits(&e));
            Ok(())
        },
    );
}

// ------------------------------------------------------------------------------ attention

/// Output and input gradients of attention `f`, with the output projected on `w`.
fn attention_grads(
    f: fn(&Tensor, &Tensor, &Tensor) -> rlhf_tensor::Result<Tensor>,
    qkv: &[Tensor; 3],
    w: &Tensor,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let ps: Vec<Parameter> = qkv.iter().map(|x| Parameter::new(x.clone())).collect();
    let out = f(&ps[0].tensor(), &ps[1].tensor(), &ps[2].tensor()).unwrap();
    out.mul(w).unwrap().sum_all().unwrap().backward().unwrap();
    (
        out.to_f64_vec(),
        ps.iter().map(|p| p.grad().unwrap().to_f64_vec()).collect(),
    )
}

/// The fused kernel equals the composed path (matmul, mask, softmax, matmul), forward and
/// backward, for tq <= tk (tq < tk is decoding with a cache), any leading dims.
#[test]
fn fused_attention_equals_composed() {
    run(
        config(24),
        &(
            shape(0..=2, 1..=3, 6),
            1usize..48,
            0usize..48,
            1usize..33,
            prop::sample::select(vec![0.5f32, 1.0, 3.0]),
            any::<u64>(),
        ),
        |(lead, tk, dq, d, scale, seed)| {
            let tq = tk - dq.min(tk - 1);
            let with = |t: usize| {
                let mut s = lead.clone();
                s.extend([t, d]);
                s
            };
            let q = Tensor::randn(&with(tq), 0.0, scale, seed);
            let k = Tensor::randn(&with(tk), 0.0, scale, seed ^ 1);
            let v = randn(&with(tk), seed ^ 2);
            let w = randn(&with(tq), seed ^ 3);
            let qkv = [q, k, v];
            let (o1, g1) = attention_grads(Tensor::causal_attention, &qkv, &w);
            let (o2, g2) = attention_grads(Tensor::causal_attention_reference, &qkv, &w);
            for (a, e) in o1.iter().zip(&o2) {
                prop_assert!(
                    (a - e).abs() <= 1e-4 * (1.0 + e.abs()),
                    "output {} vs {}",
                    a,
                    e
                );
            }
            for (which, (ga, ge)) in ["dq", "dk", "dv"].iter().zip(g1.iter().zip(&g2)) {
                for (a, e) in ga.iter().zip(ge) {
                    prop_assert!(
                        (a - e).abs() <= 1e-3 * (1.0 + e.abs()),
                        "{} {} vs {}",
                        which,
                        a,
                        e
                    );
                }
            }
            Ok(())
        },
    );
}

// ------------------------------------------------------------------------------ randomness

/// randn, rand_uniform and dropout are functions of their seed: the same seed gives the
/// same bits, another seed other numbers; uniform samples stay in [lo, hi).
#[test]
fn seeded_randomness_replays() {
    run(
        config(32),
        &(
            shape(2..=3, 8..=12, 512),
            any::<u64>(),
            any::<u64>(),
            -5.0f32..5.0,
            0.1f32..10.0,
            0.1f32..0.9,
        ),
        |(s, seed, other, lo, width, p)| {
            prop_assume!(seed != other);
            let hi = lo + width;
            prop_assert_eq!(
                bits(&Tensor::randn(&s, 1.0, 2.0, seed)),
                bits(&Tensor::randn(&s, 1.0, 2.0, seed))
            );
            prop_assert_ne!(
                bits(&Tensor::randn(&s, 1.0, 2.0, seed)),
                bits(&Tensor::randn(&s, 1.0, 2.0, other))
            );
            let u = Tensor::rand_uniform(&s, lo, hi, seed);
            prop_assert_eq!(bits(&u), bits(&Tensor::rand_uniform(&s, lo, hi, seed)));
            prop_assert_ne!(bits(&u), bits(&Tensor::rand_uniform(&s, lo, hi, other)));
            for x in f32s(&u) {
                prop_assert!(x >= lo && x <= hi, "{} outside [{}, {})", x, lo, hi);
            }
            let x = Tensor::rand_uniform(&s, 1.0, 2.0, seed ^ 1);
            let a = x.dropout(p, seed).unwrap();
            prop_assert_eq!(bits(&a), bits(&x.dropout(p, seed).unwrap()));
            // At least 64 elements: two masks agree everywhere with probability below 0.82^64.
            prop_assert_ne!(bits(&a), bits(&x.dropout(p, other).unwrap()));
            // Survivors are scaled by 1/(1-p); the rest are exactly 0.
            let keep = 1.0 / (1.0 - p);
            for (y, x) in f32s(&a).iter().zip(f32s(&x)) {
                prop_assert!(*y == 0.0 || *y == x * keep, "{} from {}", y, x);
            }
            // A caller's generator: two generators from one seed stay in step draw after draw.
            let (mut r1, mut r2) = (Rng::new(seed), Rng::new(seed));
            for _ in 0..2 {
                prop_assert_eq!(
                    bits(&Tensor::randn_with(&s, 0.0, 1.0, &mut r1)),
                    bits(&Tensor::randn_with(&s, 0.0, 1.0, &mut r2))
                );
            }
            Ok(())
        },
    );
}

// ------------------------------------------------------------------------------ user errors

/// Shapes with zero-size dims and ranks 0..=4: valid inputs at the edges as well as
/// mismatches.
fn any_shape() -> impl Strategy<Value = Vec<usize>> {
    shape(0..=4, 0..=4, 256)
}

/// Nearly matching shapes: `base` with one dim changed now and then, so that mismatches are
/// near misses rather than wildly different shapes (which any check rejects).
fn near(base: &[usize], rng: &mut Rng) -> Vec<usize> {
    let mut s = base.to_vec();
    match rng.below(5) {
        0 if !s.is_empty() => {
            let i = rng.below(s.len() as u64) as usize;
            s[i] = rng.below(5) as usize;
        }
        1 => s.insert(0, rng.below(3) as usize),
        2 if !s.is_empty() => {
            s.remove(0);
        }
        _ => {}
    }
    s
}

/// Tensors of several dtypes: float ops must refuse the integer ones with an error.
fn tensor_of(shape: &[usize], dtype: DType, seed: u64) -> Tensor {
    randn(shape, seed).to_dtype(dtype).unwrap()
}

/// Elementwise binary ops, where_, masked_fill and broadcast_to: Ok exactly when the
/// shapes broadcast (and the dtypes are f32), with the broadcast shape; never a panic.
#[test]
fn broadcasting_ops_reject_bad_shapes() {
    run(
        config(128),
        &(any_shape(), any_shape(), any::<u64>(), any::<bool>()),
        |(sa, sb, seed, int_operand)| {
            let a = randn(&sa, seed);
            let b = if int_operand && seed % 4 == 0 {
                tensor_of(&sb, DType::I64, seed)
            } else {
                randn(&sb, seed ^ 1)
            };
            let float = b.dtype() == DType::F32;
            let want = broadcast(&sa, &sb);
            type Op = fn(&Tensor, &Tensor) -> rlhf_tensor::Result<Tensor>;
            let ops: [(&str, Op); 5] = [
                ("add", Tensor::add),
                ("sub", Tensor::sub),
                ("mul", Tensor::mul),
                ("div", Tensor::div),
                ("gt", Tensor::gt),
            ];
            for (name, op) in ops {
                match (op(&a, &b), &want) {
                    (Ok(c), Some(w)) if float => prop_assert_eq!(c.shape(), &w[..], "{}", name),
                    (Err(_), None) => {}
                    (Err(_), Some(_)) if !float => {}
                    (r, w) => prop_assert!(
                        false,
                        "{} {:?} {:?} ({:?}): {:?} but the shapes broadcast to {:?}",
                        name,
                        sa,
                        sb,
                        b.dtype(),
                        r.map(|t| t.shape().to_vec()),
                        w
                    ),
                }
            }
            let cond = tensor_of(&sb, DType::U8, seed);
            let r = Tensor::where_(&cond, &a, &a);
            prop_assert_eq!(r.is_ok(), want.is_some());
            let r = a.masked_fill(&cond, -1.0);
            prop_assert_eq!(
                r.is_ok(),
                want.as_deref() == Some(&sa[..]),
                "masked_fill {:?} with mask {:?}",
                sa,
                sb
            );
            let r = a.broadcast_to(&sb);
            prop_assert_eq!(
                r.is_ok(),
                expands_to(&sa, &sb),
                "broadcast_to {:?} -> {:?}",
                sa,
                sb
            );
            if let Ok(v) = r {
                prop_assert_eq!(v.to_f64_vec().len(), sb.iter().product::<usize>());
            }
            Ok(())
        },
    );
}

/// matmul on random ranks and sizes (zero-size dims included): Ok exactly when both are
/// at least 2-D, the inner sizes agree and the batch dims broadcast; the backward of an
/// accepted product gives each input a gradient of its own shape.
#[test]
fn matmul_rejects_bad_shapes() {
    run(
        config(128),
        &(any_shape(), any_shape(), any::<bool>(), any::<u64>()),
        |(sa, sb_pick, match_inner, seed)| {
            let mut sb = sb_pick;
            if match_inner && sa.len() >= 2 && sb.len() >= 2 {
                let r = sb.len();
                sb[r - 2] = sa[sa.len() - 1];
            }
            let valid = sa.len() >= 2 && sb.len() >= 2 && sa[sa.len() - 1] == sb[sb.len() - 2];
            let batch = if valid {
                broadcast(&sa[..sa.len() - 2], &sb[..sb.len() - 2])
            } else {
                None
            };
            let pa = Parameter::new(randn(&sa, seed));
            let pb = Parameter::new(randn(&sb, seed ^ 1));
            let r = pa.tensor().matmul(&pb.tensor());
            prop_assert_eq!(
                r.is_ok(),
                batch.is_some(),
                "{:?} x {:?}: {:?}",
                sa,
                sb,
                r.as_ref().err()
            );
            if let (Ok(c), Some(mut want)) = (r, batch) {
                want.extend([sa[sa.len() - 2], sb[sb.len() - 1]]);
                prop_assert_eq!(c.shape(), &want[..]);
                let (av, bv) = (pa.tensor().to_f64_vec(), pb.tensor().to_f64_vec());
                let cv = c.to_f64_vec();
                prop_assert_eq!(cv.len(), want.iter().product::<usize>());
                if av.is_empty() || bv.is_empty() {
                    // An empty inner dim sums nothing: zeros.
                    prop_assert!(cv.iter().all(|&x| x == 0.0), "{:?}", cv);
                }
                c.sum_all().unwrap().backward().map_err(|e| {
                    TestCaseError::fail(format!("backward of {sa:?} x {sb:?}: {e}"))
                })?;
                let (ga, gb) = (pa.grad().unwrap(), pb.grad().unwrap());
                prop_assert_eq!(ga.shape(), &sa[..]);
                prop_assert_eq!(gb.shape(), &sb[..]);
            }
            let bf = pa.tensor().to_dtype(DType::BF16).unwrap();
            prop_assert!(
                bf.matmul(&pb.tensor()).is_err(),
                "bf16 compute is not a CPU op"
            );
            Ok(())
        },
    );
}

/// concat and stack: Ok exactly when ranks and the other dims agree and the dim is in range.
#[test]
fn concat_and_stack_reject_bad_shapes() {
    run(
        config(128),
        &(any_shape(), 0usize..4, -6isize..6, any::<u64>()),
        |(base, parts, dim, seed)| {
            let mut rng = Rng::new(seed);
            let shapes: Vec<Vec<usize>> = (0..parts).map(|_| near(&base, &mut rng)).collect();
            let ts: Vec<Tensor> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| randn(s, seed ^ i as u64))
                .collect();
            let refs: Vec<&Tensor> = ts.iter().collect();
            let valid = match shapes.first() {
                None => false,
                Some(first) => resolve(dim, first.len()).is_some_and(|d| {
                    shapes.iter().all(|s| {
                        s.len() == first.len() && (0..s.len()).all(|i| i == d || s[i] == first[i])
                    })
                }),
            };
            let r = Tensor::concat(&refs, dim);
            prop_assert_eq!(
                r.is_ok(),
                valid,
                "concat {:?} along {}: {:?}",
                shapes,
                dim,
                r.as_ref().err()
            );
            if let Ok(c) = r {
                let d = resolve(dim, shapes[0].len()).unwrap();
                prop_assert_eq!(c.shape()[d], shapes.iter().map(|s| s[d]).sum::<usize>());
                prop_assert_eq!(c.to_f64_vec().len(), c.numel());
            }
            let valid = !shapes.is_empty()
                && shapes.iter().all(|s| s == &shapes[0])
                && resolve(dim, shapes[0].len() + 1).is_some();
            let r = Tensor::stack(&refs, dim);
            prop_assert_eq!(r.is_ok(), valid, "stack {:?} along {}", shapes, dim);
            Ok(())
        },
    );
}

/// layer_norm: Ok exactly when the input has a last dim and weight and bias are [last].
#[test]
fn layer_norm_rejects_bad_shapes() {
    run(
        config(128),
        &(any_shape(), any_shape(), any::<bool>(), any::<u64>()),
        |(s, sw, right, seed)| {
            let last = s.last().copied();
            let sw = if right {
                last.map(|l| vec![l]).unwrap_or(sw)
            } else {
                sw
            };
            let sb = if seed % 3 == 0 {
                near(&sw, &mut Rng::new(seed))
            } else {
                sw.clone()
            };
            let valid = last.is_some_and(|l| sw == [l] && sb == [l]);
            let r = randn(&s, seed).layer_norm(&randn(&sw, seed ^ 1), &randn(&sb, seed ^ 2), 1e-5);
            prop_assert_eq!(r.is_ok(), valid, "{:?} weight {:?} bias {:?}", s, sw, sb);
            if let Ok(y) = r {
                prop_assert_eq!(y.shape(), &s[..]);
            }
            Ok(())
        },
    );
}

/// embedding and gather_last: ids out of range (negative ones included) and non-integer
/// ids are errors that name the op.
#[test]
fn index_ops_reject_bad_ids() {
    run(
        config(128),
        &(
            shape(0..=2, 0..=4, 16),
            0usize..6,
            0usize..4,
            -3i64..1,
            1i64..9,
            1usize..4,
            any::<bool>(),
            any::<u64>(),
        ),
        |(id_shape, vocab, d, lo, hi, table_rank, float_ids, seed)| {
            let mut rng = Rng::new(seed);
            let raw: Vec<i64> = (0..id_shape.iter().product::<usize>())
                .map(|_| lo + rng.below((hi - lo) as u64) as i64)
                .collect();
            let in_range = raw.iter().all(|&i| i >= 0 && (i as usize) < vocab);
            let ids = Tensor::from_vec(raw.clone(), &id_shape).unwrap();
            let ids = if float_ids {
                ids.to_dtype(DType::F32).unwrap()
            } else {
                ids
            };
            let table_shape: Vec<usize> = match table_rank {
                2 => vec![vocab, d],
                1 => vec![vocab],
                _ => vec![vocab, d, 2],
            };
            let r = Tensor::embedding(&ids, &randn(&table_shape, seed));
            let valid = table_rank == 2 && in_range && !float_ids;
            prop_assert_eq!(
                r.is_ok(),
                valid,
                "embedding ids {:?} into {:?}: {:?}",
                raw,
                table_shape,
                r.as_ref().err()
            );
            if let Err(e) = r {
                prop_assert!(
                    e.to_string().contains("embedding") || e.to_string().contains("indices"),
                    "{}",
                    e
                );
            }
            // gather_last: x [.., vocab] and idx [.., K] with the same leading dims.
            let mut xs = id_shape.clone();
            xs.push(vocab);
            let idx = ids.unsqueeze(-1).unwrap();
            let r = randn(&xs, seed).gather_last(&idx);
            prop_assert_eq!(
                r.is_ok(),
                in_range && !float_ids,
                "gather_last {:?} from {:?}",
                raw,
                xs
            );
            // An index one rank above the input cannot line up with its leading dims.
            prop_assert!(randn(&id_shape, seed).gather_last(&idx).is_err());
            Ok(())
        },
    );
}

/// cross_entropy: targets must match the logits' leading dims and lie in 0..vocab unless
/// ignored; weights must match the targets.
#[test]
fn cross_entropy_rejects_bad_targets() {
    run(
        config(128),
        &(
            shape(0..=2, 0..=4, 16),
            0usize..6,
            -3i64..1,
            1i64..9,
            prop::option::of(-2i64..1),
            any::<bool>(),
            0u8..3,
            any::<u64>(),
        ),
        |(lead, vocab, lo, hi, ignore, target_shape_ok, weights_mode, seed)| {
            let mut rng = Rng::new(seed);
            let ts = if target_shape_ok {
                lead.clone()
            } else {
                near(&lead, &mut rng)
            };
            let raw: Vec<i64> = (0..ts.iter().product::<usize>())
                .map(|_| lo + rng.below((hi - lo) as u64) as i64)
                .collect();
            let targets = Tensor::from_vec(raw.clone(), &ts).unwrap();
            let ws = match weights_mode {
                0 => None,
                1 => Some(ts.clone()),
                _ => Some(near(&ts, &mut rng)),
            };
            let weights = ws.as_ref().map(|s| Tensor::rand_uniform(s, 0.0, 2.0, seed));
            let mut ls = lead.clone();
            ls.push(vocab);
            let valid = ts == lead
                && ws.as_ref().is_none_or(|w| w == &ts)
                && raw
                    .iter()
                    .all(|&t| Some(t) == ignore || (t >= 0 && (t as usize) < vocab));
            let r = randn(&ls, seed).cross_entropy(&targets, ignore, weights.as_ref());
            prop_assert_eq!(
                r.is_ok(),
                valid,
                "logits {:?} targets {:?} {:?} weights {:?} ignore {:?}: {:?}",
                ls,
                ts,
                raw,
                ws,
                ignore,
                r.as_ref().err()
            );
            if let Ok(l) = r {
                prop_assert!(l.item().unwrap().is_finite());
            }
            let float_targets = targets.to_dtype(DType::F32).unwrap();
            prop_assert!(randn(&ls, seed)
                .cross_entropy(&float_targets, ignore, None)
                .is_err());
            Ok(())
        },
    );
}

/// narrow, reshape, permute, transpose, squeeze, unsqueeze and the reductions with
/// random (often invalid) arguments, huge sizes included.
#[test]
fn view_and_reduction_args_are_checked() {
    run(
        config(128),
        &(
            any_shape(),
            -6isize..6,
            0usize..6,
            0usize..6,
            any::<bool>(),
            prop::collection::vec(-2isize..7, 0..5),
            prop::collection::vec(0usize..5, 0..5),
            any::<bool>(),
            any::<u64>(),
        ),
        |(s, dim, start, len, huge, spec, perm, keepdim, seed)| {
            let x = randn(&s, seed);
            let rank = s.len();
            let d = resolve(dim, rank);
            let numel: usize = s.iter().product();

            let (start, len) = if huge && seed % 2 == 0 {
                (start, usize::MAX - start / 2)
            } else {
                (start, len)
            };
            let r = x.narrow(dim, start, len);
            prop_assert_eq!(
                r.is_ok(),
                d.is_some_and(|d| start.checked_add(len).is_some_and(|e| e <= s[d])),
                "narrow({}, {}, {}) of {:?}",
                dim,
                start,
                len,
                s
            );
            if let Ok(v) = r {
                prop_assert_eq!(v.to_f64_vec().len(), v.numel());
            }

            // reshape: at most one -1, no other negatives, and the sizes must multiply to numel.
            let spec: Vec<isize> = if huge && seed % 2 == 1 {
                vec![1 << 40, 1 << 40, 0]
            } else {
                spec
            };
            let r = x.reshape(&spec);
            let holes = spec.iter().filter(|&&v| v == -1).count();
            // The sizes given must have an element count that fits in usize (zero dims aside).
            let known = spec
                .iter()
                .filter(|&&v| v > 0)
                .try_fold(1usize, |acc, &v| acc.checked_mul(v as usize))
                .map(|k| if spec.contains(&0) { 0 } else { k });
            let valid = spec.iter().all(|&v| v >= -1)
                && match (holes, known) {
                    (0, Some(k)) => k == numel,
                    (1, Some(k)) => k > 0 && numel.is_multiple_of(k),
                    _ => false,
                };
            prop_assert_eq!(
                r.is_ok(),
                valid,
                "reshape {:?} of {:?}: {:?}",
                spec,
                s,
                r.as_ref().map(|t| t.shape().to_vec())
            );
            if let Ok(v) = r {
                prop_assert_eq!(v.numel(), numel);
                prop_assert_eq!(v.to_f64_vec().len(), numel);
            }

            prop_assert!(
                x.broadcast_to(&[1 << 40, 1 << 40, 1 << 40]).is_err(),
                "an element count that overflows usize"
            );

            let mut sorted = perm.clone();
            sorted.sort_unstable();
            let r = x.permute(&perm);
            prop_assert_eq!(
                r.is_ok(),
                sorted == (0..rank).collect::<Vec<_>>(),
                "permute {:?} of {:?}",
                perm,
                s
            );

            let other = -(dim + 1);
            prop_assert_eq!(
                x.transpose(dim, other).is_ok(),
                d.is_some() && resolve(other, rank).is_some()
            );
            prop_assert_eq!(x.squeeze(dim).is_ok(), d.is_some_and(|d| s[d] == 1));
            prop_assert_eq!(x.unsqueeze(dim).is_ok(), resolve(dim, rank + 1).is_some());

            prop_assert_eq!(x.sum(dim, keepdim).is_ok(), d.is_some());
            prop_assert_eq!(x.mean(dim, keepdim).is_ok(), d.is_some());
            prop_assert_eq!(x.var(dim, keepdim, false).is_ok(), d.is_some());
            prop_assert_eq!(x.softmax(dim).is_ok(), d.is_some());
            prop_assert_eq!(x.log_softmax(dim).is_ok(), d.is_some());
            // max has nothing to return over an empty dim.
            prop_assert_eq!(x.max(dim, keepdim).is_ok(), d.is_some_and(|d| s[d] > 0));
            prop_assert_eq!(x.argmax(dim, keepdim).is_ok(), d.is_some_and(|d| s[d] > 0));
            prop_assert_eq!(
                x.logsumexp(dim, keepdim).is_ok(),
                d.is_some_and(|d| s[d] > 0)
            );
            if let Some(d) = d {
                let sum = x.sum(dim, keepdim).unwrap();
                let mut want = s.clone();
                if keepdim {
                    want[d] = 1
                } else {
                    want.remove(d);
                }
                prop_assert_eq!(sum.shape(), &want[..]);
                prop_assert_eq!(sum.to_f64_vec().len(), want.iter().product::<usize>());
            }
            // Float ops on integer tensors are errors, not panics.
            let xi = tensor_of(&s, DType::I32, seed);
            prop_assert!(xi.exp().is_err() && xi.sum_all().is_err() && xi.softmax(-1).is_err());
            // backward needs a one-element output, and an explicit seed of the output's shape.
            let p = Parameter::new(x.clone());
            let y = p.tensor().mul_scalar(2.0).unwrap();
            prop_assert_eq!(y.backward().is_ok(), numel == 1);
            prop_assert!(y.backward_with(Tensor::zeros(&[numel + 1])).is_err());
            Ok(())
        },
    );
}

/// Attention shapes, dropout rates and constructors: checked, never a panic.
#[test]
fn attention_dropout_and_constructors_are_checked() {
    run(
        config(128),
        &(
            any_shape(),
            any_shape(),
            any::<bool>(),
            prop::sample::select(vec![-0.5f32, 0.0, 0.3, 0.999, 1.0, 2.0, f32::NAN]),
            0usize..20,
            any::<u64>(),
        ),
        |(sq, pick_k, same, p, len, seed)| {
            let sk = if same { sq.clone() } else { pick_k };
            let (q, k) = (randn(&sq, seed), randn(&sk, seed ^ 1));
            let r = sq.len();
            let valid = r >= 2
                && sk.len() == r
                && sq[..r - 2] == sk[..r - 2]
                && sq[r - 1] == sk[r - 1]
                && sq[r - 2] <= sk[r - 2];
            let fused = Tensor::causal_attention(&q, &k, &k);
            let composed = Tensor::causal_attention_reference(&q, &k, &k);
            prop_assert_eq!(
                fused.is_ok(),
                valid,
                "attention q {:?} k {:?}: {:?}",
                sq,
                sk,
                fused.as_ref().err()
            );
            prop_assert_eq!(composed.is_ok(), valid);
            let r = q.dropout(p, seed);
            prop_assert_eq!(r.is_ok(), (0.0..1.0).contains(&p), "dropout p = {}", p);
            let n: usize = sq.iter().product();
            prop_assert_eq!(Tensor::from_vec(vec![0.0f32; len], &sq).is_ok(), len == n);
            // A shape whose element count overflows usize is refused, whatever the data.
            prop_assert!(Tensor::from_vec(vec![0.0f32; len], &[1 << 40, 1 << 40, len]).is_err());
            Ok(())
        },
    );
}
