//! Matrix multiplication, 2-D and batched with broadcast batch dims, on the engine's own GEMM.
//!
//! Operands are read through their strides, so transposed views (`a.t()`) cost no copy: the
//! GEMM's packing step reads any layout. The backward uses the same trick (dA = dC·Bᵀ, dB = Aᵀ·dC).

use super::binary::require_f32;
use crate::cpu::gemm::{sgemm, sgemm_bias_with, MatMut, MatRef};
use crate::layout::broadcast_shapes;
use crate::{Error, Result, Tensor};
use rayon::prelude::*;

/// Storage index of batch element `b` (row-major over `batch_shape`) under `strides`.
fn batch_offset(mut b: usize, batch_shape: &[usize], strides: &[usize]) -> usize {
    let mut off = 0;
    for (&d, &s) in batch_shape.iter().zip(strides).rev() {
        off += (b % d) * s;
        b /= d;
    }
    off
}

/// The rows of a contiguous f32 `a` ([.., k]) times a 2-D f32 `b` ([k, n], any strides), plus
/// an optional bias row added in the GEMM's epilogue, as one GEMM into a tensor of `out_shape`
/// ([.., n]). Shapes are the caller's to check.
fn gemm_rows(a: &Tensor, b: &Tensor, bias: Option<&[f32]>, out_shape: &[usize]) -> Result<Tensor> {
    let (k, n) = (b.shape()[0], b.shape()[1]);
    // Counted from the shape, not numel / k, which is 0 when k is.
    let rows: usize = a.shape()[..a.rank() - 1].iter().product();
    // sgemm with beta = 0 writes every element of C without reading it.
    let mut out = crate::cpu::pool::for_overwrite(rows * n);
    let (sa, sb) = (a.storage().as_slice::<f32>(), b.storage().as_slice::<f32>());
    let (sa, sb) = (sa.unwrap_or(&[]), sb.unwrap_or(&[]));
    let bl = b.layout();
    sgemm_bias_with(
        crate::cpu::isa(),
        1.0,
        MatRef {
            data: &sa[a.layout().offset()..],
            rows,
            cols: k,
            row_stride: k,
            col_stride: 1,
        },
        MatRef {
            data: &sb[bl.offset()..],
            rows: k,
            cols: n,
            row_stride: bl.strides()[0],
            col_stride: bl.strides()[1],
        },
        0.0,
        bias,
        MatMut {
            data: &mut out,
            rows,
            cols: n,
            row_stride: n,
        },
    )?;
    Ok(Tensor::f32_owned(out, out_shape))
}

fn matmul_forward(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let mismatch = || Error::ShapeMismatch {
        op: "matmul",
        lhs: a.shape().to_vec(),
        rhs: b.shape().to_vec(),
    };
    if a.rank() < 2 || b.rank() < 2 {
        return Err(mismatch());
    }
    let (m, k) = (a.shape()[a.rank() - 2], a.shape()[a.rank() - 1]);
    let (k2, n) = (b.shape()[b.rank() - 2], b.shape()[b.rank() - 1]);
    if k != k2 {
        return Err(mismatch());
    }
    let batch = broadcast_shapes(
        "matmul",
        &a.shape()[..a.rank() - 2],
        &b.shape()[..b.rank() - 2],
    )?;
    let nb: usize = batch.iter().product();
    let mut out_shape = batch.clone();
    out_shape.extend([m, n]);

    #[cfg(feature = "cuda")]
    if let Some(dev) = super::cuda_inputs("matmul", &[a, b])? {
        return matmul_cuda(&dev, a, b, &batch, (m, k, n), &out_shape);
    }
    // Only here: the CUDA path takes bf16 too (the tensor-core GEMM); the CPU GEMM is f32.
    require_f32("matmul", a)?;
    require_f32("matmul", b)?;

    // [.., m, k] · [k, n] with contiguous rows in `a`: one GEMM with m·batch rows. This is the
    // shape of every linear layer, and one large GEMM beats many small ones.
    if b.rank() == 2 && a.is_contiguous() {
        return gemm_rows(a, b, None, &out_shape);
    }

    let ea = a.detach().broadcast_to(&[&batch[..], &[m, k]].concat())?;
    let eb = b.detach().broadcast_to(&[&batch[..], &[k, n]].concat())?;
    let (la, lb) = (ea.layout(), eb.layout());
    let (sa, sb) = (
        ea.storage().as_slice::<f32>().unwrap_or(&[]),
        eb.storage().as_slice::<f32>().unwrap_or(&[]),
    );
    let r = batch.len();
    // Every batch element's C is written by its sgemm (beta = 0), when m·n > 0.
    let mut out = crate::cpu::pool::for_overwrite(nb * m * n);
    let run = |bi: usize, c: &mut [f32]| -> Result<()> {
        let oa = la.offset() + batch_offset(bi, &batch, &la.strides()[..r]);
        let ob = lb.offset() + batch_offset(bi, &batch, &lb.strides()[..r]);
        sgemm(
            1.0,
            MatRef {
                data: &sa[oa..],
                rows: m,
                cols: k,
                row_stride: la.strides()[r],
                col_stride: la.strides()[r + 1],
            },
            MatRef {
                data: &sb[ob..],
                rows: k,
                cols: n,
                row_stride: lb.strides()[r],
                col_stride: lb.strides()[r + 1],
            },
            0.0,
            MatMut {
                data: c,
                rows: m,
                cols: n,
                row_stride: n,
            },
        )
    };
    if m * n > 0 {
        // Many small products (attention heads): one batch element per task. Large products
        // parallelise inside the GEMM instead.
        if m * n * k < 64 * 64 * 64 && nb > 1 {
            out.par_chunks_mut(m * n)
                .enumerate()
                .try_for_each(|(bi, c)| run(bi, c))?;
        } else {
            for (bi, c) in out.chunks_mut(m * n).enumerate() {
                run(bi, c)?;
            }
        }
    }
    Ok(Tensor::f32_owned(out, &out_shape))
}

