//! Tensor storage in GPU memory, the per-process device registry, and the small helpers every
//! op's CUDA dispatch uses (device pointers with offsets, 1-D launch shapes, fresh outputs).
//!
//! One stream per device: every allocation, copy and launch of the engine goes onto the
//! device's default stream, so stream order alone orders a kernel after the kernels that wrote
//! its inputs, and buffers are freed (stream-ordered) after the last launch that reads them.

use super::device::CudaDevice;
use crate::layout::Layout;
use crate::storage::Storage;
use crate::{DType, Error, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, ValidAsZeroBits};
use half::bf16;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The open devices of this process, by ordinal. Opening a device creates a context and loads
/// modules lazily, so each ordinal is opened once and shared by every tensor on it.
pub fn device(ordinal: usize) -> Result<Arc<CudaDevice>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
    let map = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
    // A poisoned lock only means a thread panicked while opening a device; the map holds only
    // fully opened devices, so it is still valid.
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(d) = map.get(&ordinal) {
        return Ok(d.clone());
    }
    let d = Arc::new(CudaDevice::new(ordinal)?);
    map.insert(ordinal, d.clone());
    Ok(d)
}

/// A device buffer of one dtype. bf16 is held as raw u16 bits (the kernels' `bf16` type).
pub enum CudaBuffer {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<u16>),
    I64(CudaSlice<i64>),
    I32(CudaSlice<i32>),
    U32(CudaSlice<u32>),
    U8(CudaSlice<u8>),
}

/// The elements of one or more tensors in GPU memory.
pub struct CudaStorage {
    device: Arc<CudaDevice>,
    buf: CudaBuffer,
}

fn driver(op: &'static str, what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
    let what = what.to_string();
    move |e| Error::cuda(op, format!("{what}: {e:?}"))
}

fn upload<T: DeviceRepr + ValidAsZeroBits>(dev: &CudaDevice, v: &[T]) -> Result<CudaSlice<T>> {
    // Through the engine's allocator, for its out-of-memory retry.
    let mut s = alloc(dev, v.len(), false)?;
    dev.stream()
        .memcpy_htod(v, &mut s)
        .map_err(driver("to_device", "host-to-device copy"))?;
    Ok(s)
}

fn download<T: DeviceRepr>(dev: &CudaDevice, s: &CudaSlice<T>) -> Result<Vec<T>> {
    dev.stream()
        .clone_dtoh(s)
        .map_err(driver("to_device", "device-to-host copy"))
}

/// `n` elements of fresh device memory (never a zero-length allocation: some drivers return a
/// null pointer for it, and kernels are not launched for empty outputs anyway), zero-filled
/// when `zeroed`. Running out of memory first hands the pool's cached free memory back to the
/// driver and tries once more ([`CudaDevice::retry_after_trim`]).
fn alloc<T: DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    n: usize,
    zeroed: bool,
) -> Result<CudaSlice<T>> {
    let stream = dev.stream();
    let try_alloc = || -> std::result::Result<CudaSlice<T>, cudarc::driver::DriverError> {
        // SAFETY: the buffer is either zero-filled right here or handed to a caller that
        // promises (CudaStorage::uninit) to write every element before anything reads it.
        let mut s = unsafe { stream.alloc::<T>(n.max(1)) }?;
        if zeroed {
            stream.memset_zeros(&mut s)?;
        }
        Ok(s)
    };
    let what = format!("{n} elements of {} bytes", std::mem::size_of::<T>());
    dev.retry_after_trim(try_alloc)
        .map_err(driver("cuda alloc", &what))
}

impl CudaStorage {
    /// A zero-filled buffer of `len` elements of `dtype` (f16 has no CUDA storage), for
    /// outputs a kernel accumulates into or writes only in part.
    pub fn zeros(device: &Arc<CudaDevice>, dtype: DType, len: usize) -> Result<CudaStorage> {
        CudaStorage::alloc(device, dtype, len, true)
    }

    /// A buffer of `len` elements of `dtype` whose contents are undefined: for outputs that
    /// the next kernel writes in full before anything reads them (most op outputs), which
    /// then cost no memset. The emulator (tools/cuda-emu) fills fresh memory with NaN bytes,
    /// so a kernel that leaves an element unwritten fails its GPU test there.
    pub fn uninit(device: &Arc<CudaDevice>, dtype: DType, len: usize) -> Result<CudaStorage> {
        CudaStorage::alloc(device, dtype, len, false)
    }

