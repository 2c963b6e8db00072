//! Reductions over one dimension, with `keepdim`: sum, mean, max and argmax (primitives), and
//! logsumexp and var (composed, so their gradients come from the primitives').
//!
//! On CUDA (kernels/reduce.cu) a reduction over the last dim runs one block per row, over any
//! other dim one thread per output element along the middle dim of [outer, len, inner], and a
//! reduction of every element (sum_all, a 1-D sum) in two passes through per-block partials.
//! Launch shapes come from the tensor's shape alone, so results are bitwise reproducible.

use crate::cpu::vec;
use crate::layout::resolve_dim;
use crate::{Result, Tensor};

/// Splits a shape around `dim` into (outer, n, inner) element counts.
fn split(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    (
        shape[..dim].iter().product(),
        shape[dim],
        shape[dim + 1..].iter().product(),
    )
}

fn reduced_shape(shape: &[usize], dim: usize, keepdim: bool) -> Vec<usize> {
    let mut s = shape.to_vec();
    if keepdim {
        s[dim] = 1;
    } else {
        s.remove(dim);
    }
    s
}

/// The CPU sum over `d` (SIMD row sums, or whole inner rows added with axpy), untracked.
fn sum_cpu(x: &Tensor, d: usize, out_shape: &[usize]) -> Result<Tensor> {
    let (outer, n, inner) = split(x.shape(), d);
    let x = x.f32_data()?;
    let mut out = crate::cpu::pool::zeroed(outer * inner);
    if inner == 1 {
        for (o, row) in out.iter_mut().zip(x.chunks(n.max(1))) {
            *o = if n == 0 { 0.0 } else { vec::sum(row) };
        }
    } else if n > 0 && inner > 0 {
        // Accumulate whole inner rows with the SIMD axpy: fixed order, deterministic.
        // (An empty dim leaves the zeros; `chunks(0)` would panic.)
        for (o, block) in out.chunks_mut(inner).zip(x.chunks(n * inner)) {
            for row in block.chunks(inner) {
                vec::axpy(1.0, row, o);
            }
        }
    }
    Ok(Tensor::f32_owned(out, out_shape))
}

/// Threads per block of every reduce.cu launch (the file's header).
#[cfg(feature = "cuda")]
const REDUCE_THREADS: u32 = 256;

/// Elements per block of the first pass of a whole-tensor reduction: the partial count G
/// depends on the element count alone (never on the card), as reduce.cu's header asks.
#[cfg(feature = "cuda")]
const PARTIAL_CHUNK: usize = 4096;