/// One operand of a batched GPU GEMM: its pointer, row/column element strides of each
/// matrix, and the element stride between batch elements (0 broadcasts).
#[cfg(feature = "cuda")]
struct GpuOperand {
    t: Tensor,
    rs: usize,
    cs: usize,
    batch: usize,
}

/// `t` viewed as `batch ++ [r, c]`, with its batch dims merged into one stride: exact when they
/// merge (contiguous batch dims, or all broadcast), else after a dense copy on the device.
#[cfg(feature = "cuda")]
fn gpu_operand(t: &Tensor, batch: &[usize], r: usize, c: usize) -> Result<GpuOperand> {
    let e = t.detach().broadcast_to(&[batch, &[r, c]].concat())?;
    let nb = batch.len();
    let merged = |e: &Tensor| -> Option<usize> {
        let (sh, st) = (&e.shape()[..nb], &e.layout().strides()[..nb]);
        // Size-1 dims never move the pointer; the rest must be evenly spaced.
        let dims: Vec<(usize, usize)> = sh
            .iter()
            .zip(st)
            .filter(|(&d, _)| d > 1)
            .map(|(&d, &s)| (d, s))
            .collect();
        let inner = dims.last().map_or(0, |&(_, s)| s);
        let ok = dims.windows(2).all(|w| w[0].1 == w[1].1 * w[1].0);
        ok.then_some(inner)
    };
    let e = match merged(&e) {
        Some(_) => e,
        None => super::dense(&e)?,
    };
    let batch_stride = merged(&e).unwrap_or(r * c);
    let st = e.layout().strides();
    Ok(GpuOperand {
        rs: st[nb],
        cs: st[nb + 1],
        batch: batch_stride,
        t: e,
    })
}

/// One GEMM launch's share of a batched product: batch elements z0..z0+z (gridDim.z) and rows
/// m0..m0+m of each (gridDim.y = ceil(m / tile_m)).
#[cfg(feature = "cuda")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct GemmChunk {
    z0: usize,
    z: usize,
    m0: usize,
    m: usize,
}

/// The launches of an `nb`-batch product of `m` rows with `tile_m`-row blocks: gridDim.z and
/// gridDim.y are at most 65535 each, so larger batches and taller matrices (a linear layer
/// folds every batch row into M) go in chunks. Row chunks are multiples of `tile_m` rows, so
/// a chunk's first row keeps the tensor-core kernel's 16-byte alignment (row strides there
/// are multiples of 8 elements, or the row stride is 1 and the chunk start a multiple of 8).
#[cfg(feature = "cuda")]
fn gemm_chunks(nb: usize, m: usize, tile_m: usize) -> Vec<GemmChunk> {
    const MAX_GRID: usize = 65535;
    let max_m = MAX_GRID * tile_m;
    let mut out = Vec::new();
    for z0 in (0..nb).step_by(MAX_GRID) {
        for m0 in (0..m).step_by(max_m) {
            out.push(GemmChunk {
                z0,
                z: (nb - z0).min(MAX_GRID),
                m0,
                m: (m - m0).min(max_m),
            });
        }
    }
    out
}

