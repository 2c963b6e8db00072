//! The blocked loop nest around a microkernel: packing, cache blocking and the thread split.
//!
//! ```text
//! for jc in 0..n step NC                      B panel columns
//!   for pc in 0..k step KC (fixed by k)       shared-dimension block, always in increasing order
//!     pack B[pc.., jc..] into NR-wide micro-panels        (threads split the micro-panels)
//!     for each work item (row range × column range), in parallel:
//!       pack its rows of A[.., pc..] into MR-tall micro-panels (thread-local buffer)
//!       for each B micro-panel: for each A micro-panel: microkernel
//! ```
//!
//! Work items cut the rows at micro-panel boundaries into a multiple of the thread count (and the
//! columns too when there are too few rows), so the threads get equal shares without stealing.

use super::kernels::Microkernel;
use super::{MatMut, MatRef, PARALLEL_MIN_FLOPS};
use rayon::prelude::*;
use std::cell::RefCell;
use std::ops::Range;
use std::thread::LocalKey;

/// A growable f32 buffer that hands out 64-byte aligned slices (one cache line, one zmm load).
struct AlignedBuf(Vec<f32>);

impl AlignedBuf {
    const PAD: usize = 64 / std::mem::size_of::<f32>();

    fn slice(&mut self, len: usize) -> &mut [f32] {
        if self.0.len() < len + Self::PAD {
            self.0.resize(len + Self::PAD, 0.0);
        }
        let off = self.0.as_ptr().align_offset(64);
        // align_offset may decline (usize::MAX); unaligned loads are still correct.
        let off = if off < Self::PAD { off } else { 0 };
        &mut self.0[off..off + len]
    }
}

thread_local! {
    /// Packed A block of the work item this thread is running.
    static PACK_A: RefCell<AlignedBuf> = const { RefCell::new(AlignedBuf(Vec::new())) };
    /// Packed B panel of the sgemm call this thread issued.
    static PACK_B: RefCell<AlignedBuf> = const { RefCell::new(AlignedBuf(Vec::new())) };
}

/// Runs `f` with this thread's cached buffer, or a fresh one if it is already in use (a rayon
/// worker that, while waiting inside one sgemm, steals a task that starts another).
fn with_buf<R>(
    key: &'static LocalKey<RefCell<AlignedBuf>>,
    f: impl FnOnce(&mut AlignedBuf) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut AlignedBuf(Vec::new())),
    })
}

/// C's base pointer and row stride, shared by the threads; each writes a disjoint set of tiles.
#[derive(Clone, Copy)]
struct CPtr {
    ptr: *mut f32,
    ldc: usize,
}

// SAFETY: the work items write disjoint elements of C (disjoint tiles, and validation ensured
// rows do not overlap), and the `MatMut` borrow outlives every thread's use of the pointer.
unsafe impl Send for CPtr {}
// SAFETY: as above.
unsafe impl Sync for CPtr {}

/// Largest MR·NR over the kernels, for the edge-tile buffer.
const MAX_TILE: usize = 14 * 32;
/// Largest NR over the kernels, for an edge tile's bias row.
const MAX_NR: usize = 32;