/// `scale · kind(x)` over dim `d` (`None`: over every element) with kernels/reduce.cu, where
/// `kind` is `sum`, `max` or `sumsq`: a new untracked contiguous tensor of `out_shape` (whose
/// element count is the product of the other dims) in x's dtype. `op` names the caller in
/// errors. An empty reduction gives 0 for sums and -inf for max, as the kernels define.
///
/// Shared with other op families: cross_entropy sums its per-row losses with it, and the
/// global gradient norm can use `sumsq`.
#[cfg(feature = "cuda")]
pub(crate) fn reduce_cuda(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    op: &'static str,
    kind: &str,
    x: &Tensor,
    d: Option<usize>,
    out_shape: &[usize],
    scale: f32,
) -> Result<Tensor> {
    use crate::cuda::storage::rows_config;
    use crate::DType;
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let tn = super::tname(op, x.dtype())?;
    let (outer, len, inner) = match d {
        Some(d) => split(x.shape(), d),
        None => (1, x.numel(), 1),
    };
    debug_assert_eq!(out_shape.iter().product::<usize>(), outer * inner);
    if outer * inner == 0 || len == 0 {
        // No outputs, or empty sums: zeros (cuda_zeros) — but an empty max is -inf.
        let out = super::cuda_zeros(dev, x.dtype(), out_shape)?;
        return if kind == "max" && out.numel() > 0 {
            out.add_scalar(f32::NEG_INFINITY)
        } else {
            Ok(out)
        };
    }
    let x = super::dense(x)?;
    let px = super::ptr(&x)?;
    // One block per row of x viewed as [rows, cols].
    let rows_launch = |rows: usize, cols: usize, out: &Tensor| {
        let entry = format!("reduce_{kind}_rows_{tn}");
        let (r64, c64, po) = (rows as i64, cols as i64, super::ptr(out)?);
        let f = dev.function("reduce", &entry)?;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&r64).arg(&c64).arg(&px).arg(&po).arg(&scale);
        // SAFETY: reduce_OP_rows_T(i64 rows, i64 cols, const T* x, T* out, float scale): x is a
        // contiguous [rows, cols] buffer of T, out a fresh buffer of `rows` elements of T.
        unsafe { super::launch(op, &entry, l, rows_config(rows, REDUCE_THREADS)) }
    };
    if outer * inner == 1 {
        // Every element into one: two passes when there is more than one chunk of work, so
        // that more than one block takes part.
        let g = len.div_ceil(PARTIAL_CHUNK).min(1024);
        if g == 1 {
            let out = super::cuda_uninit(dev, x.dtype(), out_shape)?;
            rows_launch(1, len, &out)?;
            return Ok(out);
        }
        let partial = super::cuda_uninit(dev, DType::F32, &[g])?;
        let entry = format!("reduce_{kind}_partial_{tn}");
        let (n64, pp) = (len as i64, super::ptr(&partial)?);
        let f = dev.function("reduce", &entry)?;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&n64).arg(&px).arg(&pp);
        let cfg = LaunchConfig {
            grid_dim: (g as u32, 1, 1),
            block_dim: (REDUCE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: reduce_OP_partial_T(i64 n, const T* x, float* partial): x holds n contiguous
        // elements of T; partial holds gridDim.x = g floats.
        unsafe { super::launch(op, &entry, l, cfg)? };
        // Second pass over the f32 partials (the scale applies once, here). sumsq's second
        // pass adds the partial sums of squares: plain sums.
        let kind2 = if kind == "max" { "max" } else { "sum" };
        let finish = |out: &Tensor| -> Result<()> {
            let entry = format!("reduce_{kind2}_rows_f32");
            let (rows, cols, po) = (1i64, g as i64, super::ptr(out)?);
            let f = dev.function("reduce", &entry)?;
            let mut l = dev.stream().launch_builder(&f);
            l.arg(&rows).arg(&cols).arg(&pp).arg(&po).arg(&scale);
            // SAFETY: reduce_OP_rows_f32(i64 rows, i64 cols, const float* x, float* out,
            // float scale): the partials are one contiguous row of g floats, out one f32.
            unsafe { super::launch(op, &entry, l, rows_config(1, REDUCE_THREADS)) }
        };
        return via_f32(dev, x.dtype(), out_shape, finish);
    }
    if inner == 1 {
        let out = super::cuda_uninit(dev, x.dtype(), out_shape)?;
        rows_launch(outer, len, &out)?;
        return Ok(out);
    }
    if let Some((chunk, splits)) = midsplit_plan(outer * inner, len) {
        // Few outputs over a long dim (bias and other weight gradients): S row ranges in
        // parallel into f32 partials, then one pass over them.
        let n = outer * inner;
        let partial = super::cuda_uninit(dev, DType::F32, &[splits, n])?;
        let entry = format!("reduce_{kind}_midsplit_{tn}");
        let (o64, l64, i64_, c64) = (outer as i64, len as i64, inner as i64, chunk as i64);
        let pp = super::ptr(&partial)?;
        let f = dev.function("reduce", &entry)?;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&o64).arg(&l64).arg(&i64_).arg(&c64).arg(&px).arg(&pp);
        let mut cfg = mid_config(n);
        cfg.grid_dim.1 = splits as u32;
        // SAFETY: reduce_OP_midsplit_T(i64 outer, i64 len, i64 inner, i64 chunk, const T* x,
        // float* partial): x a contiguous [outer, len, inner] buffer of T; gridDim.y = splits =
        // ceil(len / chunk) ≤ 65535 (midsplit_plan), so partial's [splits, n] floats cover
        // every block's writes.
        unsafe { super::launch(op, &entry, l, cfg)? };
        let kind2 = if kind == "max" { "max" } else { "sum" };
        let finish = |out: &Tensor| -> Result<()> {
            let entry = format!("reduce_{kind2}_mid_f32");
            let (o64, l64, i64_, po) = (1i64, splits as i64, n as i64, super::ptr(out)?);
            let f = dev.function("reduce", &entry)?;
            let mut l = dev.stream().launch_builder(&f);
            l.arg(&o64)
                .arg(&l64)
                .arg(&i64_)
                .arg(&pp)
                .arg(&po)
                .arg(&scale);
            // SAFETY: reduce_OP_mid_f32(i64 outer, i64 len, i64 inner, const float* x, float*
            // out, float scale): the partials are a contiguous [1, splits, n] f32 buffer, out
            // n floats.
            unsafe { super::launch(op, &entry, l, mid_config(n)) }
        };
        return via_f32(dev, x.dtype(), out_shape, finish);
    }
    let out = super::cuda_uninit(dev, x.dtype(), out_shape)?;
    let entry = format!("reduce_{kind}_mid_{tn}");
    let (o64, l64, i64_, po) = (outer as i64, len as i64, inner as i64, super::ptr(&out)?);
    let f = dev.function("reduce", &entry)?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&o64)
        .arg(&l64)
        .arg(&i64_)
        .arg(&px)
        .arg(&po)
        .arg(&scale);
    // SAFETY: reduce_OP_mid_T(i64 outer, i64 len, i64 inner, const T* x, T* out, float scale):
    // x is a contiguous [outer, len, inner] buffer of T, out a fresh [outer, inner] one.
    unsafe { super::launch(op, &entry, l, mid_config(outer * inner))? };
    Ok(out)
}