/// kernels/gemm.cu: for bf16 operands that meet the tensor-core alignment rules (16-byte
/// pointers, leading dims and batch strides multiples of 8) `gemm_tma_{n,t}{n,t}_bf16` on sm_90a
/// devices (`gemm_wgmma_*` where an operand cannot be a tensor map), else
/// `gemm_bf16_{n,t}{n,t}_bf16` (mma.sync); `gemm_simt_bf16` for other bf16
/// operands and `gemm_simt_f32` for f32. [`crate::cuda::with_gemm_kernel`] pins a family. C is
/// contiguous [batch, m, n]; beta = 0 (C is never read).
#[cfg(feature = "cuda")]
fn matmul_cuda(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    a: &Tensor,
    b: &Tensor,
    batch: &[usize],
    (m, k, n): (usize, usize, usize),
    out_shape: &[usize],
) -> Result<Tensor> {
    use crate::cuda::{GemmKernel, GemmParams, SimtParams};
    use cudarc::driver::sys::CUfunction_attribute;
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    const OP: &str = "matmul";
    // kernels/gemm.cu WG_SMEM_BYTES(BN): four stages of a 16 KB A tile and a BN / 8 KB B tile,
    // and 1 KB to align the base; TMA_SMEM_BYTES(BN): the same plus eight mbarriers.
    let wgmma_smem_bytes = |tile_n: usize| (4 * (16 * 1024 + tile_n * 128) + 1024) as u32;
    const TMA_BARRIER_BYTES: u32 = 2 * 4 * 8;
    super::same_dtype(OP, a, b)?;
    let tn = super::tname(OP, a.dtype())?;
    if out_shape.iter().product::<usize>() == 0 || k == 0 {
        // Empty, or an empty sum: a zero-filled output is the answer.
        return super::cuda_zeros(dev, a.dtype(), out_shape);
    }
    // Every kernel below writes each element of C (beta = 0: C is never read).
    let out = super::cuda_uninit(dev, a.dtype(), out_shape)?;
    // Linear layers ([.., m, k]·[k, n], contiguous activations): one GEMM over all rows.
    let (batch, m): (Vec<usize>, usize) = if b.rank() == 2 && a.is_contiguous() {
        (vec![], out.numel() / n)
    } else {
        (batch.to_vec(), m)
    };
    let a2 = if batch.is_empty() && a.rank() > 2 {
        a.detach().reshape_to(&[m, k])?
    } else {
        a.detach()
    };
    let (oa, ob) = (
        gpu_operand(&a2, &batch, m, k)?,
        gpu_operand(b, &batch, k, n)?,
    );
    let nb: usize = batch.iter().product();
    // bf16 operands the tensor cores cannot take only for their leading dim or alignment (an
    // LM head's 50257-wide gradient) are copied to padded rows first.
    let (oa, ob) = if tn == "bf16" && crate::cuda::gemm_kernel()? != GemmKernel::Simt {
        (
            repitch_for_tensor_cores(dev, oa, nb, m, k)?,
            repitch_for_tensor_cores(dev, ob, nb, k, n)?,
        )
    } else {
        (oa, ob)
    };
    let (pa, pb, pc) = (super::ptr(&oa.t)?, super::ptr(&ob.t)?, super::ptr(&out)?);
    let esz = a.dtype().size_in_bytes() as u64;
    // Tensor-core layouts: A 'n' has unit column stride, 't' unit row stride (likewise B).
    let a_layout = if oa.cs == 1 {
        Some(('n', oa.rs))
    } else if oa.rs == 1 {
        Some(('t', oa.cs))
    } else {
        None
    };
    let b_layout = if ob.cs == 1 {
        Some(('n', ob.rs))
    } else if ob.rs == 1 {
        Some(('t', ob.cs))
    } else {
        None
    };
    let tensor_cores = match (tn, a_layout, b_layout) {
        ("bf16", Some((_, lda)), Some((_, ldb))) => {
            pa % 16 == 0
                && pb % 16 == 0
                && [lda, ldb, oa.batch, ob.batch].iter().all(|v| v % 8 == 0)
        }
        _ => false,
    };
    // The kernels take M, N and K as i32.
    if [m, n, k].iter().any(|&v| v > i32::MAX as usize) {
        return Err(Error::cuda(
            OP,
            format!("m = {m}, n = {n}, k = {k}: the GEMM kernels take sizes below 2^31"),
        ));
    }
    let choice = crate::cuda::gemm_kernel()?;
    let has_wgmma = dev.arch().has_wgmma();
    if matches!(choice, GemmKernel::Tma | GemmKernel::Wgmma) && !has_wgmma {
        return Err(Error::cuda(
            OP,
            format!(
                "the {choice} GEMM was asked for, but kernels for device {} ({}) are compiled \
                 for {}: wgmma needs compute capability 9.0 (sm_90a)",
                dev.ordinal(),
                dev.name(),
                dev.arch()
            ),
        ));
    }
    // 't': TMA-fed wgmma (falling back to 'w' per launch under Auto), 'w': cp.async-fed
    // wgmma, 'm': mma.sync, 's': SIMT.
    let family = match choice {
        GemmKernel::Simt => 's',
        _ if !tensor_cores => 's',
        GemmKernel::Mma => 'm',
        GemmKernel::Wgmma => 'w',
        GemmKernel::Auto | GemmKernel::Tma if has_wgmma => 't',
        GemmKernel::Auto | GemmKernel::Tma => 'm',
    };
    let tile_m = if family == 's' { 64 } else { 128 };
    // The wgmma kernels' tile width: 256, or 128 when 256-wide tiles would fill fewer than two
    // waves of the card (twice the blocks; wave quantisation and pipeline fill cost less).
    let wg_tile_n = match crate::cuda::gemm_tile_n() {
        Some(t) if crate::cuda::WGMMA_TILE_NS.contains(&t) => t,
        Some(t) => {
            return Err(Error::cuda(
                OP,
                format!("no {t}-column wgmma tile: the kernels have 128 and 256"),
            ))
        }
        None if n.div_ceil(256) * m.div_ceil(128) * nb.max(1) < 2 * dev.sm_count() => 128,
        None => 256,
    };
    for GemmChunk { z0, z, m0, m: mc } in gemm_chunks(nb, m, tile_m) {
        // Rows m0.. of A and C: A[m, k] sits at m·rs + k·cs in either storage order.
        let (ca, cb, cc) = (
            pa + (z0 * oa.batch + m0 * oa.rs) as u64 * esz,
            pb + (z0 * ob.batch) as u64 * esz,
            pc + (z0 * m * n + m0 * n) as u64 * esz,
        );
        if let (true, Some((la, lda)), Some((lb, ldb))) = (family != 's', a_layout, b_layout) {
            // Tensor maps for the TMA kernel: this chunk's A rows (M-chunk columns when A is
            // 't') and all of B, boxes as kernels/gemm.cu lists them.
            let maps = if family == 't' {
                let (ma_rows, ma_cols, ma_box) = if la == 'n' { (mc, k, 128) } else { (k, mc, 64) };
                let (mb_rows, mb_cols, mb_box) = if lb == 't' {
                    (n, k, wg_tile_n as u32)
                } else {
                    (k, n, 64)
                };
                let a_map = tma_map(ca, ma_cols, ma_rows, lda, z, oa.batch, ma_box);
                let b_map = tma_map(cb, mb_cols, mb_rows, ldb, z, ob.batch, mb_box);
                match (a_map, b_map) {
                    (Ok(a), Ok(b)) => Some((a, b)),
                    (Err(e), _) | (_, Err(e)) if choice == GemmKernel::Tma => return Err(e),
                    _ => None,
                }
            } else {
                None
            };
            let wgmma = family == 'w' || (family == 't' && maps.is_none());
            let entry = if maps.is_some() {
                format!("gemm_tma_{la}{lb}_bf16_n{wg_tile_n}")
            } else if wgmma {
                format!("gemm_wgmma_{la}{lb}_bf16_n{wg_tile_n}")
            } else {
                format!("gemm_bf16_{la}{lb}_bf16")
            };
            let p = GemmParams {
                m: mc as i32,
                n: n as i32,
                k: k as i32,
                lda: lda as i64,
                ldb: ldb as i64,
                ldc: n as i64,
                stride_a: oa.batch as i64,
                stride_b: ob.batch as i64,
                stride_c: (m * n) as i64,
                alpha: 1.0,
                beta: 0.0,
            };
            // TMA and wgmma: 128 × wg_tile_n block tiles in dynamic shared memory (TMA: a
            // third, producer, warpgroup); mma.sync: 128 × 128, static.
            let (tile_n, threads, smem) = if maps.is_some() {
                (
                    wg_tile_n,
                    384,
                    wgmma_smem_bytes(wg_tile_n) + TMA_BARRIER_BYTES,
                )
            } else if wgmma {
                (wg_tile_n, 256, wgmma_smem_bytes(wg_tile_n))
            } else {
                (128, 256, 0)
            };
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(tile_n) as u32, mc.div_ceil(128) as u32, z as u32),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: smem,
            };
            let f = dev.function("gemm", &entry)?;
            if smem > 0 {
                // Dynamic shared memory beyond 48 KB must be opted into per function.
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
                .map_err(crate::cuda::device::driver_err(
                    OP,
                    format!("allowing {entry} {smem} bytes of dynamic shared memory"),
                ))?;
            }
            let mut l = dev.stream().launch_builder(&f);
            l.arg(&p);
            if let Some((a_map, b_map)) = &maps {
                l.arg(a_map).arg(b_map);
            } else {
                l.arg(&ca).arg(&cb);
            }
            l.arg(&cc);
            // SAFETY: gemm_{wgmma,bf16}_*(GemmParams p, const bf16* a, const bf16* b, bf16* c)
            // or gemm_tma_*(GemmParams p, TmaMap map_a, TmaMap map_b, bf16* c), the maps
            // describing the same views as ca/cb with the same sizes (bounds-checked by the TMA
            // unit); the strides describe views inside a's and b's storages (batch chunk z0..
            // and row chunk m0.. included), c is a fresh [nb, m, n] buffer; alignment and
            // multiple-of-8 rules checked above; dynamic shared memory within the limit set.
            unsafe { super::launch(OP, &entry, l, cfg)? };
        } else {
            let entry = format!("gemm_simt_{tn}");
            let p = SimtParams {
                m: mc as i32,
                n: n as i32,
                k: k as i32,
                sam: oa.rs as i64,
                sak: oa.cs as i64,
                sbk: ob.rs as i64,
                sbn: ob.cs as i64,
                ldc: n as i64,
                stride_a: oa.batch as i64,
                stride_b: ob.batch as i64,
                stride_c: (m * n) as i64,
                alpha: 1.0,
                beta: 0.0,
            };
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(64) as u32, mc.div_ceil(64) as u32, z as u32),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let f = dev.function("gemm", &entry)?;
            let mut l = dev.stream().launch_builder(&f);
            l.arg(&p).arg(&ca).arg(&cb).arg(&cc);
            // SAFETY: gemm_simt_T(SimtParams p, const T* a, const T* b, T* c): any strides
            // inside the operands' storages; c a fresh [nb, m, n] buffer of T.
            unsafe { super::launch(OP, &entry, l, cfg)? };
        }
    }
    Ok(out)
}