    fn alloc(
        device: &Arc<CudaDevice>,
        dtype: DType,
        len: usize,
        zeroed: bool,
    ) -> Result<CudaStorage> {
        let d = device.as_ref();
        let buf = match dtype {
            DType::F32 => CudaBuffer::F32(alloc(d, len, zeroed)?),
            DType::BF16 => CudaBuffer::BF16(alloc(d, len, zeroed)?),
            DType::I64 => CudaBuffer::I64(alloc(d, len, zeroed)?),
            DType::I32 => CudaBuffer::I32(alloc(d, len, zeroed)?),
            DType::U32 => CudaBuffer::U32(alloc(d, len, zeroed)?),
            DType::U8 => CudaBuffer::U8(alloc(d, len, zeroed)?),
            DType::F16 => return Err(no_f16()),
        };
        Ok(CudaStorage {
            device: device.clone(),
            buf,
        })
    }

    /// Copies `len` row-major host elements of `dtype` (raw little-endian bytes) to the device.
    pub fn from_host(device: &Arc<CudaDevice>, host: &Storage) -> Result<CudaStorage> {
        let bad = || Error::cuda("to_device", "host storage not readable as its dtype");
        let buf = match host.dtype() {
            DType::F32 => CudaBuffer::F32(upload(device, host.as_slice::<f32>().ok_or_else(bad)?)?),
            DType::BF16 => {
                let v: &[bf16] = host.as_slice().ok_or_else(bad)?;
                CudaBuffer::BF16(upload(device, bytemuck::cast_slice::<bf16, u16>(v))?)
            }
            DType::I64 => CudaBuffer::I64(upload(device, host.as_slice::<i64>().ok_or_else(bad)?)?),
            DType::I32 => CudaBuffer::I32(upload(device, host.as_slice::<i32>().ok_or_else(bad)?)?),
            DType::U32 => CudaBuffer::U32(upload(device, host.as_slice::<u32>().ok_or_else(bad)?)?),
            DType::U8 => CudaBuffer::U8(upload(device, host.as_slice::<u8>().ok_or_else(bad)?)?),
            DType::F16 => return Err(no_f16()),
        };
        Ok(CudaStorage {
            device: device.clone(),
            buf,
        })
    }