/// Outputs below which a middle-dim reduction is split over row ranges: the one-pass kernel
/// runs one thread per output, which leaves most of a GPU idle (a bias gradient has a few
/// thousand outputs, each a sum over B·T rows).
#[cfg(feature = "cuda")]
const MIDSPLIT_MAX_OUTPUTS: usize = 1 << 16;
/// Fewest rows per range.
#[cfg(feature = "cuda")]
const MIDSPLIT_MIN_CHUNK: usize = 64;

/// `(chunk, splits)` for a `reduce_*_midsplit` launch over `len` rows with `outputs` results, or
/// `None` when the one-pass kernel suffices. Chosen from the sizes alone (never from the card),
/// so a reduction sums in the same order everywhere: about MIDSPLIT_MAX_OUTPUTS threads, each
/// over at least MIDSPLIT_MIN_CHUNK rows; `splits` = ceil(len / chunk) ≤ 32768 (a valid
/// gridDim.y).
#[cfg(feature = "cuda")]
fn midsplit_plan(outputs: usize, len: usize) -> Option<(usize, usize)> {
    if !(2..MIDSPLIT_MAX_OUTPUTS).contains(&outputs) || len < 2 * MIDSPLIT_MIN_CHUNK {
        return None;
    }
    let want = MIDSPLIT_MAX_OUTPUTS.div_ceil(outputs);
    let chunk = len.div_ceil(want).max(MIDSPLIT_MIN_CHUNK);
    let splits = len.div_ceil(chunk);
    (splits > 1).then_some((chunk, splits))
}

/// A fresh f32 tensor of `shape` on `dev` written by `finish` (the last pass of a two-pass
/// reduction, which accumulates in f32), then in `dtype` (a cast on the device for bf16; the
/// tensor itself for f32).
#[cfg(feature = "cuda")]
fn via_f32(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    dtype: crate::DType,
    shape: &[usize],
    finish: impl FnOnce(&Tensor) -> Result<()>,
) -> Result<Tensor> {
    let total = super::cuda_uninit(dev, crate::DType::F32, shape)?;
    finish(&total)?;
    total.to_dtype(dtype)
}

