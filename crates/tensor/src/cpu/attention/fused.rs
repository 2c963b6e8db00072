//! The tiled (flash-attention style) kernels behind [`super::causal_attention_forward`] and
//! [`super::causal_attention_backward`].
//!
//! Forward: one task per (head, block of `BQ` query rows). It walks the key blocks of `BK` keys
//! that its rows can see, computes the `BQ×BK` score tile, folds it into a running max `m`,
//! running sum `l` and unnormalised output `o` (the online softmax), and divides by `l` at the
//! end. Key blocks wholly above the causal diagonal are never visited, so causal attention costs
//! about half the flops of full attention; only one score tile per task is alive at a time.
//!
//! Backward (flash-attention-2): one task per (head, contiguous group of key blocks). For each of
//! its key blocks it walks the query blocks that see it, recomputes `P = exp(s·scale − lse)`,
//! and accumulates `dV += Pᵀ·dO`, `dK += dSᵀ·Q` (both local to the key block) and
//! `dQ += dS·K` (into the task's own `dQ` buffer), with `dS = scale·P⊙(dP − D)`,
//! `dP = dO·Vᵀ` and `D_i = rowsum(dO⊙O)`. When a head is split into several groups (few heads:
//! see [`MIN_BWD_TASKS`]) the groups' `dQ` buffers are summed afterwards in group order.
//!
//! Dropout ([`AttentionDropout`], when given): the forward multiplies each probability tile by
//! its dropout factors after the running sum has taken it (the normaliser is the undropped
//! one) and before the product with `V`; the backward multiplies `dP` by the same factors and
//! uses `P ⊙ Z` for `dV`, re-deriving each factor from its (head, query, key) indices.
//!
//! Determinism: the decomposition into tasks, the order of every sum and the group count depend
//! only on the shape and the instruction set, never on the thread count, so results are
//! bitwise-identical for any number of threads.
//!
//! Every block product goes through [`gemm_impl`]: a register tile of `TILE_ROWS` rows by
//! `TILE_VECS` vectors, one broadcast of the left operand and one vector load of the right
//! operand per step. The right operands must have rows of whole vectors: `Kᵀ` and `Vᵀ` are
//! packed as `[d][BK]` with zero columns past the last key (the forward packs every key block
//! of `K` once per call, up front); `V`, `K`, `Q` and `dO` are read in place when `d` is a
//! multiple of the vector width, else copied into rows of `dp` floats (`d` rounded up, zero
//! padded).

use super::simd::Simd;
use super::{AttentionDropout, AttentionShape};
use crate::cpu::Isa;
use rayon::prelude::*;

/// Query rows per tile.
const BQ: usize = 64;
/// Keys per tile; a multiple of every vector width (16).
const BK: usize = 64;
/// The backward splits heads into groups of key blocks until there are about this many tasks,
/// so that a few long sequences still keep every core busy. Fixed, not derived from the thread
/// count, so that results do not depend on it.
const MIN_BWD_TASKS: usize = 32;

/// One register-tiled product `out[r][0..nvec·W] (+)= Σ_t a(r, t) · b[t][0..nvec·W]` for
/// `r < rows`, `t < n_t`, where `a(r, t) = a[r·a_rs + t·a_cs]`, `b[t][j] = b[t·b_rs + j]` and
/// `out[r][j] = out[r·out_rs + j]`. With `acc` it adds the sum to `out`; without, it writes
/// `scale · sum` (folding the softmax scale into the score tile saves a pass over it).
///
/// Bounds (the promise `Simd::gemm` callers make): every `a(r, t)` readable, `b[t][0..nvec·W]`
/// readable, `out[r][0..nvec·W]` writable (and readable with `acc`). [`gemm`] checks them.
#[derive(Clone, Copy)]
pub(super) struct Gemm {
    rows: usize,
    nvec: usize,
    n_t: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    out: *mut f32,
    out_rs: usize,
    acc: bool,
    scale: f32,
}

/// How [`gemm`] treats its output.
#[derive(Clone, Copy)]
enum Acc {
    /// `out += Σ`.
    Add,
    /// `out = scale · Σ`.
    Overwrite { scale: f32 },
}

