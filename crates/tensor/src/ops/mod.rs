//! Ops, one module per family. Each module holds the public methods on [`Tensor`], the forward
//! computation (calling the SIMD kernels in [`crate::cpu`]), the backward rule recorded with
//! [`Tensor::record`] right beside it, and its tests.
//!
//! The primitive set is small; the rest (var, logsumexp, masked_fill, dropout, the composed
//! attention reference) is built from primitives and gets its gradient for free.

pub mod attention;
pub mod binary;
pub mod concat;
pub mod cross_entropy;
pub mod dropout;
pub mod embedding;
pub mod gather;
pub mod layer_norm;
pub mod matmul;
pub mod reduce;
pub mod softmax;
pub mod unary;

use crate::{Result, Tensor};

/// An `Error::Cuda` when an index tensor (ids, indices, targets) is on a GPU while the data
/// it indexes is on the CPU: indices may follow their data up to a GPU (see ops/embedding.rs),
/// but data never silently comes down to the host.
pub(crate) fn indices_on_host(op: &'static str, idx: &Tensor) -> Result<()> {
    if idx.device() == crate::Device::Cpu {
        return Ok(());
    }
    Err(crate::Error::cuda(
        op,
        format!(
            "indices of shape {:?} are on {} but the data is on the CPU: move them with \
             to_device(Device::Cpu), or the data to their GPU",
            idx.shape(),
            idx.device()
        ),
    ))
}

/// Applies a slice kernel to the f32 elements of `x`, producing an untracked contiguous tensor.
/// The kernel must write every element of its output (a pooled buffer with stale values).
pub(crate) fn map_f32(x: &Tensor, kernel: impl Fn(&[f32], &mut [f32])) -> Result<Tensor> {
    let src = x.f32_data()?;
    let mut out = crate::cpu::pool::for_overwrite(src.len());
    kernel(&src, &mut out);
    Ok(Tensor::f32_owned(out, x.shape()))
}

/// Applies a two-input slice kernel to same-shape tensors; as [`map_f32`], it must write every
/// output element.
pub(crate) fn zip_f32(
    a: &Tensor,
    b: &Tensor,
    kernel: impl Fn(&[f32], &[f32], &mut [f32]),
) -> Result<Tensor> {
    debug_assert_eq!(a.shape(), b.shape());
    let (sa, sb) = (a.f32_data()?, b.f32_data()?);
    let mut out = crate::cpu::pool::for_overwrite(sa.len());
    kernel(&sa, &sb, &mut out);
    Ok(Tensor::f32_owned(out, a.shape()))
}

#[cfg(feature = "cuda")]
pub(crate) use cuda_common::*;

/// What every op's CUDA dispatch shares: which device the inputs are on, dtype names of the
/// kernel entry points, fresh outputs, device pointers and the launch itself.
#[cfg(feature = "cuda")]
mod cuda_common {
    use crate::cuda::{CudaDevice, CudaStorage};
    use crate::layout::Layout;
    use crate::storage::Storage;
    use crate::tensor::GradTrack;
    use crate::{DType, Device, Error, Result, Tensor};
    use cudarc::driver::{DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};
    use std::sync::Arc;

    /// The CUDA device all of `inputs` are on; `None` when all are on the CPU. Inputs split
    /// between devices are an error: ops never copy between devices on their own.
    pub(crate) fn cuda_inputs(
        op: &'static str,
        inputs: &[&Tensor],
    ) -> Result<Option<Arc<CudaDevice>>> {
        let first = inputs.iter().find_map(|t| t.cuda_storage());
        let Some(first) = first else {
            return Ok(None);
        };
        let want = Device::Cuda(first.device().ordinal());
        if let Some(t) = inputs.iter().find(|t| t.device() != want) {
            return Err(Error::cuda(
                op,
                format!(
                    "inputs on {want} and {} (shape {:?}): move them to one device with \
                     to_device first",
                    t.device(),
                    t.shape()
                ),
            ));
        }
        Ok(Some(first.device().clone()))
    }