/// The launch of reduce.cu's one-thread-per-output kernels (*_mid, argmax_mid, argmax_bwd):
/// 256 threads, gridDim.x = min(ceil(n / 256), 65535), grid-stride loops.
#[cfg(feature = "cuda")]
fn mid_config(n: usize) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig {
        grid_dim: (
            n.div_ceil(REDUCE_THREADS as usize).clamp(1, 65535) as u32,
            1,
            1,
        ),
        block_dim: (REDUCE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The largest element along `d` and its index (the CPU's `max_with_index` order: the first
/// maximum; NaN only at index 0) with `reduce_argmax_{rows,mid}_T`: values in x's dtype and
/// i64 indices, both of `out_shape`, untracked. An empty dim is an error, as on the CPU.
#[cfg(feature = "cuda")]
fn argmax_cuda(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    x: &Tensor,
    d: usize,
    out_shape: &[usize],
) -> Result<(Tensor, Tensor)> {
    use crate::cuda::storage::rows_config;
    use cudarc::driver::PushKernelArg;
    const OP: &str = "max";
    let tn = super::tname(OP, x.dtype())?;
    let (outer, len, inner) = split(x.shape(), d);
    if len == 0 {
        return Err(crate::Error::invalid(
            OP,
            format!("reduction over empty dim {d} of shape {:?}", x.shape()),
        ));
    }
    let out = super::cuda_uninit(dev, x.dtype(), out_shape)?;
    let idx = super::cuda_uninit(dev, crate::DType::I64, out_shape)?;
    if outer * inner == 0 {
        return Ok((out, idx));
    }
    let x = super::dense(x)?;
    let (px, po, pi) = (super::ptr(&x)?, super::ptr(&out)?, super::ptr(&idx)?);
    if inner == 1 {
        let entry = format!("reduce_argmax_rows_{tn}");
        let (rows, cols) = (outer as i64, len as i64);
        let f = dev.function("reduce", &entry)?;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&rows).arg(&cols).arg(&px).arg(&po).arg(&pi);
        // SAFETY: reduce_argmax_rows_T(i64 rows, i64 cols, const T* x, T* out, i64* idx): x a
        // contiguous [rows, cols] buffer of T (cols ≥ 1), out and idx fresh [rows] buffers.
        unsafe { super::launch(OP, &entry, l, rows_config(outer, REDUCE_THREADS))? };
    } else {
        let entry = format!("reduce_argmax_mid_{tn}");
        let (o64, l64, i64_) = (outer as i64, len as i64, inner as i64);
        let f = dev.function("reduce", &entry)?;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&o64).arg(&l64).arg(&i64_).arg(&px).arg(&po).arg(&pi);
        // SAFETY: reduce_argmax_mid_T(i64 outer, i64 len, i64 inner, const T* x, T* out,
        // i64* idx): x a contiguous [outer, len, inner] buffer of T (len ≥ 1), out and idx
        // fresh [outer, inner] buffers.
        unsafe { super::launch(OP, &entry, l, mid_config(outer * inner))? };
    }
    Ok((out, idx))
}

/// The backward of max on CUDA: zeros of `in_shape` with `g` written at the forward's
/// indices (`reduce_argmax_bwd_T`).
#[cfg(feature = "cuda")]
fn max_backward_cuda(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    idx: &Tensor,
    g: &Tensor,
    in_shape: &[usize],
    d: usize,
) -> Result<Tensor> {
    use cudarc::driver::PushKernelArg;
    const OP: &str = "max backward";
    let tn = super::tname(OP, g.dtype())?;
    let (outer, len, inner) = split(in_shape, d);
    let dx = super::cuda_zeros(dev, g.dtype(), in_shape)?;
    if outer * inner == 0 || len == 0 {
        return Ok(dx);
    }
    let g = super::dense(g)?;
    let entry = format!("reduce_argmax_bwd_{tn}");
    let (o64, l64, i64_) = (outer as i64, len as i64, inner as i64);
    let (pi, pg, pd) = (super::ptr(idx)?, super::ptr(&g)?, super::ptr(&dx)?);
    let f = dev.function("reduce", &entry)?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&o64).arg(&l64).arg(&i64_).arg(&pi).arg(&pg).arg(&pd);
    // SAFETY: reduce_argmax_bwd_T(i64 outer, i64 len, i64 inner, const i64* idx, const T*
    // dout, T* dx): idx and dout contiguous [outer, inner] (idx from argmax_cuda, each in
    // 0..len), dx a fresh zero-filled [outer, len, inner] buffer of T.
    unsafe { super::launch(OP, &entry, l, mid_config(outer * inner))? };
    Ok(dx)
}