    /// Copies every element back to a host storage (waits for the stream).
    pub fn to_host(&self) -> Result<Storage> {
        let d = &self.device;
        Ok(match &self.buf {
            CudaBuffer::F32(s) => Storage::F32(download(d, s)?),
            CudaBuffer::BF16(s) => {
                Storage::BF16(download(d, s)?.into_iter().map(bf16::from_bits).collect())
            }
            CudaBuffer::I64(s) => Storage::I64(download(d, s)?),
            CudaBuffer::I32(s) => Storage::I32(download(d, s)?),
            CudaBuffer::U32(s) => Storage::U32(download(d, s)?),
            CudaBuffer::U8(s) => Storage::U8(download(d, s)?),
        })
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    pub fn buffer(&self) -> &CudaBuffer {
        &self.buf
    }

    pub fn dtype(&self) -> DType {
        match self.buf {
            CudaBuffer::F32(_) => DType::F32,
            CudaBuffer::BF16(_) => DType::BF16,
            CudaBuffer::I64(_) => DType::I64,
            CudaBuffer::I32(_) => DType::I32,
            CudaBuffer::U32(_) => DType::U32,
            CudaBuffer::U8(_) => DType::U8,
        }
    }

    /// Number of elements (a zero-length storage holds one unused element, see `zeros`).
    pub fn len(&self) -> usize {
        match &self.buf {
            CudaBuffer::F32(s) => s.len(),
            CudaBuffer::BF16(s) => s.len(),
            CudaBuffer::I64(s) => s.len(),
            CudaBuffer::I32(s) => s.len(),
            CudaBuffer::U32(s) => s.len(),
            CudaBuffer::U8(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device address of element `offset`, for a kernel argument. The engine uses one
    /// stream per device, so no cross-stream event is needed: stream order covers it.
    pub fn ptr(&self, offset: usize) -> u64 {
        let stream = self.device.stream();
        let (base, _) = match &self.buf {
            CudaBuffer::F32(s) => s.device_ptr(stream),
            CudaBuffer::BF16(s) => s.device_ptr(stream),
            CudaBuffer::I64(s) => s.device_ptr(stream),
            CudaBuffer::I32(s) => s.device_ptr(stream),
            CudaBuffer::U32(s) => s.device_ptr(stream),
            CudaBuffer::U8(s) => s.device_ptr(stream),
        };
        base + (offset * self.dtype().size_in_bytes()) as u64
    }
}

fn no_f16() -> Error {
    Error::cuda(
        "to_device",
        "f16 has no CUDA storage in this engine (the kernels take f32 and bf16): convert with \
         to_dtype(DType::BF16) or to_dtype(DType::F32) first",
    )
}

/// Threads per block of the 1-D elementwise kernels (kernels/elementwise.cu header).
pub const ELEMENTWISE_THREADS: u32 = 256;

/// The one-thread-per-item launch (embedding, gather, ...): blockDim 256, gridDim
/// min(ceil(n/256), 65535); the kernels loop grid-stride, so the cap is only a cap.
pub fn elementwise_config(n: usize) -> LaunchConfig {
    grid_stride_config(n, 1)
}

/// blockDim 256, gridDim min(ceil(n / (256 · per_thread)), 65535).
pub fn grid_stride_config(n: usize, per_thread: usize) -> LaunchConfig {
    let per_block = ELEMENTWISE_THREADS as usize * per_thread;
    let blocks = n.div_ceil(per_block).clamp(1, 65535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (ELEMENTWISE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Elements per thread of a map kernel of kernels/elementwise.cu on its flat vector path: one
/// step of its flat_map.
pub const MAP_ELEMENTS_PER_THREAD: usize = 8;

/// The launch of a kernels/elementwise.cu map (binary, compare, unary, casts, where, dropout,
/// GELU backward): blockDim 256; `vector` (the kernel takes its 16-byte vector path: every
/// operand flat and 16-byte aligned, see [`vector_path`]): gridDim min(ceil(n / 2048), 65535),
/// about 8 elements a thread; else one element a thread, as [`elementwise_config`]. The
/// kernels loop grid-stride, so either is correct.
pub fn map_config(n: usize, vector: bool) -> LaunchConfig {
    grid_stride_config(n, if vector { MAP_ELEMENTS_PER_THREAD } else { 1 })
}

/// Whether a map kernel with a vector path takes it: every operand flat (`layouts`, as
/// [`coalesced`] gives them) and every pointer (`ptrs`, outputs included) 16-byte aligned,
/// the test the kernels make.
pub fn vector_path(layouts: &[super::Strided], ptrs: &[u64]) -> bool {
    layouts.iter().all(|l| l.rank == 0) && ptrs.iter().all(|p| p % 16 == 0)
}

/// Whether an operand of a binary kernel is one its vector path reads: flat, or one row of C
/// elements repeated ([`coalesced`] shape [R, C], strides [0, 1], C a multiple of 8: a bias
/// over activations), elementwise.cu's `vector_period`.
pub fn row_vector_operand(l: &super::Strided) -> bool {
    l.rank == 0 || (l.rank == 2 && l.stride[..2] == [0, 1] && l.shape[1] % 8 == 0)
}

/// Whether a binary kernel takes its vector path: every operand flat or a repeated row
/// ([`row_vector_operand`]), every pointer 16-byte aligned.
pub fn binary_vector_path(layouts: &[super::Strided], ptrs: &[u64]) -> bool {
    layouts.iter().all(row_vector_operand) && ptrs.iter().all(|p| p % 16 == 0)
}

/// One block per row (softmax, layer norm forward, row reductions): blockDim `threads`,
/// gridDim min(rows, 65535); the kernels loop over rows.
pub fn rows_config(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.clamp(1, 65535) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The kernel layouts of several operands read at one output shape (`shape`, with each
/// operand's element `strides` over it, stride 0 on broadcast dims), with the index arithmetic
/// cut down: dims of extent 1 dropped, and adjacent dims merged wherever every operand allows
/// (stride of the outer = stride of the inner × extent of the inner, in each), which keeps the
/// row-major order of the elements, so flat index i names the same element. An operand that is
/// then row-major contiguous is flat. A bias [C] added to [B, T, C] activations becomes a flat
/// operand and a [B·T, C] one with strides [0, 1]: one division per element instead of three.
pub fn coalesced<const K: usize>(
    shape: &[usize],
    strides: [&[usize]; K],
) -> Result<[super::Strided; K]> {
    let mut dims: Vec<(usize, [usize; K])> = Vec::with_capacity(shape.len());
    for (d, &n) in shape.iter().enumerate() {
        if n == 1 {
            continue;
        }
        let st: [usize; K] = std::array::from_fn(|k| strides[k][d]);
        match dims.last_mut() {
            Some((pn, pst)) if (0..K).all(|k| pst[k] == st[k] * n) => {
                *pn *= n;
                *pst = st;
            }
            _ => dims.push((n, st)),
        }
    }
    let extents: Vec<usize> = dims.iter().map(|(n, _)| *n).collect();
    let mut out = [super::Strided::flat(); K];
    for (k, o) in out.iter_mut().enumerate() {
        let st: Vec<usize> = dims.iter().map(|(_, s)| s[k]).collect();
        if !Layout::from_parts(extents.clone(), st.clone(), 0).is_contiguous() {
            *o = super::Strided::new(&extents, &st)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::Strided;

    /// The offset of flat element `i` through a kernel layout, as strided_offset computes it.
    fn offset(l: &Strided, mut i: usize) -> usize {
        if l.rank == 0 {
            return i;
        }
        let mut off = 0;
        for d in (0..l.rank as usize).rev() {
            let n = l.shape[d] as usize;
            off += (i % n) * l.stride[d] as usize;
            i /= n;
        }
        off
    }

    #[test]
    fn a_bias_over_activations_coalesces_to_one_flat_and_one_2d_operand() {
        let [a, b] = coalesced(&[2, 3, 4], [&[12, 4, 1], &[0, 0, 1]]).unwrap();
        assert_eq!(a, Strided::flat());
        assert_eq!(b, Strided::new(&[6, 4], &[0, 1]).unwrap());
        // Binary kernels read such a bias 8 at a time when its rows are a multiple of 8 long.
        assert!(!row_vector_operand(&b));
        let [x, bias] = coalesced(&[2, 3, 16], [&[48, 16, 1], &[0, 0, 1]]).unwrap();
        assert!(row_vector_operand(&x) && row_vector_operand(&bias) && bias.rank == 2);
        assert!(!row_vector_operand(
            &Strided::new(&[16, 3], &[1, 0]).unwrap()
        ));
        // A column broadcast stays 2-D; extent-1 dims vanish; a transpose cannot merge.
        let [c] = coalesced(&[5, 1, 3], [&[1, 7, 0]]).unwrap();
        assert_eq!(c, Strided::new(&[5, 3], &[1, 0]).unwrap());
        let [t] = coalesced(&[3, 2], [&[1, 3]]).unwrap();
        assert_eq!(t, Strided::new(&[3, 2], &[1, 3]).unwrap());
        let [one] = coalesced(&[1, 1], [&[5, 9]]).unwrap();
        assert_eq!(one, Strided::flat());
    }

    #[test]
    fn coalescing_never_moves_an_element() {
        // Random broadcast and permuted views: every flat index reaches the same storage
        // offset through the coalesced layouts as through the original ones.
        let mut rng = crate::Rng::new(17);
        for _ in 0..300 {
            let rank = 1 + rng.below(5) as usize;
            let shape: Vec<usize> = (0..rank).map(|_| 1 + rng.below(4) as usize).collect();
            let mut ops: Vec<Vec<usize>> = Vec::new();
            for _ in 0..3 {
                // Row-major strides of a random permutation of the dims, some zeroed.
                let mut order: Vec<usize> = (0..rank).collect();
                for i in (1..rank).rev() {
                    order.swap(i, rng.below(i as u64 + 1) as usize);
                }
                let mut st = vec![0; rank];
                let mut acc = 1;
                for &d in order.iter().rev() {
                    st[d] = if rng.below(4) == 0 { 0 } else { acc };
                    acc *= shape[d];
                }
                ops.push(st);
            }
            let got = coalesced(&shape, [&ops[0][..], &ops[1][..], &ops[2][..]]).unwrap();
            let n: usize = shape.iter().product();
            for (k, l) in got.iter().enumerate() {
                let orig = Strided::new(&shape, &ops[k]).unwrap();
                for i in 0..n {
                    assert_eq!(
                        offset(l, i),
                        offset(&orig, i),
                        "shape {shape:?} strides {:?} element {i}",
                        ops[k]
                    );
                }
            }
        }
    }
}