/// `o` (an [r, c] bf16 operand, `nb` batch elements) as the tensor-core GEMMs want it: when
/// it has a unit-stride dim but its leading dim, batch stride or address breaks their rules
/// (16-byte aligned, multiples of 8 elements), a copy in a fresh buffer whose rows are padded
/// to a multiple of 8 elements — one 2-D device copy, a few hundred microseconds for GPT-2's
/// 8192 × 50257 logit gradient, against a SIMT GEMM many times slower than the tensor cores.
/// The padding is never read (the kernels bound every access by M, N and K). Operands without
/// a unit stride, with overlapping rows, or whose batch elements are not evenly stacked rows
/// are returned unchanged (the SIMT kernel takes them).
#[cfg(feature = "cuda")]
fn repitch_for_tensor_cores(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    o: GpuOperand,
    nb: usize,
    r: usize,
    c: usize,
) -> Result<GpuOperand> {
    const OP: &str = "matmul";
    // Stored rows: `rows` of `len` elements, `ld` apart ('n': rows of A[m, ·]; 't': of Aᵀ).
    let (rows, len, ld, transposed) = if o.cs == 1 {
        (r, c, o.rs, false)
    } else if o.rs == 1 {
        (c, r, o.cs, true)
    } else {
        return Ok(o);
    };
    let src = super::ptr(&o.t)?;
    let aligned = src.is_multiple_of(16) && ld.is_multiple_of(8) && o.batch.is_multiple_of(8);
    if aligned || rows == 0 || len == 0 || ld < len {
        return Ok(o);
    }
    // The batch as one stack of rows: one matrix (broadcast, or a single batch element), or
    // batch elements exactly `rows` rows apart.
    let mats = if o.batch == 0 || nb <= 1 {
        1
    } else if o.batch == rows * ld {
        nb
    } else {
        return Ok(o);
    };
    let ld2 = len.div_ceil(8) * 8;
    let padded = super::cuda_zeros(dev, crate::DType::BF16, &[mats * rows * ld2])?;
    let dst = super::ptr(&padded)?;
    // SAFETY: src holds mats·rows rows of len bf16 elements ld apart (the operand's view, its
    // batch elements stacked as checked above, ld >= len); dst is a fresh buffer of
    // mats·rows·ld2 elements; distinct allocations do not overlap.
    unsafe {
        super::cuda_copy_2d(OP, dev, (dst, ld2 * 2), (src, ld * 2), len * 2, mats * rows)?;
    }
    let batch = if mats == 1 { 0 } else { rows * ld2 };
    let (rs, cs) = if transposed { (1, ld2) } else { (ld2, 1) };
    Ok(GpuOperand {
        t: padded,
        rs,
        cs,
        batch,
    })
}