    /// The entry-point suffix of a compute dtype (`f32`, `bf16`); other dtypes are an error.
    pub(crate) fn tname(op: &'static str, dtype: DType) -> Result<&'static str> {
        match dtype {
            DType::F32 => Ok("f32"),
            DType::BF16 => Ok("bf16"),
            d => Err(Error::cuda(
                op,
                format!("no CUDA kernel for dtype {d} (the kernels take f32 and bf16)"),
            )),
        }
    }

    /// Operands of one op must share a dtype on CUDA (no implicit casts on the GPU).
    pub(crate) fn same_dtype(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
        if a.dtype() != b.dtype() {
            return Err(Error::DTypeMismatch {
                op,
                expected: a.dtype(),
                got: b.dtype(),
            });
        }
        Ok(())
    }

    /// A new zero-filled contiguous tensor of `shape` on `dev`: for outputs a kernel
    /// accumulates into or writes only in part, and for empty results whose answer is zeros.
    pub(crate) fn cuda_zeros(
        dev: &Arc<CudaDevice>,
        dtype: DType,
        shape: &[usize],
    ) -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(cuda_tensor(CudaStorage::zeros(dev, dtype, n)?, shape))
    }

    /// A new contiguous tensor of `shape` on `dev` with undefined contents, for an output the
    /// caller's next kernel writes in full (no memset: see [`CudaStorage::uninit`]).
    pub(crate) fn cuda_uninit(
        dev: &Arc<CudaDevice>,
        dtype: DType,
        shape: &[usize],
    ) -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(cuda_tensor(CudaStorage::uninit(dev, dtype, n)?, shape))
    }

    fn cuda_tensor(s: CudaStorage, shape: &[usize]) -> Tensor {
        Tensor::from_parts(
            Arc::new(Storage::Cuda(s)),
            Layout::contiguous(shape),
            GradTrack::None,
        )
    }

    /// The device address of a CUDA tensor's first element (its offset included).
    pub(crate) fn ptr(t: &Tensor) -> Result<u64> {
        let s = t.cuda_storage().ok_or_else(|| {
            Error::cuda(
                "cuda dispatch",
                format!("tensor {:?} is not on a GPU", t.shape()),
            )
        })?;
        Ok(s.ptr(t.layout().offset()))
    }

    /// A contiguous version of a CUDA tensor (a copy kernel when strided), untracked.
    pub(crate) fn dense(t: &Tensor) -> Result<Tensor> {
        if t.is_contiguous() {
            Ok(t.detach())
        } else {
            cuda_unary(t, "copy", 0.0, 0.0)
        }
    }

    /// Launches a built argument list, mapping a driver error to `Error::Cuda` naming `entry`.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameter list in kernels/*.cu in number, order
    /// and type, every pointer must address a live buffer of the stream's device large enough
    /// for what the kernel touches under `cfg`.
    pub(crate) unsafe fn launch(
        op: &'static str,
        entry: &str,
        mut args: LaunchArgs<'_>,
        cfg: LaunchConfig,
    ) -> Result<()> {
        if crate::cuda::profile::enabled() {
            args.record_kernel_launch(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        }
        // SAFETY: the caller's contract (argument list and buffer sizes match the kernel).
        let events = unsafe { args.launch(cfg) }
            .map_err(|e| Error::cuda(op, format!("launching {entry} with {cfg:?}: {e:?}")))?;
        // Events come back only when asked for above.
        match events {
            Some(ev) => crate::cuda::profile::record(entry, ev),
            None => Ok(()),
        }
    }

    /// The kernel arguments that follow `(n, x layout, x, out)` in an elementwise map (see
    /// [`cuda_map`]), pushed in order.
    pub(crate) trait MapTail {
        fn push<'a>(&'a self, b: &mut LaunchArgs<'a>);
    }
    impl MapTail for () {
        fn push<'a>(&'a self, _: &mut LaunchArgs<'a>) {}
    }
    impl<A: DeviceRepr, B: DeviceRepr> MapTail for (A, B) {
        fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
            b.arg(&self.0).arg(&self.1);
        }
    }
    impl<A: DeviceRepr, B: DeviceRepr, C: DeviceRepr> MapTail for (A, B, C) {
        fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
            b.arg(&self.0).arg(&self.1).arg(&self.2);
        }
    }

    /// kernels/elementwise.cu's `entry(i64 n, Strided lx, const From* x, To* out, tail…)` over
    /// `x` read through its layout, into a fresh contiguous tensor of `to` (the shape of unary
    /// ops, casts and dropout). `vector_kernel`: the entry has the flat vector path (unary_*),
    /// which sizes the launch.
    ///
    /// # Safety
    /// `entry` must take exactly those parameters, with From = `x.dtype()`, To = `to` and the
    /// tail's types in order.
    pub(crate) unsafe fn cuda_map(
        op: &'static str,
        x: &Tensor,
        to: DType,
        entry: &str,
        vector_kernel: bool,
        tail: impl MapTail,
    ) -> Result<Tensor> {
        let dev = cuda_inputs(op, &[x])?.ok_or_else(|| Error::cuda(op, "input not on a GPU"))?;
        let out = cuda_uninit(&dev, to, x.shape())?;
        let n = x.numel();
        if n == 0 {
            return Ok(out);
        }
        let [lx] = crate::cuda::storage::coalesced(x.shape(), [x.layout().strides()])?;
        let (px, po, n64) = (ptr(x)?, ptr(&out)?, n as i64);
        let f = dev.function("elementwise", entry)?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(&n64).arg(&lx).arg(&px).arg(&po);
        tail.push(&mut b);
        // SAFETY: the caller's contract gives the parameter list; x is read through its own
        // layout (inside its storage), out holds n elements of `to`.
        let vector = vector_kernel && crate::cuda::storage::vector_path(&[lx], &[px, po]);
        unsafe { launch(op, entry, b, crate::cuda::storage::map_config(n, vector))? };
        Ok(out)
    }

    /// `unary_<name>_T` of kernels/elementwise.cu over any layout: contiguous output.
    pub(crate) fn cuda_unary(x: &Tensor, name: &str, p0: f32, p1: f32) -> Result<Tensor> {
        const OP: &str = "cuda unary";
        let entry = format!("unary_{name}_{}", tname(OP, x.dtype())?);
        // SAFETY: unary_*_T(i64 n, Strided lx, const T* x, T* out, float p0, float p1).
        unsafe { cuda_map(OP, x, x.dtype(), &entry, true, (p0, p1)) }
    }

    /// A contiguous tensor of `shape` on `dev` holding a copy of the host storage `host`
    /// (row-major, `shape`'s element count), untracked.
    pub(crate) fn cuda_from_host(
        dev: &Arc<CudaDevice>,
        host: &Storage,
        shape: &[usize],
    ) -> Result<Tensor> {
        debug_assert_eq!(host.len(), shape.iter().product::<usize>());
        // No zero-length uploads (see CudaStorage::zeros): an empty tensor gets the usual
        // one-element placeholder buffer.
        let s = if host.is_empty() {
            CudaStorage::zeros(dev, host.dtype(), 0)?
        } else {
            CudaStorage::from_host(dev, host)?
        };
        Ok(Tensor::from_parts(
            Arc::new(Storage::Cuda(s)),
            Layout::contiguous(shape),
            GradTrack::None,
        ))
    }

    /// The `bad` flag of the kernels that validate indices on the device (embedding.cu,
    /// gather.cu, cross_entropy.cu): one u64 set to all ones (`u64::MAX`, "no bad index"),
    /// into which a kernel `atomicMin`s the first bad position. Held as an i64 buffer (the
    /// storage has no u64 type); the bits are the same.
    pub(crate) fn cuda_bad_flag(dev: &Arc<CudaDevice>) -> Result<Tensor> {
        cuda_from_host(dev, &Storage::I64(vec![-1]), &[1])
    }

    /// The first bad position a kernel reported in `flag` (None when it is still all ones).
    /// Reading it waits for the stream: callers only do so for indices that live on the GPU
    /// (host indices are checked on the host before upload, with no wait).
    pub(crate) fn read_bad_flag(flag: &Tensor) -> Result<Option<usize>> {
        let v = flag.to_vec::<i64>()?;
        Ok(match v.first() {
            Some(&-1) | None => None,
            Some(&p) => Some(p as u64 as usize),
        })
    }

    /// An integer index tensor (embedding ids, gather indices, cross-entropy targets) as the
    /// kernels read it: contiguous i64 on `dev`.
    ///
    /// The rule for indices (docs in ops/embedding.rs): they may live on the host, in any
    /// integer dtype and layout, or on the op's own GPU. Host indices are copied up and their
    /// values returned, so the op validates them on the host before any launch (the same
    /// error as the CPU path, and no wait for the GPU). Contiguous i64 indices on the GPU are
    /// used in place and validated by the kernel (`bad` flag, read after the launch). Other
    /// GPU indices (a narrowed view, i32 ids) have no copy kernel: they are brought to the
    /// host, converted and copied back, which costs a round trip; their values are returned
    /// like host indices. Indices on another device are an error.
    pub(crate) fn cuda_index_tensor(
        op: &'static str,
        idx: &Tensor,
        dev: &Arc<CudaDevice>,
    ) -> Result<(Tensor, Option<Vec<i64>>)> {
        if idx.dtype().is_float() {
            return Err(Error::invalid(
                op,
                format!(
                    "indices must have an integer dtype, got {} (shape {:?})",
                    idx.dtype(),
                    idx.shape()
                ),
            ));
        }
        let here = Device::Cuda(dev.ordinal());
        match idx.device() {
            d if d == here && idx.dtype() == DType::I64 && idx.is_contiguous() => {
                return Ok((idx.detach(), None));
            }
            Device::Cpu => {}
            d if d == here => {}
            d => {
                return Err(Error::cuda(
                    op,
                    format!(
                        "indices of shape {:?} are on {d} but the op runs on {here}: move them \
                         to one device with to_device first",
                        idx.shape()
                    ),
                ))
            }
        }
        let vals = idx.to_i64_vec()?;
        let t = cuda_from_host(dev, &Storage::I64(vals.clone()), idx.shape())?;
        Ok((t, Some(vals)))
    }

    /// Copies `height` rows of `width` bytes from `src` (rows `src_pitch` bytes apart) to
    /// `dst` (rows `dst_pitch` bytes apart) on `dev`'s stream: one cuMemcpy2DAsync, for
    /// writing a block into a strided slot of a larger tensor (concat) without a kernel.
    ///
    /// # Safety
    /// `src` and `dst` must be device addresses on `dev`, with `height` rows of `width` bytes
    /// at the given pitches inside live buffers, and the two regions must not overlap.
    pub(crate) unsafe fn cuda_copy_2d(
        op: &'static str,
        dev: &Arc<CudaDevice>,
        (dst, dst_pitch): (u64, usize),
        (src, src_pitch): (u64, usize),
        width: usize,
        height: usize,
    ) -> Result<()> {
        use cudarc::driver::sys;
        if width == 0 || height == 0 {
            return Ok(());
        }
        dev.context()
            .bind_to_thread()
            .map_err(|e| Error::cuda(op, format!("binding the CUDA context: {e:?}")))?;
        let stream = dev.stream().cu_stream();
        // The driver refuses 2-D pitches past its maximum (2^31 - 1 bytes on current cards):
        // one row, or rows that long, go as plain linear copies instead.
        if height == 1 || src_pitch.max(dst_pitch) > i32::MAX as usize {
            for r in 0..height {
                let (d, s) = ((dst_pitch * r) as u64, (src_pitch * r) as u64);
                // SAFETY: row r of both regions, inside live buffers of this context by the
                // caller's contract; ordered on the engine's stream.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(dst + d, src + s, width, stream)
                }
                .map_err(|e| {
                    Error::cuda(op, format!("device copy of {width} bytes (row {r}): {e:?}"))
                })?;
            }
            return Ok(());
        }
        let p = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: src,
            srcArray: std::ptr::null_mut(),
            srcPitch: src_pitch,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: dst,
            dstArray: std::ptr::null_mut(),
            dstPitch: dst_pitch,
            WidthInBytes: width,
            Height: height,
        };
        // SAFETY: `p` is a fully initialised descriptor of a device-to-device copy (host and
        // array fields unused and null); the caller guarantees both regions lie in live
        // buffers of this context and do not overlap; the copy is ordered on the engine's
        // one stream like every launch.
        let r = unsafe { sys::cuMemcpy2DAsync_v2(&p, stream) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(Error::cuda(
                op,
                format!(
                    "cuMemcpy2DAsync of {height} rows x {width} bytes (pitches {src_pitch} -> \
                     {dst_pitch}): {r:?}"
                ),
            ));
        }
        Ok(())
    }

    /// `cast_{from}_to_{to}` over any layout (the forward of `to_dtype`), between the dtypes
    /// CUDA storage holds (f32, bf16, i64, i32, u8), element for element as on the CPU.
    pub(crate) fn cuda_cast(x: &Tensor, _s: &CudaStorage, to: DType) -> Result<Tensor> {
        const OP: &str = "to_dtype";
        // CUDA storage holds these; DType's Display gives the kernels' names for them.
        let on_gpu = |d: DType| {
            matches!(
                d,
                DType::F32 | DType::BF16 | DType::I64 | DType::I32 | DType::U8
            )
        };
        if !(on_gpu(x.dtype()) && on_gpu(to)) {
            return Err(Error::cuda(
                OP,
                format!(
                    "no CUDA cast from {} to {to}: CUDA tensors hold f32, bf16, i64, i32 and u8",
                    x.dtype()
                ),
            ));
        }
        let entry = format!("cast_{}_to_{to}", x.dtype());
        // The two float casts have the flat vector path.
        let vector = matches!(
            (x.dtype(), to),
            (DType::F32, DType::BF16) | (DType::BF16, DType::F32)
        );
        // SAFETY: cast_F_to_T(i64 n, Strided lx, const F* x, T* out), F and T named above.
        unsafe { cuda_map(OP, x, to, &entry, vector, ()) }
    }
}