/// Checks a [`Gemm`]'s bounds against the slices and runs it.
///
/// # Safety
/// The CPU has `S`'s instruction set.
#[allow(clippy::too_many_arguments)] // the arguments are the product's shape and strides
#[inline(always)]
unsafe fn gemm<S: Simd>(
    rows: usize,
    nvec: usize,
    n_t: usize,
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs): (&[f32], usize),
    (out, out_rs): (&mut [f32], usize),
    acc: Acc,
) {
    if rows == 0 || nvec == 0 {
        return;
    }
    let width = nvec * S::W;
    assert!(
        (rows - 1) * out_rs + width <= out.len(),
        "attention gemm: output tile out of bounds"
    );
    if n_t > 0 {
        assert!(
            (rows - 1) * a_rs + (n_t - 1) * a_cs < a.len(),
            "attention gemm: left operand out of bounds"
        );
        assert!(
            (n_t - 1) * b_rs + width <= b.len(),
            "attention gemm: right operand out of bounds"
        );
    }
    let g = Gemm {
        rows,
        nvec,
        n_t,
        a: a.as_ptr(),
        a_rs,
        a_cs,
        b: b.as_ptr(),
        b_rs,
        out: out.as_mut_ptr(),
        out_rs,
        acc: matches!(acc, Acc::Add),
        scale: match acc {
            Acc::Add => 1.0,
            Acc::Overwrite { scale } => scale,
        },
    };
    // SAFETY: the bounds `Gemm` documents were asserted above; the caller promises the CPU
    // has `S`'s instruction set.
    unsafe { S::gemm(g) }
}

/// The tile loop of [`Gemm`]; instantiated once per instruction set inside a
/// `#[target_feature]` function (see `simd.rs`).
///
/// # Safety
/// The CPU has `S`'s instruction set and `g` is within the bounds `Gemm` documents.
#[inline(always)]
pub(super) unsafe fn gemm_impl<S: Simd>(g: Gemm) {
    let mut r0 = 0;
    while r0 < g.rows {
        let rr = S::TILE_ROWS.min(g.rows - r0);
        let mut v0 = 0;
        while v0 < g.nvec {
            let vv = S::TILE_VECS.min(g.nvec - v0);
            // SAFETY: row `r0 + r` and vector `v0 + v` of the tile lie inside `g`'s bounds for
            // r < rr ≤ rows − r0 and v < vv ≤ nvec − v0.
            unsafe {
                let t = Gemm {
                    a: g.a.add(r0 * g.a_rs),
                    b: g.b.add(v0 * S::W),
                    out: g.out.add(r0 * g.out_rs + v0 * S::W),
                    ..g
                };
                match rr {
                    1 => tile_vecs::<S, 1>(vv, t),
                    2 => tile_vecs::<S, 2>(vv, t),
                    3 => tile_vecs::<S, 3>(vv, t),
                    4 => tile_vecs::<S, 4>(vv, t),
                    5 => tile_vecs::<S, 5>(vv, t),
                    _ => tile_vecs::<S, 6>(vv, t),
                }
            }
            v0 += vv;
        }
        r0 += rr;
    }
}

/// # Safety
/// As [`tile`] with `NV = vv ≤ 4`.
#[inline(always)]
unsafe fn tile_vecs<S: Simd, const R: usize>(vv: usize, g: Gemm) {
    // SAFETY: forwarded.
    unsafe {
        match vv {
            1 => tile::<S, R, 1>(g),
            2 => tile::<S, R, 2>(g),
            3 => tile::<S, R, 3>(g),
            _ => tile::<S, R, 4>(g),
        }
    }
}

/// One `R × NV`-vector register tile: the accumulators live in registers for the whole `t` loop.
///
/// # Safety
/// The CPU has `S`'s set; `a(r, t)`, `b[t][0..NV·W]` and `out[r][0..NV·W]` are in bounds for
/// `r < R`, `t < g.n_t`.
#[allow(clippy::needless_range_loop)] // the indices also address the pointers
#[inline(always)]
unsafe fn tile<S: Simd, const R: usize, const NV: usize>(g: Gemm) {
    // SAFETY: every address below is one the caller promised to be in bounds.
    unsafe {
        let mut c = [[S::splat(0.0); NV]; R];
        if g.acc {
            for r in 0..R {
                for v in 0..NV {
                    c[r][v] = S::load(g.out.add(r * g.out_rs + v * S::W));
                }
            }
        }
        for t in 0..g.n_t {
            let bp = g.b.add(t * g.b_rs);
            let mut bv = [S::splat(0.0); NV];
            for v in 0..NV {
                bv[v] = S::load(bp.add(v * S::W));
            }
            let ap = g.a.add(t * g.a_cs);
            for r in 0..R {
                let av = S::splat(*ap.add(r * g.a_rs));
                for v in 0..NV {
                    c[r][v] = S::fmadd(av, bv[v], c[r][v]);
                }
            }
        }
        if !g.acc && g.scale != 1.0 {
            let scale = S::splat(g.scale);
            for r in 0..R {
                for v in 0..NV {
                    c[r][v] = S::mul(c[r][v], scale);
                }
            }
        }
        for r in 0..R {
            for v in 0..NV {
                S::store(g.out.add(r * g.out_rs + v * S::W), c[r][v]);
            }
        }
    }
}