/// A TMA tensor map of a bf16 operand for kernels/gemm.cu `gemm_tma_*`: `rows` rows of `cols`
/// contiguous elements at device address `base`, rows `ld` elements apart, `batch` matrices
/// `batch_stride` elements apart (0: one matrix read for every batch element), 128-byte
/// swizzle, boxes of 64 columns × `box_rows` rows. Out-of-bounds elements read as zero. An
/// error when the driver refuses the description.
#[cfg(feature = "cuda")]
fn tma_map(
    base: u64,
    cols: usize,
    rows: usize,
    ld: usize,
    batch: usize,
    batch_stride: usize,
    box_rows: u32,
) -> Result<crate::cuda::TmaMap> {
    use cudarc::driver::sys;
    let batch = if batch_stride == 0 { 1 } else { batch };
    let dims: [u64; 3] = [cols as u64, rows as u64, batch as u64];
    // Byte strides of dims 1 and 2 (dim 0 is contiguous). A single matrix's batch stride is
    // never used; the driver still wants a valid one.
    let batch_stride = if batch == 1 { rows * ld } else { batch_stride };
    let strides: [u64; 2] = [2 * ld as u64, 2 * batch_stride as u64];
    let boxes: [u32; 3] = [64, box_rows, 1];
    let element_strides: [u32; 3] = [1, 1, 1];
    let mut map = crate::cuda::TmaMap { opaque: [0; 16] };
    // SAFETY: map is a 128-byte, 64-byte-aligned CUtensorMap (size asserted in params.rs); the
    // arrays hold rank = 3 dims, boxes and element strides and rank − 1 strides, and outlive
    // the call, which only reads them and writes map.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            (&mut map as *mut crate::cuda::TmaMap).cast::<sys::CUtensorMap>(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            3,
            base as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::cuda(
            "matmul",
            format!(
                "cuTensorMapEncodeTiled refused a bf16 operand of {batch} x {rows} x {cols} \
                 (row stride {ld}, batch stride {batch_stride} elements, box 64 x {box_rows}): {r:?}"
            ),
        ));
    }
    Ok(map)
}

