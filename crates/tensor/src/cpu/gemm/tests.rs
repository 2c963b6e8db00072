//! Every available kernel against `sgemm_reference`: random shapes, transposed and sub-matrix
//! views, alpha/beta, NaN in C with beta = 0, empty and unit dimensions, thread-count
//! independence and the bounds errors.

use super::*;
use proptest::prelude::*;

/// xorshift64*: cheap reproducible values in [-1, 1) without storing them in the proptest case.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40; // 24 bits
        bits as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn fill(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.next_f32()).collect()
    }
}

/// Storage for a `rows × cols` operand, optionally stored transposed, with `pad` extra elements
/// per stored row and `offset` leading elements, so the view is a sub-matrix of a larger buffer.
struct Operand {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
    transposed: bool,
    ld: usize,
    offset: usize,
}

impl Operand {
    fn new(
        rng: &mut Rng,
        rows: usize,
        cols: usize,
        transposed: bool,
        pad: usize,
        offset: usize,
    ) -> Self {
        let (stored_rows, stored_cols) = if transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let ld = stored_cols + pad;
        let data = rng.fill(offset + stored_rows * ld);
        Operand {
            data,
            rows,
            cols,
            transposed,
            ld,
            offset,
        }
    }

    fn view(&self) -> MatRef<'_> {
        let (row_stride, col_stride) = if self.transposed {
            (1, self.ld)
        } else {
            (self.ld, 1)
        };
        MatRef {
            data: &self.data[self.offset..],
            rows: self.rows,
            cols: self.cols,
            row_stride,
            col_stride,
        }
    }
}

struct Case {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    pad: usize,
    alpha: f32,
    beta: f32,
    seed: u64,
}

/// Runs `isa` and the reference on the same inputs and checks every element of C's buffer:
/// inside the view within the error bound, outside it untouched (bitwise).
fn check_case(isa: Isa, case: &Case) {
    let Case {
        m,
        n,
        k,
        pad,
        alpha,
        beta,
        ..
    } = *case;
    let mut rng = Rng(case.seed | 1);
    let a = Operand::new(&mut rng, m, k, case.trans_a, pad, pad);
    let b = Operand::new(&mut rng, k, n, case.trans_b, pad + 1, 3);
    let ldc = n + pad;
    let mut c0 = rng.fill(m * ldc + 2);
    if beta == 0.0 {
        // C must not be read: NaNs in it may not reach the result.
        c0.iter_mut().step_by(3).for_each(|x| *x = f32::NAN);
    }
    let mut got = c0.clone();
    let mut want = c0.clone();
    sgemm_with(
        isa,
        alpha,
        a.view(),
        b.view(),
        beta,
        MatMut {
            data: &mut got[1..],
            rows: m,
            cols: n,
            row_stride: ldc,
        },
    )
    .unwrap();
    sgemm_reference(
        alpha,
        a.view(),
        b.view(),
        beta,
        MatMut {
            data: &mut want[1..],
            rows: m,
            cols: n,
            row_stride: ldc,
        },
    )
    .unwrap();
    let (av, bv) = (a.view(), b.view());
    for (idx, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let inside = idx >= 1 && (idx - 1) / ldc < m && (idx - 1) % ldc < n;
        if !inside {
            assert_eq!(
                g.to_bits(),
                c0[idx].to_bits(),
                "{isa:?}: element {idx} outside C's view changed"
            );
            continue;
        }
        let (i, j) = ((idx - 1) / ldc, (idx - 1) % ldc);
        // Both sums are within k·eps·Σ|a||b| of the exact value; allow a factor for the final
        // alpha/beta rounding.
        let mag: f64 = (0..k)
            .map(|p| (av.at(i, p) as f64 * bv.at(p, j) as f64).abs())
            .sum();
        let c_term = if beta == 0.0 {
            0.0
        } else {
            (beta as f64 * c0[idx] as f64).abs()
        };
        let tol =
            2.0 * (k as f64 + 2.0) * f32::EPSILON as f64 * (alpha.abs() as f64 * mag + c_term)
                + 1e-30;
        assert!(
            g.is_finite() && ((g as f64) - (w as f64)).abs() <= tol,
            "{isa:?} m={m} n={n} k={k} ta={} tb={} alpha={alpha} beta={beta}: C[{i}][{j}] = {g}, reference {w}, tol {tol}",
            case.trans_a,
            case.trans_b
        );
    }
}