impl Tensor {
    /// Sum over `dim` (negative counts from the end).
    pub fn sum(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        let d = resolve_dim("sum", dim, self.shape())?;
        let out_shape = reduced_shape(self.shape(), d, keepdim);
        #[cfg(feature = "cuda")]
        let out = match super::cuda_inputs("sum", &[self])? {
            Some(dev) => reduce_cuda(&dev, "sum", "sum", self, Some(d), &out_shape, 1.0)?,
            None => sum_cpu(self, d, &out_shape)?,
        };
        #[cfg(not(feature = "cuda"))]
        let out = sum_cpu(self, d, &out_shape)?;
        let keep_shape = reduced_shape(self.shape(), d, true);
        let in_shape = self.shape().to_vec();
        Ok(Tensor::record(out, "sum", &[self], move |g| {
            Ok(vec![Some(
                g.reshape_to(&keep_shape)?
                    .broadcast_to(&in_shape)?
                    .contiguous()?,
            )])
        }))
    }

    /// Sum of all elements, as a 0-dimensional tensor.
    pub fn sum_all(&self) -> Result<Tensor> {
        let n = self.numel();
        self.reshape_to(&[n])?.sum(0, false)
    }

    /// Mean over `dim`.
    pub fn mean(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        let n = self.dim(dim)?;
        self.sum(dim, keepdim)?.mul_scalar(1.0 / n as f32)
    }

    /// Mean of all elements.
    pub fn mean_all(&self) -> Result<Tensor> {
        let n = self.numel();
        self.sum_all()?.mul_scalar(1.0 / n as f32)
    }

    /// Variance over `dim`, with Bessel's correction when `unbiased` (PyTorch's default).
    pub fn var(&self, dim: isize, keepdim: bool, unbiased: bool) -> Result<Tensor> {
        let n = self.dim(dim)?;
        let centred = self.sub(&self.mean(dim, true)?)?;
        let denom = if unbiased { n.saturating_sub(1) } else { n };
        centred
            .square()?
            .sum(dim, keepdim)?
            .mul_scalar(1.0 / denom as f32)
    }

    /// Index of the largest element along `dim` (the first on ties), as i64.
    pub fn argmax(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        let d = resolve_dim("argmax", dim, self.shape())?;
        let out_shape = reduced_shape(self.shape(), d, keepdim);
        #[cfg(feature = "cuda")]
        if let Some(dev) = super::cuda_inputs("argmax", &[self])? {
            return Ok(argmax_cuda(&dev, self, d, &out_shape)?.1);
        }
        let (idx, _) = self.max_with_index(d)?;
        Tensor::from_vec(idx.into_iter().map(|i| i as i64).collect(), &out_shape)
    }

    fn max_with_index(&self, d: usize) -> Result<(Vec<usize>, Vec<f32>)> {
        let (outer, n, inner) = split(self.shape(), d);
        if n == 0 {
            return Err(crate::Error::invalid(
                "max",
                format!("reduction over empty dim {d} of shape {:?}", self.shape()),
            ));
        }
        let x = self.f32_data()?;
        let mut idx = vec![0usize; outer * inner];
        let mut val = vec![f32::NEG_INFINITY; outer * inner];
        for o in 0..outer {
            for j in 0..n {
                let row = &x[(o * n + j) * inner..][..inner];
                for i in 0..inner {
                    // `>` keeps the first maximum; NaN compares false and is skipped.
                    if row[i] > val[o * inner + i] || j == 0 {
                        val[o * inner + i] = row[i];
                        idx[o * inner + i] = j;
                    }
                }
            }
        }
        Ok((idx, val))
    }

    /// Largest element along `dim`. The gradient flows to the first maximal element.
    pub fn max(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        let d = resolve_dim("max", dim, self.shape())?;
        #[cfg(feature = "cuda")]
        if let Some(dev) = super::cuda_inputs("max", &[self])? {
            let out_shape = reduced_shape(self.shape(), d, keepdim);
            let (out, idx) = argmax_cuda(&dev, self, d, &out_shape)?;
            let in_shape = self.shape().to_vec();
            return Ok(Tensor::record(out, "max", &[self], move |g| {
                Ok(vec![Some(max_backward_cuda(&dev, &idx, g, &in_shape, d)?)])
            }));
        }
        let (idx, val) = self.max_with_index(d)?;
        let out = Tensor::f32_owned(val, &reduced_shape(self.shape(), d, keepdim));
        let in_shape = self.shape().to_vec();
        Ok(Tensor::record(out, "max", &[self], move |g| {
            let (outer, n, inner) = split(&in_shape, d);
            let gv = g.f32_data()?;
            let mut gx = crate::cpu::pool::zeroed(outer * n * inner);
            for o in 0..outer {
                for i in 0..inner {
                    gx[(o * n + idx[o * inner + i]) * inner + i] = gv[o * inner + i];
                }
            }
            Ok(vec![Some(Tensor::f32_owned(gx, &in_shape))])
        }))
    }