impl Tensor {
    /// Matrix product over the last two dims, broadcasting the leading (batch) dims.
    pub fn matmul(&self, other: &Tensor) -> Result<Tensor> {
        let out = matmul_forward(self, other)?;
        let (a, b) = (self.detach(), other.detach());
        let needs = (self.tracks_grad(), other.tracks_grad());
        Ok(Tensor::record(out, "matmul", &[self, other], move |g| {
            let ga = if needs.0 {
                Some(g.matmul(&b.t()?)?.sum_to_shape(a.shape())?)
            } else {
                None
            };
            let gb = if needs.1 {
                Some(matmul_weight_grad(&a, g, b.shape())?.sum_to_shape(b.shape())?)
            } else {
                None
            };
            Ok(vec![ga, gb])
        }))
    }
}

impl Tensor {
    /// A linear layer, `self · w + bias`: `self` is [.., k], `w` [k, n] (any strides, e.g. a
    /// transposed view), `bias` [n]. The same values, bitwise, and the same gradients as
    /// `self.matmul(w)?.add(bias)`; on the CPU with contiguous rows the bias is added in the
    /// GEMM's epilogue, saving a pass over the output. Other layouts, dtypes and devices take
    /// the composed path.
    pub fn linear(&self, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let fused = self.device() == crate::Device::Cpu
            && w.device() == crate::Device::Cpu
            && bias.device() == crate::Device::Cpu
            && [self, w, bias]
                .iter()
                .all(|t| t.dtype() == crate::DType::F32)
            && self.rank() >= 2
            && self.is_contiguous()
            && w.rank() == 2
            && bias.rank() == 1
            && bias.is_contiguous()
            && self.shape()[self.rank() - 1] == w.shape()[0]
            && bias.shape()[0] == w.shape()[1];
        if !fused {
            return self.matmul(w)?.add(bias);
        }
        let n = w.shape()[1];
        let mut out_shape = self.shape().to_vec();
        *out_shape.last_mut().expect("rank >= 2") = n;
        let out = gemm_rows(self, w, Some(&bias.f32_data()?), &out_shape)?;
        let (x, wd) = (self.detach(), w.detach());
        let needs = (self.tracks_grad(), w.tracks_grad(), bias.tracks_grad());
        Ok(Tensor::record(out, "linear", &[self, w, bias], move |g| {
            let gx = match needs.0 {
                true => Some(g.matmul(&wd.t()?)?),
                false => None,
            };
            let gw = match needs.1 {
                true => Some(matmul_weight_grad(&x, g, wd.shape())?),
                false => None,
            };
            let gb = match needs.2 {
                true => Some(g.sum_to_shape(&[n])?),
                false => None,
            };
            Ok(vec![gx, gw, gb])
        }))
    }
}