fn scalar_choice() -> impl Strategy<Value = f32> {
    prop_oneof![Just(1.0f32), Just(0.0f32), Just(-0.5f32), -2.0f32..2.0f32]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 28, ..ProptestConfig::default() })]

    #[test]
    fn every_isa_matches_reference(
        m in 1usize..300, n in 1usize..300, k in 1usize..300,
        trans_a in any::<bool>(), trans_b in any::<bool>(), pad in 0usize..5,
        alpha in scalar_choice(), beta in scalar_choice(), seed in any::<u64>(),
    ) {
        // alpha = 0 is a legal product too, but mostly exercise a non-zero one.
        let alpha = if alpha == 0.0 { 0.75 } else { alpha };
        let case = Case { m, n, k, trans_a, trans_b, pad, alpha, beta, seed };
        for isa in Isa::available() {
            check_case(isa, &case);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Matrix-vector shapes (m = 1 or n = 1) take their own loops; long k and many outputs.
    #[test]
    fn vector_shapes_match_reference(
        row in any::<bool>(), len in 1usize..3000, k in 1usize..1500,
        trans_a in any::<bool>(), trans_b in any::<bool>(), pad in 0usize..3,
        alpha in scalar_choice(), beta in scalar_choice(), seed in any::<u64>(),
    ) {
        let alpha = if alpha == 0.0 { 1.5 } else { alpha };
        let (m, n) = if row { (1, len) } else { (len, 1) };
        let case = Case { m, n, k, trans_a, trans_b, pad, alpha, beta, seed };
        for isa in Isa::available() {
            check_case(isa, &case);
        }
    }
}

#[test]
fn empty_and_unit_dimensions() {
    let dims = [0usize, 1, 2, 17, 33];
    for isa in Isa::available() {
        for &m in &dims {
            for &n in &dims {
                for &k in &dims {
                    for (alpha, beta) in [(1.0, 0.0), (0.5, 2.0)] {
                        let case = Case {
                            m,
                            n,
                            k,
                            trans_a: m % 2 == 1,
                            trans_b: n == 1,
                            pad: 1,
                            alpha,
                            beta,
                            seed: (m * 1000 + n * 10 + k) as u64,
                        };
                        check_case(isa, &case);
                    }
                }
            }
        }
    }
}

#[test]
fn k_zero_scales_c() {
    for isa in Isa::available() {
        let mut c = vec![1.0, 2.0, f32::NAN, 4.0];
        sgemm_with(
            isa,
            1.0,
            MatRef::row_major(&[], 2, 0),
            MatRef::row_major(&[], 0, 2),
            0.0,
            MatMut::row_major(&mut c, 2, 2),
        )
        .unwrap();
        assert_eq!(c, vec![0.0; 4]);
        let mut c = vec![1.0, 2.0, 3.0, 4.0];
        sgemm_with(
            isa,
            1.0,
            MatRef::row_major(&[], 2, 0),
            MatRef::row_major(&[], 0, 2),
            3.0,
            MatMut::row_major(&mut c, 2, 2),
        )
        .unwrap();
        assert_eq!(c, vec![3.0, 6.0, 9.0, 12.0]);
    }
}

/// The block sizes (MR, NR, KC, MC, NC) of the kernel `isa` runs.
fn blocking(isa: Isa) -> [usize; 5] {
    use super::kernels::{Microkernel, Scalar};
    fn of<K: Microkernel>() -> [usize; 5] {
        [K::MR, K::NR, K::KC, K::MC, K::NC]
    }
    match isa {
        Isa::Scalar => of::<Scalar>(),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => of::<super::kernels::Avx2>(),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => of::<super::kernels::Avx512>(),
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!(),
    }
}

#[test]
fn crosses_every_block_boundary() {
    // Just past one MC block, one NC panel and one KC block, with edge tiles in both directions:
    // the random shapes above are too small to reach the AVX-512 blocks. Rows and columns cross
    // in separate cases to keep the naive reference cheap.
    for isa in Isa::available() {
        let [mr, nr, kc, mc, nc] = blocking(isa);
        let shapes = [(mc + mr + 1, 45, kc + 5), (20, nc + nr + 3, kc + 5)];
        for (idx, &(m, n, k)) in shapes.iter().enumerate() {
            for (trans_a, trans_b) in [(false, false), (true, true)] {
                let case = Case {
                    m,
                    n,
                    k,
                    trans_a,
                    trans_b,
                    pad: 2,
                    alpha: 0.8,
                    beta: 0.5,
                    seed: 77 + idx as u64,
                };
                check_case(isa, &case);
            }
        }
    }
}

/// Runs sgemm in a fresh pool of `threads` threads and returns C.
fn run_in_pool(isa: Isa, threads: usize, m: usize, n: usize, k: usize, trans_b: bool) -> Vec<f32> {
    let mut rng = Rng(0x5eed ^ (m * n * k) as u64);
    let a = Operand::new(&mut rng, m, k, false, 0, 0);
    let b = Operand::new(&mut rng, k, n, trans_b, 2, 0);
    let mut c = rng.fill(m * n);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        sgemm_with(
            isa,
            1.25,
            a.view(),
            b.view(),
            0.5,
            MatMut::row_major(&mut c, m, n),
        )
    })
    .unwrap();
    c
}