/// Loads the vector at `s[i..i + W]` (bounds-checked).
///
/// # Safety
/// The CPU has `S`'s instruction set.
#[inline(always)]
unsafe fn ld<S: Simd>(s: &[f32], i: usize) -> S::V {
    let p = s[i..i + S::W].as_ptr();
    // SAFETY: `p..p+W` is the slice just checked; the caller vouches for the CPU.
    unsafe { S::load(p) }
}

/// Stores a vector to `s[i..i + W]` (bounds-checked).
///
/// # Safety
/// The CPU has `S`'s instruction set.
#[inline(always)]
unsafe fn st<S: Simd>(s: &mut [f32], i: usize, v: S::V) {
    let p = s[i..i + S::W].as_mut_ptr();
    // SAFETY: `p..p+W` is the slice just checked; the caller vouches for the CPU.
    unsafe { S::store(p, v) }
}

/// Packs keys `k0..k0 + kn` of one head (`x` is `[tk][d]`) transposed into `xt` as `[d][BK]`,
/// zero-filling key columns `kn..BK` so the score tile is always whole vectors wide.
fn pack_transposed(x: &[f32], d: usize, k0: usize, kn: usize, xt: &mut [f32]) {
    for c in 0..kn {
        for (t, &val) in x[(k0 + c) * d..][..d].iter().enumerate() {
            xt[t * BK + c] = val;
        }
    }
    if kn < BK {
        for t in 0..d {
            xt[t * BK + kn..(t + 1) * BK].fill(0.0);
        }
    }
}

/// Copies rows `r0..r0 + n` of `x` (`[..][d]`) into `xp` as rows of `dp ≥ d` floats with zero
/// padding, so that the rows are whole vectors.
fn pack_rows(x: &[f32], d: usize, dp: usize, r0: usize, n: usize, xp: &mut [f32]) {
    for r in 0..n {
        let dst = &mut xp[r * dp..(r + 1) * dp];
        dst[..d].copy_from_slice(&x[(r0 + r) * d..][..d]);
        dst[d..].fill(0.0);
    }
}

/// Rows `0..n` of `x` (`[n][d]`) as rows of `dp` floats: `x` itself when `dp == d` (no copy),
/// else a zero-padded copy in `buf` of which only rows `r0..n` are filled (the caller reads no
/// others).
fn padded_rows<'a>(
    x: &'a [f32],
    d: usize,
    dp: usize,
    r0: usize,
    n: usize,
    buf: &'a mut Vec<f32>,
) -> &'a [f32] {
    if dp == d {
        &x[..n * d]
    } else {
        buf.clear();
        buf.resize(n * dp, 0.0);
        pack_rows(x, d, dp, r0, n - r0, &mut buf[r0 * dp..]);
        buf
    }
}

/// Picks the vector width and the per-task function for `isa`. The `unsafe fn` pointers may
/// only be called once `isa` is known to be available.
macro_rules! per_isa {
    ($isa:expr, $scalar:ident, $avx2:ident, $avx512:ident) => {
        match $isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => (super::simd::Avx512::W, $avx512 as _),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => (super::simd::Avx2::W, $avx2 as _),
            _ => (1, $scalar as _),
        }
    };
}

/// Inputs of the forward, shared by all its tasks.
struct FwdCtx<'a> {
    shape: AttentionShape,
    scale: f32,
    drop: Option<AttentionDropout>,
    q: &'a [f32],
    /// Per (head, key block): `Kᵀ` as `[d][BK]`, then `V` as `[BK][dp]` when `dp != d`.
    packed: &'a [f32],
    /// `V` itself, read in place when `dp == d`.
    v: &'a [f32],
    dp: usize,
}

impl FwdCtx<'_> {
    fn block_len(&self) -> usize {
        let d = self.shape.d;
        d * BK + if self.dp == d { 0 } else { BK * self.dp }
    }
}