/// Aᵀ·dC, folding batch dims into the reduction when B was a 2-D weight (one GEMM, not a
/// batched product followed by a sum).
fn matmul_weight_grad(a: &Tensor, g: &Tensor, b_shape: &[usize]) -> Result<Tensor> {
    let (k, n) = (a.shape()[a.rank() - 1], g.shape()[g.rank() - 1]);
    let b_batch: usize = b_shape[..b_shape.len() - 2].iter().product();
    if a.rank() > 2 && b_batch == 1 && a.is_contiguous() && g.is_contiguous() {
        let rows: usize = a.shape()[..a.rank() - 1].iter().product();
        let a2 = a.reshape_to(&[rows, k])?;
        let g2 = g.reshape_to(&[rows, n])?;
        let full = a2.t()?.matmul(&g2)?;
        // [k, n] holds B's elements: its batch dims are all 1 (possibly more of them than A
        // has batch dims), so B's own shape is the right one.
        return full.reshape_to(b_shape);
    }
    a.t()?.matmul(g)
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::check_gradients;
    use crate::{Parameter, Tensor};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

        /// `linear` (bias in the GEMM epilogue) against the composed matmul + add: bitwise
        /// values, and the same gradients for x, w (also as a transposed view) and the bias.
        #[test]
        fn linear_equals_matmul_then_add(
            b in 1usize..4, t in 1usize..20, k in 1usize..70, n in 1usize..70,
            transposed in any::<bool>(), seed in any::<u64>(),
        ) {
            let x = Parameter::new(Tensor::randn(&[b, t, k], 0.0, 1.0, seed));
            let w = if transposed {
                Parameter::new(Tensor::randn(&[n, k], 0.0, 1.0, seed ^ 1))
            } else {
                Parameter::new(Tensor::randn(&[k, n], 0.0, 1.0, seed ^ 1))
            };
            let bias = Parameter::new(Tensor::randn(&[n], 0.0, 1.0, seed ^ 2));
            let dy = Tensor::randn(&[b, t, n], 0.0, 1.0, seed ^ 3);
            let run = |fused: bool| {
                let wv = if transposed { w.tensor().t().unwrap() } else { w.tensor() };
                let y = if fused {
                    x.tensor().linear(&wv, &bias.tensor()).unwrap()
                } else {
                    x.tensor().matmul(&wv).unwrap().add(&bias.tensor()).unwrap()
                };
                y.mul(&dy).unwrap().sum_all().unwrap().backward().unwrap();
                let grads: Vec<Vec<f64>> =
                    [&x, &w, &bias].iter().map(|p| p.grad().unwrap().to_f64_vec()).collect();
                [&x, &w, &bias].iter().for_each(|p| p.zero_grad());
                (y.to_f64_vec(), grads)
            };
            let (y1, g1) = run(true);
            let (y2, g2) = run(false);
            prop_assert_eq!(y1, y2);
            for (a, e) in g1.iter().flatten().zip(g2.iter().flatten()) {
                prop_assert!((a - e).abs() <= 1e-5 * (1.0 + e.abs()), "grad {} vs {}", a, e);
            }
        }
    }

    /// Every launch stays inside the grid limits (65535 blocks in y and z) and together they
    /// cover each (batch, row) exactly once.
    #[cfg(feature = "cuda")]
    #[test]
    fn gemm_chunks_respect_grid_limits_and_cover_everything() {
        use super::{gemm_chunks, GemmChunk};
        assert_eq!(
            gemm_chunks(3, 100, 64),
            vec![GemmChunk {
                z0: 0,
                z: 3,
                m0: 0,
                m: 100
            }]
        );
        for (nb, m, tile) in [
            (1, 65535 * 64 + 1, 64),
            (70_000, 10, 128),
            (2, 65535 * 128 * 2 + 5, 128),
        ] {
            let chunks = gemm_chunks(nb, m, tile);
            let mut rows = 0usize;
            for c in &chunks {
                assert!(c.z >= 1 && c.z <= 65535 && c.m >= 1, "{c:?}");
                assert!(c.m.div_ceil(tile) <= 65535, "{c:?}");
                assert_eq!(c.m0 % 8, 0, "{c:?}");
                rows += c.z * c.m;
            }
            assert_eq!(rows, nb * m, "{nb} x {m}");
        }
        assert!(gemm_chunks(0, 5, 64).is_empty());
    }

    #[test]
    fn linear_shape_errors_and_fallbacks() {
        let x = Tensor::randn(&[2, 3, 4], 0.0, 1.0, 1);
        let w = Tensor::randn(&[4, 5], 0.0, 1.0, 2);
        assert!(x.linear(&w, &Tensor::zeros(&[4])).is_err());
        assert!(x
            .linear(&Tensor::zeros(&[3, 5]), &Tensor::zeros(&[5]))
            .is_err());
        // A non-contiguous input takes the composed path: same values.
        let xt = Tensor::randn(&[2, 4, 3], 0.0, 1.0, 3)
            .transpose(1, 2)
            .unwrap();
        let bias = Tensor::randn(&[5], 0.0, 1.0, 4);
        assert_eq!(
            xt.linear(&w, &bias).unwrap().to_f64_vec(),
            xt.matmul(&w).unwrap().add(&bias).unwrap().to_f64_vec()
        );
    }

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    c[i * n + j] += a[i * k + p] * b[p * n + j];
                }
            }
        }
        c
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn matmul_matches_triple_loop(m in 1usize..300, k in 1usize..300, n in 1usize..300,
                                      ta in any::<bool>(), tb in any::<bool>(), seed in 0u64..1000) {
            // Optionally build the operands as transposed views of stored transposes.
            let a = if ta { Tensor::randn(&[k, m], 0.0, 1.0, seed).t().unwrap() } else { Tensor::randn(&[m, k], 0.0, 1.0, seed) };
            let b = if tb { Tensor::randn(&[n, k], 0.0, 1.0, seed + 1).t().unwrap() } else { Tensor::randn(&[k, n], 0.0, 1.0, seed + 1) };
            let c = a.matmul(&b).unwrap().to_f64_vec();
            let want = naive(&a.to_f64_vec(), &b.to_f64_vec(), m, k, n);
            for (x, y) in c.iter().zip(&want) {
                prop_assert!((x - y).abs() <= 1e-4 * (k as f64).sqrt() * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn batched_broadcast_matmul() {
        let a = Tensor::randn(&[2, 1, 3, 4], 0.0, 1.0, 1);
        let b = Tensor::randn(&[5, 4, 2], 0.0, 1.0, 2);
        let c = a.matmul(&b).unwrap();
        assert_eq!(c.shape(), &[2, 5, 3, 2]);
        let (av, bv, cv) = (a.to_f64_vec(), b.to_f64_vec(), c.to_f64_vec());
        for i in 0..2 {
            for j in 0..5 {
                let want = naive(&av[i * 12..][..12], &bv[j * 8..][..8], 3, 4, 2);
                for (x, y) in cv[(i * 5 + j) * 6..][..6].iter().zip(&want) {
                    assert!((x - y).abs() < 1e-5);
                }
            }
        }
        assert!(Tensor::zeros(&[2, 3])
            .matmul(&Tensor::zeros(&[4, 2]))
            .is_err());
    }

    #[test]
    fn matmul_gradients() {
        let a = Tensor::randn(&[2, 3, 4], 0.0, 1.0, 3);
        let b = Tensor::randn(&[4, 5], 0.0, 1.0, 4);
        let err = check_gradients(&[a.clone(), b.clone()], |x| x[0].matmul(&x[1]), 1e-2).unwrap();
        assert!(err < 1e-3, "{err}");
        let b3 = Tensor::randn(&[1, 5, 4], 0.0, 1.0, 5);
        let err = check_gradients(&[a, b3], |x| x[0].matmul(&x[1].t()?), 1e-2).unwrap();
        assert!(err < 1e-3, "{err}");
    }
}