/// `C = alpha·A·B + beta·C (+ bias on every row)` for validated, non-empty operands (m, n, k ≥
/// 1; `bias` of length n). The bias is added in the last k block, after the sum is complete, so
/// the result is bitwise that of the GEMM followed by a separate bias add.
pub(super) fn gemm<K: Microkernel>(
    alpha: f32,
    a: MatRef,
    b: MatRef,
    beta: f32,
    bias: Option<&[f32]>,
    c: MatMut,
) {
    assert!(
        K::MR * K::NR <= MAX_TILE && K::NR <= MAX_NR,
        "edge buffers too small for the kernel"
    );
    assert!(
        K::MC % K::MR == 0 && K::NC % K::NR == 0,
        "block sizes must be tile multiples"
    );
    let (m, n, k) = (a.rows, b.cols, a.cols);
    debug_assert!(m > 0 && n > 0 && k > 0);
    assert!(
        bias.is_none_or(|v| v.len() == n),
        "gemm: bias length must be n = {n}"
    );
    let flops = 2usize.saturating_mul(m).saturating_mul(n).saturating_mul(k);
    let threads = if flops >= PARALLEL_MIN_FLOPS {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    // Equal KC blocks: the cut depends on k alone, never on threads, so sums keep their order.
    let kc_max = k.div_ceil(k.div_ceil(K::KC));
    let m_panels = m.div_ceil(K::MR);
    let cp = CPtr {
        ptr: c.data.as_mut_ptr(),
        ldc: c.row_stride,
    };

    // With few row panels each B micro-panel would serve at most DIRECT_B_MAX_PANELS tiles, so
    // packing it (a full extra read and write of B) costs more than it saves: a row-major B is
    // then read in place, and only a ragged last panel is packed (with zero padding).
    let direct_b = b.col_stride == 1 && m_panels <= DIRECT_B_MAX_PANELS;

    with_buf(&PACK_B, |bbuf| {
        for jc in (0..n).step_by(K::NC) {
            let nc = K::NC.min(n - jc);
            let n_panels = nc.div_ceil(K::NR);
            let direct_panels = if direct_b { nc / K::NR } else { 0 };
            let (mi, ni) = split(m_panels, n_panels, K::MC / K::MR, threads, direct_b);
            for (pi, pc) in (0..k).step_by(kc_max).enumerate() {
                let kc = kc_max.min(k - pc);
                let packed = n_panels - direct_panels;
                let bpack = bbuf.slice(packed * kc * K::NR);
                // Contiguous groups of micro-panels, several per thread (see ITEMS_PER_THREAD).
                let group = packed.div_ceil(ITEMS_PER_THREAD * threads).max(1);
                let j_packed = jc + direct_panels * K::NR;
                let pack = |(g, dst): (usize, &mut [f32])| {
                    pack_b_panels::<K>(&b, pc, kc, j_packed + g * group * K::NR, dst)
                };
                if threads > 1 && packed > 1 {
                    bpack
                        .par_chunks_mut(group * kc * K::NR)
                        .enumerate()
                        .for_each(pack);
                } else if packed > 0 {
                    pack((0, bpack));
                }
                let bsrc = BSource {
                    b: &b,
                    packed: bpack,
                    direct_panels,
                };
                // Later k blocks add onto what the earlier ones stored.
                let beta_k = if pi == 0 { beta } else { 1.0 };
                let bias_k = if pc + kc == k { bias } else { None };
                let item = |idx: usize| {
                    let (ii, jj) = (idx / ni, idx % ni);
                    let rows = ii * m_panels / mi..(ii + 1) * m_panels / mi;
                    let cols = jj * n_panels / ni..(jj + 1) * n_panels / ni;
                    let block = Block {
                        a: &a,
                        bsrc: &bsrc,
                        pc,
                        kc,
                        jc,
                        m,
                        n,
                        alpha,
                        beta: beta_k,
                        bias: bias_k,
                        c: cp,
                    };
                    block.run::<K>(rows, cols);
                };
                if threads > 1 {
                    (0..mi * ni).into_par_iter().for_each(item);
                } else {
                    (0..mi * ni).for_each(item);
                }
            }
        }
    });
}

/// At most this many row micro-panels: B is read in place instead of packed (when row-major).
const DIRECT_B_MAX_PANELS: usize = 4;

/// Where a step's B micro-panels live: the first `direct_panels` in B itself (row-major, read
/// in place), the rest packed.
struct BSource<'a, 'b> {
    b: &'a MatRef<'b>,
    packed: &'a [f32],
    direct_panels: usize,
}

impl BSource<'_, '_> {
    /// Panel `jp` of the (jc, pc) step as (pointer to its first element, stride between k
    /// steps). Direct panels are full-width, so all `kc` rows of `NR` lie inside B.
    fn panel<K: Microkernel>(
        &self,
        jp: usize,
        jc: usize,
        pc: usize,
        kc: usize,
    ) -> (*const f32, usize) {
        if jp < self.direct_panels {
            let rs = self.b.row_stride;
            (self.b.data[pc * rs + jc + jp * K::NR..].as_ptr(), rs)
        } else {
            let panel = kc * K::NR;
            (
                self.packed[(jp - self.direct_panels) * panel..][..panel].as_ptr(),
                K::NR,
            )
        }
    }
}

/// Work items per thread to aim for at least: a worker that wakes late (tens of microseconds on
/// this kind of VM) can still take its share from a thread that started alone, which matters
/// when a whole product takes only some hundreds of microseconds.
const ITEMS_PER_THREAD: usize = 4;

/// How many row ranges (`mi`) and column ranges (`ni`) of micro-panels to cut the work into.
fn split(
    m_panels: usize,
    n_panels: usize,
    mc_panels: usize,
    threads: usize,
    direct_b: bool,
) -> (usize, usize) {
    let blocks = m_panels.div_ceil(mc_panels).max(1);
    if threads <= 1 {
        return (blocks, 1);
    }
    let items = ITEMS_PER_THREAD * threads;
    // With B read in place, cutting the columns lets each thread read only its part of B.
    if m_panels >= 2 * threads && !direct_b {
        // Enough rows: a multiple of the thread count, so each thread gets an equal share.
        let mi = blocks.max(items).div_ceil(threads) * threads;
        (mi.min(m_panels), 1)
    } else {
        // Few rows (a short, wide product): also cut the columns.
        (blocks, items.div_ceil(blocks).min(n_panels).max(1))
    }
}

/// What one work item needs to compute its share of the current (jc, pc) step.
struct Block<'a, 'b> {
    a: &'a MatRef<'b>,
    bsrc: &'a BSource<'a, 'b>,
    pc: usize,
    kc: usize,
    jc: usize,
    m: usize,
    n: usize,
    alpha: f32,
    beta: f32,
    /// Added to every row of C in this step (the last k block only).
    bias: Option<&'a [f32]>,
    c: CPtr,
}

impl Block<'_, '_> {
    /// Packs A micro-panels `rows` and multiplies them by B micro-panels `cols` of the packed panel.
    fn run<K: Microkernel>(&self, rows: Range<usize>, cols: Range<usize>) {
        let (kc, mr_full, nr_full) = (self.kc, K::MR, K::NR);
        with_buf(&PACK_A, |abuf| {
            let apack = abuf.slice(rows.len() * kc * mr_full);
            for (q, dst) in apack.chunks_exact_mut(kc * mr_full).enumerate() {
                pack_a_panel::<K>(
                    self.a,
                    (rows.start + q) * mr_full,
                    self.pc,
                    kc,
                    mr_full,
                    dst,
                );
            }
            for jp in cols.clone() {
                let (bp, b_stride) = self.bsrc.panel::<K>(jp, self.jc, self.pc, kc);
                // The first tile of this column prefetches the next B micro-panel into L2 (when
                // it has the same layout, so the kernel can step through both alike).
                let b_next = match cols.contains(&(jp + 1)) {
                    true => match self.bsrc.panel::<K>(jp + 1, self.jc, self.pc, kc) {
                        (next, stride) if stride == b_stride => next,
                        _ => std::ptr::null(),
                    },
                    false => std::ptr::null(),
                };
                let j0 = self.jc + jp * nr_full;
                let nr = nr_full.min(self.n - j0);
                for (q, ap) in apack.chunks_exact(kc * mr_full).enumerate() {
                    let i0 = (rows.start + q) * mr_full;
                    let mr = mr_full.min(self.m - i0);
                    let next = if q == 0 { b_next } else { std::ptr::null() };
                    self.tile::<K>(ap, (bp, b_stride), next, i0, j0, mr, nr);
                }
            }
        });
    }

    /// One C tile at (i0, j0) with `mr × nr` valid elements.
    #[allow(clippy::too_many_arguments)]
    fn tile<K: Microkernel>(
        &self,
        ap: &[f32],
        (bp, b_stride): (*const f32, usize),
        b_next: *const f32,
        i0: usize,
        j0: usize,
        mr: usize,
        nr: usize,
    ) {
        let (kc, ldc) = (self.kc, self.c.ldc);
        debug_assert!(ap.len() == kc * K::MR);
        debug_assert!(i0 + mr <= self.m && j0 + nr <= self.n);
        // An edge tile's bias is copied into a full-width row (the kernel reads NR values).
        let mut bias_row = [0.0f32; MAX_NR];
        let bias = match self.bias {
            Some(bias) if nr == K::NR => bias[j0..j0 + nr].as_ptr(),
            Some(bias) => {
                bias_row[..nr].copy_from_slice(&bias[j0..j0 + nr]);
                bias_row.as_ptr()
            }
            None => std::ptr::null(),
        };
        if mr == K::MR && nr == K::NR {
            // SAFETY: ap holds kc full groups (asserted above) and bp kc rows of NR at stride
            // b_stride (`BSource::panel`: a packed panel, or a full-width panel inside B, whose
            // extent validation checked); the tile's MR rows × NR columns lie inside C
            // (i0 + MR <= m, j0 + NR <= n, and validation checked the extent of m × n at
            // stride ldc); a bias pointer, when not null, has NR values (j0 + NR <= n = the
            // bias length); no other thread writes this tile; the kernel's ISA was checked by
            // `sgemm_with` before this kernel type was chosen.
            unsafe {
                K::run(
                    kc,
                    ap.as_ptr(),
                    bp,
                    b_stride,
                    self.c.ptr.add(i0 * ldc + j0),
                    ldc,
                    self.alpha,
                    self.beta,
                    bias,
                    b_next,
                )
            }
            return;
        }
        // Edge tile: the kernel runs on a full-size copy, so every element gets the very same
        // arithmetic as in a full tile; only the valid part goes back to C.
        let mut tmp = [0.0f32; MAX_TILE];
        let read_c = self.beta != 0.0;
        for i in 0..mr {
            // SAFETY: row i0 + i < m and columns j0..j0 + nr < n lie inside C (validated extent);
            // this tile belongs to this thread alone.
            let row =
                unsafe { std::slice::from_raw_parts(self.c.ptr.add((i0 + i) * ldc + j0), nr) };
            if read_c {
                tmp[i * K::NR..][..nr].copy_from_slice(row);
            }
        }
        // SAFETY: ap and bp as above; tmp holds MR rows of NR at stride NR (MR·NR <=
        // MAX_TILE, asserted in `gemm`); the bias pointer is null or the MAX_NR >= NR row;
        // the ISA was checked by `sgemm_with`.
        unsafe {
            K::run(
                kc,
                ap.as_ptr(),
                bp,
                b_stride,
                tmp.as_mut_ptr(),
                K::NR,
                self.alpha,
                self.beta,
                bias,
                b_next,
            )
        };
        for i in 0..mr {
            // SAFETY: as for the reads above.
            let row =
                unsafe { std::slice::from_raw_parts_mut(self.c.ptr.add((i0 + i) * ldc + j0), nr) };
            row.copy_from_slice(&tmp[i * K::NR..][..nr]);
        }
    }
}

/// Packs rows `r0..r0 + mr_full` (zero past the last row) and columns `p0..p0 + kc` of A into
/// `dst[p * mr_full + i]`.
fn pack_a_panel<K: Microkernel>(
    a: &MatRef,
    r0: usize,
    p0: usize,
    kc: usize,
    mr_full: usize,
    dst: &mut [f32],
) {
    let mr = mr_full.min(a.rows - r0);
    let (rs, cs) = (a.row_stride, a.col_stride);
    if cs == 1 {
        // Row-major A: each row is a contiguous stream, interleaved into the panel's lanes.
        let src = &a.data[r0 * rs + p0..];
        K::interleave(src, rs, mr, mr_full, kc, dst);
    } else if rs == 1 {
        // Transposed A (the weight gradient Xᵀ·dY): each k step is a contiguous run of rows.
        if mr == K::MR && mr_full == K::MR {
            // A copy of a compile-time length the compiler inlines (two zmm moves for MR = 14)
            // instead of a memcpy call per k step.
            for (p, d) in dst.chunks_exact_mut(K::MR).enumerate() {
                d.copy_from_slice(&a.data[(p0 + p) * cs + r0..][..K::MR]);
            }
        } else {
            for (p, d) in dst.chunks_exact_mut(mr_full).enumerate() {
                d[..mr].copy_from_slice(&a.data[(p0 + p) * cs + r0..][..mr]);
            }
        }
    } else {
        for (p, d) in dst.chunks_exact_mut(mr_full).enumerate() {
            for (i, v) in d[..mr].iter_mut().enumerate() {
                *v = a.data[(r0 + i) * rs + (p0 + p) * cs];
            }
        }
    }
    if mr < mr_full {
        for d in dst.chunks_exact_mut(mr_full) {
            d[mr..].fill(0.0);
        }
    }
}

/// Packs as many consecutive B micro-panels as `dst` holds, starting at column `j0`.
fn pack_b_panels<K: Microkernel>(b: &MatRef, p0: usize, kc: usize, j0: usize, dst: &mut [f32]) {
    let nr_full = K::NR;
    let panel = kc * nr_full;
    debug_assert_eq!(dst.len() % panel, 0, "whole panels only");
    if b.col_stride == 1 {
        // Row-major B: walk each row once over all the panels' columns (one long contiguous
        // read per k step instead of a short one per panel, which the prefetcher follows).
        let cols = (dst.len() / panel * nr_full).min(b.cols - j0);
        for p in 0..kc {
            let row = &b.data[(p0 + p) * b.row_stride + j0..][..cols];
            for (q, d) in dst.chunks_exact_mut(panel).enumerate() {
                let d = &mut d[p * nr_full..][..nr_full];
                let start = q * nr_full;
                if start + nr_full <= cols {
                    // A fixed-size copy the compiler inlines: no memcpy call per 128 bytes.
                    d.copy_from_slice(&row[start..start + nr_full]);
                } else {
                    let w = cols.saturating_sub(start);
                    d[..w].copy_from_slice(&row[start.min(cols)..][..w]);
                    d[w..].fill(0.0);
                }
            }
        }
    } else {
        for (q, d) in dst.chunks_exact_mut(panel).enumerate() {
            pack_b_panel::<K>(b, p0, kc, j0 + q * nr_full, nr_full, d);
        }
    }
}

/// Packs columns `j0..j0 + nr_full` (zero past the last column) and rows `p0..p0 + kc` of B into
/// `dst[p * nr_full + j]`.
fn pack_b_panel<K: Microkernel>(
    b: &MatRef,
    p0: usize,
    kc: usize,
    j0: usize,
    nr_full: usize,
    dst: &mut [f32],
) {
    let nr = nr_full.min(b.cols - j0);
    let (rs, cs) = (b.row_stride, b.col_stride);
    if cs == 1 {
        // Row-major B: each k step is a contiguous run of columns.
        for (p, d) in dst.chunks_exact_mut(nr_full).enumerate() {
            d[..nr].copy_from_slice(&b.data[(p0 + p) * rs + j0..][..nr]);
        }
    } else if rs == 1 {
        // Transposed B: each column is a contiguous stream, interleaved into the panel's lanes.
        K::interleave(&b.data[j0 * cs + p0..], cs, nr, nr_full, kc, dst);
    } else {
        for (p, d) in dst.chunks_exact_mut(nr_full).enumerate() {
            for (j, v) in d[..nr].iter_mut().enumerate() {
                *v = b.data[(p0 + p) * rs + (j0 + j) * cs];
            }
        }
    }
    if nr < nr_full {
        for d in dst.chunks_exact_mut(nr_full) {
            d[nr..].fill(0.0);
        }
    }
}