    /// log Σ exp over `dim`, computed stably by shifting with the (detached) maximum.
    pub fn logsumexp(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        let m = self.detach().max(dim, true)?;
        // A row of all -inf would give -inf - -inf = NaN; shift such rows by a finite value
        // instead. The bound must survive the store in m's dtype: f32::MAX rounds to +inf in
        // bf16 (a GPU tensor), so bf16 clamps to bf16's own largest finite value.
        let big = match m.dtype() {
            crate::DType::BF16 => half::bf16::MAX.to_f32(),
            _ => f32::MAX,
        };
        let m = m.clamp(-big, big)?;
        let s = self.sub(&m)?.exp()?.sum(dim, true)?.log()?.add(&m)?;
        if keepdim {
            Ok(s)
        } else {
            s.squeeze(dim)
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(feature = "cuda")]
    #[test]
    fn midsplit_plans_cover_every_row_once_within_grid_limits() {
        use super::{midsplit_plan, MIDSPLIT_MAX_OUTPUTS, MIDSPLIT_MIN_CHUNK};
        // A GPT-2 bias gradient: 768 outputs over 1024 rows.
        assert_eq!(midsplit_plan(768, 1024), Some((64, 16)));
        assert_eq!(midsplit_plan(768, 100), None, "short dims stay one pass");
        assert_eq!(
            midsplit_plan(MIDSPLIT_MAX_OUTPUTS, 1 << 20),
            None,
            "enough outputs"
        );
        assert_eq!(
            midsplit_plan(1, 1 << 20),
            None,
            "one output: the *_partial path"
        );
        let mut rng = crate::Rng::new(5);
        for _ in 0..2000 {
            let outputs = 1 + rng.below(1 << 17) as usize;
            let len = 1 + rng.below(1 << 22) as usize;
            if let Some((chunk, splits)) = midsplit_plan(outputs, len) {
                assert!(chunk >= MIDSPLIT_MIN_CHUNK && splits > 1 && splits <= 65535);
                assert!(
                    chunk * splits >= len && (splits - 1) * chunk < len,
                    "{outputs} {len}"
                );
            }
        }
    }

    use crate::gradcheck::check_gradients;
    use crate::Tensor;

    #[test]
    fn sums_over_each_dim() {
        let x = Tensor::arange(0.0, 24.0, 1.0)
            .unwrap()
            .reshape(&[2, 3, 4])
            .unwrap();
        assert_eq!(x.sum(1, false).unwrap().shape(), &[2, 4]);
        assert_eq!(x.sum(0, true).unwrap().to_f64_vec()[..2], [12.0, 14.0]);
        assert_eq!(x.sum(-1, false).unwrap().to_f64_vec()[0], 6.0);
        assert_eq!(x.sum_all().unwrap().item().unwrap(), 276.0);
    }

    #[test]
    fn max_argmax_and_ties() {
        let x = Tensor::from_vec(vec![1.0f32, 3.0, 3.0, 0.0], &[2, 2]).unwrap();
        assert_eq!(
            x.argmax(1, false).unwrap().to_i64_vec().unwrap(),
            vec![1, 0]
        );
        assert_eq!(x.max(1, false).unwrap().to_f64_vec(), vec![3.0, 3.0]);
    }

    #[test]
    fn reduction_gradients() {
        let x = Tensor::randn(&[3, 4, 2], 0.0, 1.0, 5);
        for (name, f) in [
            (
                "sum",
                (|x: &[Tensor]| x[0].sum(1, false)) as fn(&[Tensor]) -> crate::Result<Tensor>,
            ),
            ("mean", |x| x[0].mean(-1, true)),
            ("max", |x| x[0].max(0, false)),
            ("logsumexp", |x| x[0].logsumexp(1, false)),
            ("var", |x| x[0].var(1, false, true)),
        ] {
            let err = check_gradients(std::slice::from_ref(&x), f, 1e-3).unwrap();
            assert!(err < 2e-3, "{name}: {err}");
        }
    }
}