#[test]
fn bitwise_identical_across_thread_counts() {
    // Shapes that cross several KC blocks (k = 1700), MC blocks, NC panels and edge tiles.
    for isa in Isa::available() {
        for &(m, n, k, trans_b) in &[
            (301, 517, 611, false),
            (700, 90, 300, true),
            (30, 2100, 260, false),
            (61, 75, 1700, false),
            (1, 3000, 700, false),
            (1, 3000, 700, true),
            (3000, 1, 700, false),
        ] {
            assert!(
                2 * m * n * k >= PARALLEL_MIN_FLOPS,
                "shape must take the threaded path"
            );
            let one = run_in_pool(isa, 1, m, n, k, trans_b);
            for threads in [2, 3] {
                let many = run_in_pool(isa, threads, m, n, k, trans_b);
                let same = one
                    .iter()
                    .zip(&many)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{isa:?} {m}x{n}x{k}: 1 and {threads} threads differ");
            }
        }
    }
}

#[test]
fn bounds_and_shape_errors() {
    let a = vec![1.0f32; 6];
    let b = vec![1.0f32; 6];
    let mut c = vec![0.0f32; 4];
    let ok_a = MatRef::row_major(&a, 2, 3);
    let ok_b = MatRef::row_major(&b, 3, 2);
    for isa in Isa::available() {
        assert!(sgemm_with(isa, 1.0, ok_a, ok_b, 0.0, MatMut::row_major(&mut c, 2, 2)).is_ok());
        // A's rows run past its slice.
        let long_a = MatRef {
            row_stride: 4,
            ..ok_a
        };
        let err =
            sgemm_with(isa, 1.0, long_a, ok_b, 0.0, MatMut::row_major(&mut c, 2, 2)).unwrap_err();
        assert!(err.to_string().contains("A: 2×3"), "{err}");
        // A column stride that overflows usize.
        let huge_b = MatRef {
            col_stride: usize::MAX,
            ..ok_b
        };
        let err =
            sgemm_with(isa, 1.0, ok_a, huge_b, 0.0, MatMut::row_major(&mut c, 2, 2)).unwrap_err();
        assert!(err.to_string().contains("beyond usize::MAX"), "{err}");
        // C too short for its row stride.
        let err = sgemm_with(
            isa,
            1.0,
            ok_a,
            ok_b,
            0.0,
            MatMut {
                data: &mut c,
                rows: 2,
                cols: 2,
                row_stride: 3,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("C: 2×2"), "{err}");
        // Overlapping rows of C.
        let err = sgemm_with(
            isa,
            1.0,
            ok_a,
            ok_b,
            0.0,
            MatMut {
                data: &mut c,
                rows: 2,
                cols: 2,
                row_stride: 1,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("overlap"), "{err}");
        // Inner dimensions disagree.
        let err =
            sgemm_with(isa, 1.0, ok_a, ok_a, 0.0, MatMut::row_major(&mut c, 2, 2)).unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
        // C of the wrong shape.
        let err =
            sgemm_with(isa, 1.0, ok_a, ok_b, 0.0, MatMut::row_major(&mut c, 1, 2)).unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    }
    // The reference validates the same way.
    assert!(sgemm_reference(
        1.0,
        MatRef {
            row_stride: 4,
            ..ok_a
        },
        ok_b,
        0.0,
        MatMut::row_major(&mut c, 2, 2)
    )
    .is_err());
}

/// C from `sgemm_bias_with` and from `sgemm_with` followed by adding the bias to each row.
fn bias_pair(isa: Isa, case: &Case) -> (Vec<f32>, Vec<f32>) {
    let (m, n, k) = (case.m, case.n, case.k);
    let mut rng = Rng(case.seed | 1);
    let a = Operand::new(&mut rng, m, k, case.trans_a, case.pad, 1);
    let b = Operand::new(&mut rng, k, n, case.trans_b, case.pad, 2);
    let bias = rng.fill(n);
    let c0 = rng.fill(m * n);
    fn mat(c: &mut [f32], m: usize, n: usize) -> MatMut<'_> {
        MatMut {
            data: c,
            rows: m,
            cols: n,
            row_stride: n,
        }
    }
    let (mut fused, mut split) = (c0.clone(), c0);
    sgemm_bias_with(
        isa,
        case.alpha,
        a.view(),
        b.view(),
        case.beta,
        Some(&bias),
        mat(&mut fused, m, n),
    )
    .unwrap();
    sgemm_with(
        isa,
        case.alpha,
        a.view(),
        b.view(),
        case.beta,
        mat(&mut split, m, n),
    )
    .unwrap();
    for row in split.chunks_mut(n.max(1)) {
        row.iter_mut().zip(&bias).for_each(|(x, &b)| *x += b);
    }
    (fused, split)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// The bias epilogue (a linear layer) is bitwise the GEMM followed by a bias add: the bias
    /// goes in after the last k block, with its own rounding. Shapes cover edge tiles, several
    /// k blocks (k past every kernel's KC), matrix-vector shapes and k = 0.
    #[test]
    fn bias_epilogue_is_bitwise_gemm_then_add(
        m in prop_oneof![Just(1usize), 1usize..60], n in prop_oneof![Just(1usize), 1usize..80],
        k in prop_oneof![Just(0usize), 1usize..40, 700usize..1700],
        trans_a in any::<bool>(), trans_b in any::<bool>(), pad in 0usize..3,
        alpha in scalar_choice(), beta in scalar_choice(), seed in any::<u64>(),
    ) {
        let case = Case { m, n, k, trans_a, trans_b, pad, alpha, beta, seed };
        for isa in Isa::available() {
            let (fused, split) = bias_pair(isa, &case);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&fused), bits(&split), "{:?} m={} n={} k={}", isa, m, n, k);
        }
    }
}

#[test]
fn bias_of_the_wrong_length_is_an_error() {
    let (a, b) = (vec![1.0f32; 6], vec![1.0f32; 6]);
    let mut c = vec![0.0f32; 4];
    let e = sgemm_bias(
        1.0,
        MatRef::row_major(&a, 2, 3),
        MatRef::row_major(&b, 3, 2),
        0.0,
        &[1.0; 3],
        MatMut {
            data: &mut c,
            rows: 2,
            cols: 2,
            row_stride: 2,
        },
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("bias has 3 values for 2 columns"),
        "{e}"
    );
}