/// Per-thread buffers of the forward; every element read in a block is first written in that
/// block, so reusing them across tasks cannot change results.
struct FwdScratch {
    s: Vec<f32>,
    o: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

type FwdBlockFn = unsafe fn(&FwdCtx<'_>, &mut FwdScratch, usize, usize, &mut [f32], &mut [f32]);

/// The forward on instruction set `isa` (available: checked by the caller), with slices of the
/// lengths `shape` implies and `bh, tq, d ≥ 1`.
#[allow(clippy::too_many_arguments)] // one argument per tensor of the API
pub(super) fn forward(
    isa: Isa,
    shape: AttentionShape,
    scale: f32,
    drop: Option<AttentionDropout>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    let AttentionShape { tq, tk, d, .. } = shape;
    let (w, block): (usize, FwdBlockFn) = per_isa!(
        isa,
        forward_block_scalar,
        forward_block_avx2,
        forward_block_avx512
    );
    let dp = d.next_multiple_of(w);
    let nkb = tk.div_ceil(BK);

    // Pack every key block once, up front: each is read by every query block below it, and
    // packing it per query block cost about a fifth of the forward at T = 1024.
    let mut packed = Vec::new();
    let mut ctx = FwdCtx {
        shape,
        scale,
        drop,
        q,
        packed: &[],
        v,
        dp,
    };
    let block_len = ctx.block_len();
    packed.resize(out.len() / (tq * d) * nkb * block_len, 0.0);
    packed
        .par_chunks_mut(block_len)
        .enumerate()
        .for_each(|(i, blk)| {
            let (b, k0) = (i / nkb, i % nkb * BK);
            let kn = BK.min(tk - k0);
            let (kt, vp) = blk.split_at_mut(d * BK);
            pack_transposed(&k[b * tk * d..][..tk * d], d, k0, kn, kt);
            if dp != d {
                pack_rows(&v[b * tk * d..][..tk * d], d, dp, k0, kn, vp);
            }
        });
    ctx.packed = &packed;

    let mut tasks = Vec::with_capacity(lse.len().div_ceil(BQ));
    for (b, (oh, lh)) in out.chunks_mut(tq * d).zip(lse.chunks_mut(tq)).enumerate() {
        for (qb, (oc, lc)) in oh.chunks_mut(BQ * d).zip(lh.chunks_mut(BQ)).enumerate() {
            tasks.push((b, qb * BQ, oc, lc));
        }
    }
    tasks.into_par_iter().for_each_init(
        || FwdScratch {
            s: vec![0.0; BQ * BK],
            o: vec![0.0; BQ * dp],
            m: vec![0.0; BQ],
            l: vec![0.0; BQ],
        },
        |scratch, (b, q0, oc, lc)| {
            // SAFETY: `block` was chosen for `isa`, which the caller checked is available.
            unsafe { block(&ctx, scratch, b, q0, oc, lc) }
        },
    );
}

fn forward_block_scalar(
    ctx: &FwdCtx<'_>,
    sc: &mut FwdScratch,
    b: usize,
    q0: usize,
    out: &mut [f32],
    lse: &mut [f32],
) {
    // SAFETY: the scalar path needs no CPU feature.
    unsafe { forward_block::<super::simd::Scalar>(ctx, sc, b, q0, out, lse) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_block_avx2(
    ctx: &FwdCtx<'_>,
    sc: &mut FwdScratch,
    b: usize,
    q0: usize,
    out: &mut [f32],
    lse: &mut [f32],
) {
    // SAFETY: the caller checked AVX2+FMA; this function is compiled for them.
    unsafe { forward_block::<super::simd::Avx2>(ctx, sc, b, q0, out, lse) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn forward_block_avx512(
    ctx: &FwdCtx<'_>,
    sc: &mut FwdScratch,
    b: usize,
    q0: usize,
    out: &mut [f32],
    lse: &mut [f32],
) {
    // SAFETY: the caller checked AVX-512F; this function is compiled for it.
    unsafe { forward_block::<super::simd::Avx512>(ctx, sc, b, q0, out, lse) }
}

/// The forward of query rows `q0..q0 + lse.len()` of head `b`; `out` is their `[rows][d]`.
///
/// # Safety
/// The CPU has `S`'s instruction set.
#[inline(always)]
unsafe fn forward_block<S: Simd>(
    ctx: &FwdCtx<'_>,
    sc: &mut FwdScratch,
    b: usize,
    q0: usize,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let AttentionShape { tq, tk, d, .. } = ctx.shape;
    let (w, dp) = (S::W, ctx.dp);
    debug_assert_eq!(dp, d.next_multiple_of(w), "packed for another vector width");
    let qn = lse.len();
    let off = tk - tq;
    let qh = &ctx.q[(b * tq + q0) * d..][..qn * d];
    let block_len = ctx.block_len();
    let nkb = tk.div_ceil(BK);
    // Keys 0..kend are seen by at least one row of the block (its last row sees all of them);
    // the blocks past it are fully masked and skipped.
    let kend = off + q0 + qn;

    sc.o[..qn * dp].fill(0.0);
    sc.m[..qn].fill(f32::NEG_INFINITY);
    sc.l[..qn].fill(0.0);
    // SAFETY (all `unsafe` below): the caller promises the CPU has `S`'s instruction set;
    // `gemm`, `ld` and `st` check bounds themselves.
    for k0 in (0..kend).step_by(BK) {
        let kn = BK.min(tk - k0);
        let blk = &ctx.packed[(b * nkb + k0 / BK) * block_len..][..block_len];
        let (kt, vp) = blk.split_at(d * BK);
        let vp = if dp == d {
            &ctx.v[(b * tk + k0) * d..][..kn * d]
        } else {
            vp
        };
        // s = scale · q · kᵀ for the whole tile.
        unsafe {
            gemm::<S>(
                qn,
                BK / w,
                d,
                (qh, d, 1),
                (kt, BK),
                (&mut sc.s, BK),
                Acc::Overwrite { scale: ctx.scale },
            )
        };
        for r in 0..qn {
            // Row r sits at absolute position p and sees keys 0..=p: `nv` of this tile's.
            let p = off + q0 + r;
            let nv = (p + 1).saturating_sub(k0).min(kn);
            let row = &mut sc.s[r * BK..(r + 1) * BK];
            if nv == 0 {
                // Nothing visible here (a row above the diagonal block): no contribution,
                // and m, l, o stay as they are.
                row.fill(0.0);
                continue;
            }
            // Only the first ceil(nv/W) vectors hold visible scores.
            let nvv = nv.div_ceil(w);
            row[nv..nvv * w].fill(f32::NEG_INFINITY);
            let tile_max = unsafe {
                let mut mx = S::splat(f32::NEG_INFINITY);
                for j in 0..nvv {
                    mx = S::max(mx, ld::<S>(row, j * w));
                }
                S::reduce_max(mx)
            };
            let m_old = sc.m[r];
            // Finite: key 0 is visible to every row and tiles go in key order, so by now
            // every row has seen at least one finite score.
            let m_new = m_old.max(tile_max);
            let tile_sum = unsafe {
                let mv = S::splat(m_new);
                let mut sum = S::splat(0.0);
                for j in 0..nvv {
                    let e = S::exp(S::sub(ld::<S>(row, j * w), mv));
                    st::<S>(row, j * w, e);
                    sum = S::add(sum, e);
                }
                S::reduce_add(sum)
            };
            row[nvv * w..].fill(0.0);
            if let Some(dr) = ctx.drop {
                // Dropped after the sum took them: P ⊙ Z meets V, the normaliser is P's.
                let dr = dr.row(b, q0 + r);
                for (j, x) in row[..nv].iter_mut().enumerate() {
                    *x *= dr.factor(k0 + j);
                }
            }
            // exp(−inf) = 0 on the first tile: the empty running sums are simply replaced.
            let alpha = (m_old - m_new).exp();
            sc.l[r] = sc.l[r] * alpha + tile_sum;
            sc.m[r] = m_new;
            if alpha != 1.0 {
                let orow = &mut sc.o[r * dp..(r + 1) * dp];
                unsafe {
                    let a = S::splat(alpha);
                    for j in (0..dp).step_by(w) {
                        st::<S>(orow, j, S::mul(ld::<S>(orow, j), a));
                    }
                }
            }
        }
        // o += p · v over this tile's keys.
        unsafe {
            gemm::<S>(
                qn,
                dp / w,
                kn,
                (&sc.s, BK, 1),
                (vp, dp),
                (&mut sc.o, dp),
                Acc::Add,
            )
        };
    }
    for r in 0..qn {
        let l = sc.l[r];
        for (o, &acc) in out[r * d..(r + 1) * d].iter_mut().zip(&sc.o[r * dp..]) {
            *o = acc / l;
        }
        lse[r] = sc.m[r] + l.ln();
    }
}

/// Inputs of the backward, shared by all its tasks.
struct BwdCtx<'a> {
    shape: AttentionShape,
    scale: f32,
    drop: Option<AttentionDropout>,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    out: &'a [f32],
    lse: &'a [f32],
    dout: &'a [f32],
}

/// One backward task: key blocks `kb_lo..kb_hi` of head `b`. `dk`, `dv` are those keys' rows;
/// `dq` is the head's `dq` when the head is one group, else the task returns a partial.
struct BwdTask<'a> {
    b: usize,
    kb_lo: usize,
    kb_hi: usize,
    dk: &'a mut [f32],
    dv: &'a mut [f32],
    dq: Option<&'a mut [f32]>,
}

/// Splits a head's key blocks into contiguous groups of about equal work (a block's work is
/// the number of query rows that see it); returns the group bounds in key blocks.
fn key_groups(shape: AttentionShape) -> Vec<usize> {
    let AttentionShape { bh, tq, tk, .. } = shape;
    let nkb = tk.div_ceil(BK);
    let off = tk - tq;
    let groups = MIN_BWD_TASKS.div_ceil(bh.max(1)).clamp(1, nkb.max(1));
    let work = |kb: usize| tq - (kb * BK).saturating_sub(off);
    let total: usize = (0..nkb).map(work).sum();
    let mut bounds = Vec::with_capacity(groups + 1);
    bounds.push(0);
    let (mut kb, mut done) = (0, 0);
    for g in 1..groups {
        let target = total * g / groups;
        // Take a block while its midpoint lies before the target.
        while kb < nkb && done + work(kb) / 2 < target {
            done += work(kb);
            kb += 1;
        }
        bounds.push(kb);
    }
    bounds.push(nkb);
    bounds
}

type BwdGroupFn = unsafe fn(&BwdCtx<'_>, BwdTask<'_>) -> Option<Vec<f32>>;

/// The backward on instruction set `isa` (available: checked by the caller), with slices of
/// the lengths `shape` implies and `bh, tq, d ≥ 1`.
#[allow(clippy::too_many_arguments)] // one argument per tensor of the API
pub(super) fn backward(
    isa: Isa,
    shape: AttentionShape,
    scale: f32,
    drop: Option<AttentionDropout>,
    (q, k, v, out, lse, dout): super::BwdInputs<'_>,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let AttentionShape { tq, tk, d, .. } = shape;
    let (w, group): (usize, BwdGroupFn) = per_isa!(
        isa,
        backward_group_scalar,
        backward_group_avx2,
        backward_group_avx512
    );
    let dp = d.next_multiple_of(w);
    let ctx = BwdCtx {
        shape,
        scale,
        drop,
        q,
        k,
        v,
        out,
        lse,
        dout,
    };
    let bounds = key_groups(shape);
    let groups = bounds.len() - 1;

    let mut tasks = Vec::with_capacity(dq.len() / (tq * d) * groups);
    let heads = dk.chunks_mut(tk * d).zip(dv.chunks_mut(tk * d));
    let mut dq_heads = dq.chunks_mut(tq * d);
    for (b, (mut dk_rest, mut dv_rest)) in heads.enumerate() {
        let dq_head = dq_heads.next();
        let mut dq_head = if groups == 1 { dq_head } else { None };
        for g in 0..groups {
            let rows = (bounds[g + 1] * BK).min(tk) - (bounds[g] * BK).min(tk);
            let (dk_g, dk_next) = dk_rest.split_at_mut(rows * d);
            let (dv_g, dv_next) = dv_rest.split_at_mut(rows * d);
            (dk_rest, dv_rest) = (dk_next, dv_next);
            tasks.push(BwdTask {
                b,
                kb_lo: bounds[g],
                kb_hi: bounds[g + 1],
                dk: dk_g,
                dv: dv_g,
                dq: dq_head.take(),
            });
        }
    }
    let partials: Vec<Option<Vec<f32>>> = tasks
        .into_par_iter()
        // SAFETY: `group` was chosen for `isa`, which the caller checked is available.
        .map(|task| unsafe { group(&ctx, task) })
        .collect();
    if groups > 1 {
        // dq = ((p₀ + p₁) + p₂) + …: summed in group order whatever thread made each partial.
        dq.par_chunks_mut(tq * d)
            .zip(partials.par_chunks(groups))
            .for_each(|(dq_head, parts)| {
                let mut parts = parts.iter().flatten();
                let first = parts.next().expect("one partial per group");
                for (dst, src) in dq_head.chunks_mut(d).zip(first.chunks(dp)) {
                    dst.copy_from_slice(&src[..d]);
                }
                for part in parts {
                    for (dst, src) in dq_head.chunks_mut(d).zip(part.chunks(dp)) {
                        for (x, y) in dst.iter_mut().zip(src) {
                            *x += y;
                        }
                    }
                }
            });
    }
}

fn backward_group_scalar(ctx: &BwdCtx<'_>, task: BwdTask<'_>) -> Option<Vec<f32>> {
    // SAFETY: the scalar path needs no CPU feature.
    unsafe { backward_group::<super::simd::Scalar>(ctx, task) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_group_avx2(ctx: &BwdCtx<'_>, task: BwdTask<'_>) -> Option<Vec<f32>> {
    // SAFETY: the caller checked AVX2+FMA; this function is compiled for them.
    unsafe { backward_group::<super::simd::Avx2>(ctx, task) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn backward_group_avx512(ctx: &BwdCtx<'_>, task: BwdTask<'_>) -> Option<Vec<f32>> {
    // SAFETY: the caller checked AVX-512F; this function is compiled for it.
    unsafe { backward_group::<super::simd::Avx512>(ctx, task) }
}

/// The backward of one task. Writes `dk`, `dv` of its keys; writes the head's `dq` when it
/// holds it, else returns its `dq` contribution as `[tq][dp]`.
///
/// # Safety
/// The CPU has `S`'s instruction set.
#[inline(always)]
unsafe fn backward_group<S: Simd>(ctx: &BwdCtx<'_>, mut task: BwdTask<'_>) -> Option<Vec<f32>> {
    let AttentionShape { tq, tk, d, .. } = ctx.shape;
    let w = S::W;
    let dp = d.next_multiple_of(w);
    let off = tk - tq;
    let b = task.b;
    let qh = &ctx.q[b * tq * d..][..tq * d];
    let oh = &ctx.out[b * tq * d..][..tq * d];
    let doh = &ctx.dout[b * tq * d..][..tq * d];
    let lh = &ctx.lse[b * tq..][..tq];
    let kh = &ctx.k[b * tk * d..][..tk * d];
    let vh = &ctx.v[b * tk * d..][..tk * d];

    // Query rows before `i_first` see none of this task's keys.
    let i_first = (task.kb_lo * BK).saturating_sub(off).min(tq);
    // Q and dO as whole-vector rows: the right operands of the dK and dV products.
    let (mut q_buf, mut do_buf) = (Vec::new(), Vec::new());
    let qp = padded_rows(qh, d, dp, i_first, tq, &mut q_buf);
    let dop = padded_rows(doh, d, dp, i_first, tq, &mut do_buf);
    let mut dd = vec![0.0f32; tq];
    for (i, di) in dd.iter_mut().enumerate().skip(i_first) {
        let (o, g) = (&oh[i * d..(i + 1) * d], &doh[i * d..(i + 1) * d]);
        *di = o.iter().zip(g).map(|(o, g)| o * g).sum();
    }
    // dQ accumulates in place when this task owns the head's dq and no padding is needed.
    let mut dq_buf = Vec::new();
    let dq_acc: &mut [f32] = match task.dq.as_deref_mut() {
        Some(dq) if dp == d => {
            dq.fill(0.0);
            dq
        }
        _ => {
            dq_buf.resize(tq * dp, 0.0);
            &mut dq_buf
        }
    };

    let mut kt = vec![0.0; d * BK];
    let mut vt = vec![0.0; d * BK];
    let mut k_buf = Vec::new();
    let mut s = vec![0.0; BQ * BK];
    let mut dpt = vec![0.0; BQ * BK];
    let mut ds = vec![0.0; BQ * BK];
    let mut zrow = [0.0f32; BK];
    let mut dk_acc = vec![0.0; BK * dp];
    let mut dv_acc = vec![0.0; BK * dp];
    // SAFETY (all `unsafe` below): the caller promises the CPU has `S`'s instruction set;
    // `gemm`, `ld` and `st` check bounds themselves.
    for kb in task.kb_lo..task.kb_hi {
        let k0 = kb * BK;
        let kn = BK.min(tk - k0);
        pack_transposed(kh, d, k0, kn, &mut kt);
        pack_transposed(vh, d, k0, kn, &mut vt);
        let kp = padded_rows(&kh[k0 * d..], d, dp, 0, kn, &mut k_buf);
        dk_acc.fill(0.0);
        dv_acc.fill(0.0);
        // The first query row that sees key k0; rows before it see none of this block.
        let i_start = k0.saturating_sub(off);
        for i0 in (i_start..tq).step_by(BQ) {
            let qn = BQ.min(tq - i0);
            unsafe {
                // s = scale · q · kᵀ and dp = dO · vᵀ for the tile.
                gemm::<S>(
                    qn,
                    BK / w,
                    d,
                    (&qh[i0 * d..], d, 1),
                    (&kt, BK),
                    (&mut s, BK),
                    Acc::Overwrite { scale: ctx.scale },
                );
                gemm::<S>(
                    qn,
                    BK / w,
                    d,
                    (&doh[i0 * d..], d, 1),
                    (&vt, BK),
                    (&mut dpt, BK),
                    Acc::Overwrite { scale: 1.0 },
                );
            }
            for r in 0..qn {
                let i = i0 + r;
                // i ≥ i_start, so p ≥ k0 and at least one key of the tile is visible.
                let nv = (off + i + 1 - k0).min(kn);
                let nvv = nv.div_ceil(w);
                let (srow, dsrow) = (&mut s[r * BK..(r + 1) * BK], &mut ds[r * BK..(r + 1) * BK]);
                let dprow = &mut dpt[r * BK..(r + 1) * BK];
                if let Some(dr) = ctx.drop {
                    // dP = Z ⊙ dO·Vᵀ: the forward's factors for this row's visible keys.
                    let dr = dr.row(b, i);
                    for (j, (z, dp)) in zrow[..nv].iter_mut().zip(dprow.iter_mut()).enumerate() {
                        *z = dr.factor(k0 + j);
                        *dp *= *z;
                    }
                }
                unsafe {
                    let scale = S::splat(ctx.scale);
                    let lse_i = S::splat(lh[i]);
                    let di = S::splat(dd[i]);
                    for j in 0..nvv {
                        // P = exp(s − lse); dS = scale · P ⊙ (dP − D).
                        let p = S::exp(S::sub(ld::<S>(srow, j * w), lse_i));
                        let dsv = S::mul(S::mul(p, S::sub(ld::<S>(dprow, j * w), di)), scale);
                        st::<S>(srow, j * w, p);
                        st::<S>(dsrow, j * w, dsv);
                    }
                }
                if ctx.drop.is_some() {
                    // dV takes P ⊙ Z (dS above took P itself).
                    for (p, z) in srow[..nv].iter_mut().zip(&zrow[..nv]) {
                        *p *= z;
                    }
                }
                srow[nv..].fill(0.0);
                dsrow[nv..].fill(0.0);
            }
            unsafe {
                // dV += Pᵀ · dO and dK += dSᵀ · Q: the tiles read transposed (a_rs = 1).
                gemm::<S>(
                    kn,
                    dp / w,
                    qn,
                    (&s, 1, BK),
                    (&dop[i0 * dp..], dp),
                    (&mut dv_acc, dp),
                    Acc::Add,
                );
                gemm::<S>(
                    kn,
                    dp / w,
                    qn,
                    (&ds, 1, BK),
                    (&qp[i0 * dp..], dp),
                    (&mut dk_acc, dp),
                    Acc::Add,
                );
                // dQ += dS · K.
                gemm::<S>(
                    qn,
                    dp / w,
                    kn,
                    (&ds, BK, 1),
                    (kp, dp),
                    (&mut dq_acc[i0 * dp..], dp),
                    Acc::Add,
                );
            }
        }
        let rows = (kb - task.kb_lo) * BK;
        for c in 0..kn {
            task.dk[(rows + c) * d..][..d].copy_from_slice(&dk_acc[c * dp..][..d]);
            task.dv[(rows + c) * d..][..d].copy_from_slice(&dv_acc[c * dp..][..d]);
        }
    }
    match task.dq {
        // Accumulated in place above.
        Some(_) if dp == d => None,
        Some(dq) => {
            for (dst, src) in dq.chunks_mut(d).zip(dq_buf.chunks(dp)) {
                dst.copy_from_slice(&src[..d]);
            }
            None
        }
        None => Some(dq_buf),
    }
}
