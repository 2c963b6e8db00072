//! Reference-counted element storage. Tensors share it through `Arc`; views never copy.

use crate::DType;
use half::{bf16, f16};
use std::sync::Arc;

/// Bytes owned elsewhere (a memory-mapped file, say) that a tensor may view without copying.
pub trait ByteSource: Send + Sync {
    fn bytes(&self) -> &[u8];
}

/// The elements behind one or more tensors, on the CPU.
pub enum Storage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    U32(Vec<u32>),
    U8(Vec<u8>),
    /// Elements of `dtype` viewed in place inside `source.bytes()[begin..end]`. Only built when
    /// that range is suitably aligned for the dtype (checked by [`Storage::mapped`]).
    Mapped {
        source: Arc<dyn ByteSource>,
        begin: usize,
        end: usize,
        dtype: DType,
    },
    /// Elements in GPU memory ([`crate::cuda::CudaStorage`]). Not readable from the host:
    /// [`Storage::as_slice`] gives `None`, [`Storage::as_bytes`] an empty slice and
    /// [`Storage::get_f64`] NaN; copy with `Tensor::to_device(Device::Cpu)` first.
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaStorage),
}

/// Element types a tensor can hold, and how they sit in [`Storage`].
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    const DTYPE: DType;
    fn into_storage(v: Vec<Self>) -> Storage;
    fn owned_slice(s: &Storage) -> Option<&[Self]>;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

macro_rules! element {
    ($t:ty, $variant:ident, $to:expr, $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$variant;
            fn into_storage(v: Vec<Self>) -> Storage {
                Storage::$variant(v)
            }
            fn owned_slice(s: &Storage) -> Option<&[Self]> {
                match s {
                    Storage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn to_f64(self) -> f64 {
                let f: fn($t) -> f64 = $to;
                f(self)
            }
            fn from_f64(v: f64) -> Self {
                let f: fn(f64) -> $t = $from;
                f(v)
            }
        }
    };
}

element!(f32, F32, |x| x as f64, |v| v as f32);
element!(bf16, BF16, |x| x.to_f64(), bf16::from_f64);
element!(f16, F16, |x| x.to_f64(), f16::from_f64);
element!(i64, I64, |x| x as f64, |v| v as i64);
element!(i32, I32, |x| x as f64, |v| v as i32);
element!(u32, U32, |x| x as f64, |v| v as u32);
element!(u8, U8, |x| x as f64, |v| v as u8);

impl Drop for Storage {
    /// Large f32 buffers go back to the CPU buffer pool for the next op of their size
    /// (`crate::cpu::pool`), instead of back to the system.
    fn drop(&mut self) {
        if let Storage::F32(v) = self {
            if v.capacity() >= crate::cpu::pool::MIN_ELEMS {
                crate::cpu::pool::recycle(std::mem::take(v));
            }
        }
    }
}

impl Storage {
    /// A zero-copy view of `source.bytes()[begin..end]` as elements of `dtype`; `None` when the
    /// range is out of bounds, not a whole number of elements, or misaligned for the dtype.
    pub fn mapped(
        source: Arc<dyn ByteSource>,
        begin: usize,
        end: usize,
        dtype: DType,
    ) -> Option<Storage> {
        let bytes = source.bytes().get(begin..end)?;
        let size = dtype.size_in_bytes();
        if !bytes.len().is_multiple_of(size) || !(bytes.as_ptr() as usize).is_multiple_of(size) {
            return None;
        }
        Some(Storage::Mapped {
            source,
            begin,
            end,
            dtype,
        })
    }

    pub fn dtype(&self) -> DType {
        match self {
            Storage::F32(_) => DType::F32,
            Storage::BF16(_) => DType::BF16,
            Storage::F16(_) => DType::F16,
            Storage::I64(_) => DType::I64,
            Storage::I32(_) => DType::I32,
            Storage::U32(_) => DType::U32,
            Storage::U8(_) => DType::U8,
            Storage::Mapped { dtype, .. } => *dtype,
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => c.dtype(),
        }
    }

    /// Whether this storage borrows a mapped file rather than owning its elements.
    pub fn is_mapped(&self) -> bool {
        matches!(self, Storage::Mapped { .. })
    }

    /// The GPU storage, when the elements live on a CUDA device.
    #[cfg(feature = "cuda")]
    pub fn as_cuda(&self) -> Option<&crate::cuda::CudaStorage> {
        match self {
            Storage::Cuda(c) => Some(c),
            _ => None,
        }
    }

    /// The device holding the elements.
    pub fn device(&self) -> crate::Device {
        #[cfg(feature = "cuda")]
        if let Storage::Cuda(c) = self {
            return crate::Device::Cuda(c.device().ordinal());
        }
        crate::Device::Cpu
    }

    /// The elements as `T`, or `None` when the dtype differs.
    pub fn as_slice<T: Element>(&self) -> Option<&[T]> {
        match self {
            Storage::Mapped {
                source,
                begin,
                end,
                dtype,
            } if *dtype == T::DTYPE => bytemuck::try_cast_slice(&source.bytes()[*begin..*end]).ok(),
            Storage::Mapped { .. } => None,
            s => T::owned_slice(s),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::BF16(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::I64(v) => v.len(),
            Storage::I32(v) => v.len(),
            Storage::U32(v) => v.len(),
            Storage::U8(v) => v.len(),
            Storage::Mapped {
                begin, end, dtype, ..
            } => (end - begin) / dtype.size_in_bytes(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => c.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw little-endian bytes of all elements.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Storage::F32(v) => bytemuck::cast_slice(v),
            Storage::BF16(v) => bytemuck::cast_slice(v),
            Storage::F16(v) => bytemuck::cast_slice(v),
            Storage::I64(v) => bytemuck::cast_slice(v),
            Storage::I32(v) => bytemuck::cast_slice(v),
            Storage::U32(v) => bytemuck::cast_slice(v),
            Storage::U8(v) => v,
            Storage::Mapped {
                source, begin, end, ..
            } => &source.bytes()[*begin..*end],
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => &[],
        }
    }

    /// Element `i` converted to f64 (any dtype).
    pub fn get_f64(&self, i: usize) -> f64 {
        macro_rules! at {
            ($t:ty) => {
                self.as_slice::<$t>()
                    .map(|s| s[i].to_f64())
                    .unwrap_or(f64::NAN)
            };
        }
        match self.dtype() {
            DType::F32 => at!(f32),
            DType::BF16 => at!(bf16),
            DType::F16 => at!(f16),
            DType::I64 => at!(i64),
            DType::I32 => at!(i32),
            DType::U32 => at!(u32),
            DType::U8 => at!(u8),
        }
    }
}
