//! The [`Tensor`] type: a layout over shared storage, plus its place in the autograd graph.
//!
//! Construction, element access and conversion live here; ops live in [`crate::ops`], one module
//! per op family, each with its backward rule beside its forward.

use crate::autograd::{self, BackwardFn, GradCell, Node};
use crate::layout::{infer_shape, Layout};
use crate::rng::Rng;
use crate::storage::{Element, Storage};
use crate::{DType, Error, Result};
use half::{bf16, f16};
use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The device a tensor lives on.
///
/// `Cuda(n)` is the n-th CUDA device (cargo feature `cuda`, on by default). Ops whose inputs
/// are all on one CUDA device run there when the op has a CUDA kernel (docs/cuda.md lists
/// them); any other combination (a CUDA tensor meeting a CPU tensor, or an op with no CUDA
/// kernel yet) is an [`Error::Cuda`], never a silent copy to the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Device {
    /// Waits until every copy and kernel queued on this device has finished (a no-op on the
    /// CPU, whose ops complete before they return). GPU work is asynchronous, so a host clock
    /// read after an op measures only its launch; benchmarks call this before reading one.
    pub fn synchronize(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => crate::cuda::device(n)?
                .stream()
                .synchronize()
                .map_err(|e| Error::cuda("synchronize", format!("cuda:{n}: {e:?}"))),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(n) => Err(Error::cuda(
                "synchronize",
                format!("cuda:{n}: rlhf-tensor was built without the `cuda` feature"),
            )),
        }
    }
}

/// How a tensor takes part in autograd.
#[derive(Clone)]
pub(crate) enum GradTrack {
    /// A constant: gradients stop here.
    None,
    /// A trainable parameter's value: gradients accumulate in the cell.
    Leaf(Arc<GradCell>),
    /// The output of a recorded op.
    Op(Arc<Node>),
}

/// An n-dimensional array: cheap to clone (shares storage), immutable once built.
#[derive(Clone)]
pub struct Tensor(Arc<TensorImpl>);

struct TensorImpl {
    id: u64,
    storage: Arc<Storage>,
    layout: Layout,
    track: GradTrack,
}

fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Tensor {
    // ---------------------------------------------------------------- construction

    pub(crate) fn from_parts(storage: Arc<Storage>, layout: Layout, track: GradTrack) -> Tensor {
        debug_assert!(layout.storage_extent() <= storage.len());
        Tensor(Arc::new(TensorImpl {
            id: next_id(),
            storage,
            layout,
            track,
        }))
    }

    /// A tensor from a storage and a layout that must stay inside it.
    pub fn from_storage(storage: Arc<Storage>, layout: Layout) -> Result<Tensor> {
        if layout.storage_extent() > storage.len() {
            return Err(Error::invalid(
                "from_storage",
                format!(
                    "layout {:?} reaches element {} of a storage of {}",
                    layout,
                    layout.storage_extent(),
                    storage.len()
                ),
            ));
        }
        Ok(Tensor::from_parts(storage, layout, GradTrack::None))
    }

    /// A tensor owning `data` with `shape` (row-major); the element count must match.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: &[usize]) -> Result<Tensor> {
        if crate::layout::checked_numel(shape) != Some(data.len()) {
            return Err(Error::invalid(
                "from_vec",
                format!("{} elements cannot have shape {shape:?}", data.len()),
            ));
        }
        Ok(Tensor::from_parts(
            Arc::new(T::into_storage(data)),
            Layout::contiguous(shape),
            GradTrack::None,
        ))
    }

    /// A tensor copying `data` with `shape`.
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize]) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape)
    }

    /// A 0-dimensional f32 tensor.
    pub fn scalar(v: f32) -> Tensor {
        Tensor::f32_owned(vec![v], &[])
    }

    /// Internal constructor for kernels that produced exactly `shape.product()` f32 values.
    pub(crate) fn f32_owned(data: Vec<f32>, shape: &[usize]) -> Tensor {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        Tensor::from_parts(
            Arc::new(Storage::F32(data)),
            Layout::contiguous(shape),
            GradTrack::None,
        )
    }

    /// A tensor of `shape` filled with `value` (f32).
    pub fn full(shape: &[usize], value: f32) -> Tensor {
        Tensor::f32_owned(vec![value; shape.iter().product()], shape)
    }

    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor::full(shape, 0.0)
    }

    pub fn ones(shape: &[usize]) -> Tensor {
        Tensor::full(shape, 1.0)
    }

    /// f32 values `start, start+step, ...` below `end` (above it for a negative step).
    pub fn arange(start: f32, end: f32, step: f32) -> Result<Tensor> {
        if step == 0.0 || !step.is_finite() || !start.is_finite() || !end.is_finite() {
            return Err(Error::invalid(
                "arange",
                format!("bad range {start}..{end} step {step}"),
            ));
        }
        let n = ((end - start) / step).ceil().max(0.0) as usize;
        let v: Vec<f32> = (0..n).map(|i| start + i as f32 * step).collect();
        let len = v.len();
        Ok(Tensor::f32_owned(v, &[len]))
    }

    /// Standard-normal samples times `std` plus `mean`; the same seed gives the same numbers.
    pub fn randn(shape: &[usize], mean: f32, std: f32, seed: u64) -> Tensor {
        let mut rng = Rng::new(seed);
        Tensor::randn_with(shape, mean, std, &mut rng)
    }

    /// As [`Tensor::randn`], drawing from a caller's generator.
    pub fn randn_with(shape: &[usize], mean: f32, std: f32, rng: &mut Rng) -> Tensor {
        let n = shape.iter().product();
        let v = (0..n)
            .map(|_| mean + std * rng.normal() as f32)
            .collect::<Vec<_>>();
        Tensor::f32_owned(v, shape)
    }

    /// Uniform samples in [lo, hi); the same seed gives the same numbers.
    pub fn rand_uniform(shape: &[usize], lo: f32, hi: f32, seed: u64) -> Tensor {
        let mut rng = Rng::new(seed);
        let n = shape.iter().product();
        let v = (0..n)
            .map(|_| lo + (hi - lo) * rng.next_f32())
            .collect::<Vec<_>>();
        Tensor::f32_owned(v, shape)
    }

    // ---------------------------------------------------------------- accessors

    pub fn shape(&self) -> &[usize] {
        self.0.layout.shape()
    }

    pub fn rank(&self) -> usize {
        self.0.layout.rank()
    }

    pub fn numel(&self) -> usize {
        self.0.layout.numel()
    }

    pub fn dtype(&self) -> DType {
        self.0.storage.dtype()
    }

    pub fn device(&self) -> Device {
        self.0.storage.device()
    }

    /// The GPU storage of a CUDA tensor.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_storage(&self) -> Option<&crate::cuda::CudaStorage> {
        self.0.storage.as_cuda()
    }

    /// An error for host access to a tensor that lives on a GPU.
    fn require_cpu(&self, op: &'static str) -> Result<()> {
        match self.device() {
            Device::Cpu => Ok(()),
            d => Err(Error::cuda(
                op,
                format!(
                    "tensor of shape {:?} ({}) is on {d}: this op has no CUDA kernel yet, or                      needs host data; copy with to_device(Device::Cpu) explicitly",
                    self.shape(),
                    self.dtype()
                ),
            )),
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.0.layout
    }

    pub fn storage(&self) -> &Arc<Storage> {
        &self.0.storage
    }

    pub fn is_contiguous(&self) -> bool {
        self.0.layout.is_contiguous()
    }

    /// Size of dimension `dim` (negative counts from the end).
    pub fn dim(&self, dim: isize) -> Result<usize> {
        let d = crate::layout::resolve_dim("dim", dim, self.shape())?;
        Ok(self.shape()[d])
    }

    /// True when both tensors view the same storage.
    pub fn shares_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0.storage, &other.0.storage)
    }

    pub(crate) fn id(&self) -> u64 {
        self.0.id
    }

    pub(crate) fn track(&self) -> &GradTrack {
        &self.0.track
    }

    /// Whether gradients flow back through this tensor.
    pub fn tracks_grad(&self) -> bool {
        !matches!(self.0.track, GradTrack::None)
    }

    /// The same data, cut off from the graph.
    pub fn detach(&self) -> Tensor {
        self.with_track(GradTrack::None)
    }

    pub(crate) fn with_track(&self, track: GradTrack) -> Tensor {
        Tensor::from_parts(self.0.storage.clone(), self.0.layout.clone(), track)
    }

    /// The same storage under another layout, untracked.
    pub(crate) fn with_layout(&self, layout: Layout) -> Tensor {
        Tensor::from_parts(self.0.storage.clone(), layout, GradTrack::None)
    }

    // ---------------------------------------------------------------- autograd plumbing

    /// Attaches an op's backward rule to its freshly computed output when any input tracks
    /// gradients and no-grad mode is off; otherwise returns `out` untouched (and never builds
    /// the closure's node).
    pub(crate) fn record(
        out: Tensor,
        op: &'static str,
        inputs: &[&Tensor],
        backward: impl Fn(&Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
    ) -> Tensor {
        if autograd::is_no_grad() || !inputs.iter().any(|t| t.tracks_grad()) {
            return out;
        }
        let backward: BackwardFn = Box::new(backward);
        let node = Node {
            op,
            inputs: inputs.iter().map(|t| (*t).clone()).collect(),
            backward,
        };
        out.with_track(GradTrack::Op(Arc::new(node)))
    }

    /// Back-propagates from this scalar (one-element) tensor, accumulating into parameters.
    pub fn backward(&self) -> Result<()> {
        if self.numel() != 1 {
            return Err(Error::invalid(
                "backward",
                format!(
                    "called on shape {:?}; use backward_with for non-scalar outputs",
                    self.shape()
                ),
            ));
        }
        // The seed lives where the output does, in its dtype, so a CUDA graph's backward
        // runs on the GPU from its first step.
        let seed = Tensor::ones(self.shape())
            .to_dtype(self.dtype())?
            .to_device(self.device())?;
        self.backward_with(seed)
    }

    /// Back-propagates with an explicit output gradient of this tensor's shape.
    pub fn backward_with(&self, grad: Tensor) -> Result<()> {
        autograd::backward(self, grad)
    }

    // ---------------------------------------------------------------- element access

    fn require_dtype(&self, op: &'static str, expected: DType) -> Result<()> {
        if self.dtype() != expected {
            return Err(Error::DTypeMismatch {
                op,
                expected,
                got: self.dtype(),
            });
        }
        Ok(())
    }

    /// The f32 elements in row-major order: borrowed when contiguous, gathered otherwise.
    /// CPU compute is f32; other dtypes are an error here (convert with [`Tensor::to_dtype`]).
    pub fn f32_data(&self) -> Result<Cow<'_, [f32]>> {
        self.require_cpu("f32 compute")?;
        self.require_dtype("f32 compute", DType::F32)?;
        let s = self
            .0
            .storage
            .as_slice::<f32>()
            .ok_or_else(|| Error::invalid("f32 compute", "storage is not readable as f32"))?;
        let l = &self.0.layout;
        if l.is_contiguous() {
            Ok(Cow::Borrowed(&s[l.offset()..l.offset() + l.numel()]))
        } else {
            Ok(Cow::Owned(l.gather_f32(s)))
        }
    }

    /// A copy of the elements in row-major order as `T` (which must be the tensor's dtype).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if self.device() != Device::Cpu {
            return self.to_device(Device::Cpu)?.to_vec();
        }
        self.require_dtype("to_vec", T::DTYPE)?;
        let s = self
            .0
            .storage
            .as_slice::<T>()
            .ok_or_else(|| Error::invalid("to_vec", "storage is not readable as its dtype"))?;
        Ok(self.0.layout.gather(s))
    }

    /// The elements converted to f64, any dtype (for tests, printing and index tensors).
    /// A CUDA tensor is copied to the host first; should that copy fail (a broken device),
    /// every element reads NaN, which no comparison passes. [`Tensor::to_vec`] returns the
    /// error instead.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        if self.device() != Device::Cpu {
            return match self.to_device(Device::Cpu) {
                Ok(t) => t.to_f64_vec(),
                Err(_) => vec![f64::NAN; self.numel()],
            };
        }
        let mut v = Vec::with_capacity(self.numel());
        self.0
            .layout
            .for_each_index(|i| v.push(self.0.storage.get_f64(i)));
        v
    }

    /// Index elements (any integer dtype) as i64.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        match self.dtype() {
            DType::I64 => self.to_vec::<i64>(),
            DType::I32 => Ok(self.to_vec::<i32>()?.into_iter().map(i64::from).collect()),
            DType::U32 => Ok(self.to_vec::<u32>()?.into_iter().map(i64::from).collect()),
            DType::U8 => Ok(self.to_vec::<u8>()?.into_iter().map(i64::from).collect()),
            got => Err(Error::invalid(
                "indices",
                format!("expected an integer dtype, got {got}"),
            )),
        }
    }

    /// The single value of a one-element tensor, as f32.
    pub fn item(&self) -> Result<f32> {
        if self.device() != Device::Cpu {
            return self.to_device(Device::Cpu)?.item();
        }
        if self.numel() != 1 {
            return Err(Error::invalid(
                "item",
                format!(
                    "tensor of shape {:?} has {} elements",
                    self.shape(),
                    self.numel()
                ),
            ));
        }
        Ok(self.to_f64_vec()[0] as f32)
    }

    /// A copy with the elements converted to `dtype`. Float-to-float casts are differentiable
    /// (the gradient is cast back); casts to integers are not.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        #[cfg(feature = "cuda")]
        if let Some(cs) = self.cuda_storage() {
            let out = crate::ops::cuda_cast(self, cs, dtype)?;
            let from = self.dtype();
            if !(from.is_float() && dtype.is_float()) {
                return Ok(out);
            }
            return Ok(Tensor::record(out, "to_dtype", &[self], move |g| {
                Ok(vec![Some(g.to_dtype(from)?)])
            }));
        }
        let shape = self.shape().to_vec();
        let storage = match (self.dtype(), dtype) {
            (DType::F32, DType::BF16) => Storage::BF16(
                self.f32_data()?
                    .iter()
                    .map(|&x| bf16::from_f32(x))
                    .collect(),
            ),
            (DType::F32, DType::F16) => {
                Storage::F16(self.f32_data()?.iter().map(|&x| f16::from_f32(x)).collect())
            }
            (DType::BF16, DType::F32) => {
                Storage::F32(self.to_vec::<bf16>()?.iter().map(|x| x.to_f32()).collect())
            }
            (DType::F16, DType::F32) => {
                Storage::F32(self.to_vec::<f16>()?.iter().map(|x| x.to_f32()).collect())
            }
            (_, to) => {
                let v = self.to_f64_vec();
                macro_rules! conv {
                    ($t:ty) => {
                        <$t as Element>::into_storage(
                            v.iter().map(|&x| <$t>::from_f64(x)).collect(),
                        )
                    };
                }
                match to {
                    DType::F32 => conv!(f32),
                    DType::BF16 => conv!(bf16),
                    DType::F16 => conv!(f16),
                    DType::I64 => conv!(i64),
                    DType::I32 => conv!(i32),
                    DType::U32 => conv!(u32),
                    DType::U8 => conv!(u8),
                }
            }
        };
        let out = Tensor::from_parts(
            Arc::new(storage),
            Layout::contiguous(&shape),
            GradTrack::None,
        );
        if !(self.dtype().is_float() && dtype.is_float()) {
            return Ok(out);
        }
        let from = self.dtype();
        Ok(Tensor::record(out, "to_dtype", &[self], move |g| {
            Ok(vec![Some(g.to_dtype(from)?)])
        }))
    }

    /// The tensor on `device`: itself when it is already there, else a contiguous copy there
    /// (host ↔ GPU copies through the driver). Differentiable: the gradient is copied back.
    /// Asking for a CUDA device where there is none (no driver, no such ordinal, the crate
    /// built without the `cuda` feature) is an [`Error::Cuda`].
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        let from = self.device();
        if device == from {
            return Ok(self.clone());
        }
        let out = self.copy_to_device(device)?;
        Ok(Tensor::record(out, "to_device", &[self], move |g| {
            Ok(vec![Some(g.to_device(from)?)])
        }))
    }

    #[cfg(not(feature = "cuda"))]
    fn copy_to_device(&self, device: Device) -> Result<Tensor> {
        Err(Error::cuda(
            "to_device",
            format!("cannot move to {device}: rlhf-tensor was built without the `cuda` feature"),
        ))
    }

    #[cfg(feature = "cuda")]
    fn copy_to_device(&self, device: Device) -> Result<Tensor> {
        use crate::cuda::CudaStorage;
        let shape = self.shape().to_vec();
        // Off the GPU first (to the host, contiguous), then onto the target if it is a GPU.
        let host = match self.cuda_storage() {
            None => self.detach().contiguous()?,
            Some(cs) => {
                // A strided float view is made contiguous on the device (one copy kernel), so
                // only the tensor's own elements cross the bus; other dtypes have no copy
                // kernel and come back whole, to be gathered here.
                let t = if self.is_contiguous() || !matches!(self.dtype(), DType::F32 | DType::BF16)
                {
                    self.detach()
                } else {
                    crate::ops::cuda_unary(self, "copy", 0.0, 0.0)?
                };
                let cs = t.cuda_storage().unwrap_or(cs);
                let all = Tensor::from_parts(
                    Arc::new(cs.to_host()?),
                    t.layout().clone(),
                    GradTrack::None,
                );
                all.contiguous()?
            }
        };
        match device {
            Device::Cpu => Ok(host),
            Device::Cuda(n) => {
                let dev = crate::cuda::device(n)?;
                // `host` is contiguous but may view part of a larger storage (a narrowed
                // view): copy exactly its elements.
                let cs = if host.numel() == 0 {
                    // No zero-length allocation (the driver may refuse one): an empty tensor
                    // gets the one-element placeholder buffer of CudaStorage::zeros.
                    CudaStorage::zeros(&dev, host.dtype(), 0)?
                } else if host.layout().offset() == 0 && host.storage().len() == host.numel() {
                    CudaStorage::from_host(&dev, host.storage())?
                } else {
                    CudaStorage::from_host(&dev, &owned_storage(&host)?)?
                };
                Ok(Tensor::from_parts(
                    Arc::new(Storage::Cuda(cs)),
                    Layout::contiguous(&shape),
                    GradTrack::None,
                ))
            }
        }
    }

    /// A contiguous copy when the layout is strided; the tensor itself otherwise.
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        #[cfg(feature = "cuda")]
        if self.cuda_storage().is_some() {
            let out = crate::ops::cuda_unary(self, "copy", 0.0, 0.0)?;
            return Ok(Tensor::record(out, "contiguous", &[self], |g| {
                Ok(vec![Some(g.clone())])
            }));
        }
        let storage = match self.dtype() {
            // f32 copies come from the buffer pool (no fresh pages to fault in).
            DType::F32 => Storage::F32(self.f32_data()?.into_owned()),
            DType::BF16 => Storage::BF16(self.to_vec()?),
            DType::F16 => Storage::F16(self.to_vec()?),
            DType::I64 => Storage::I64(self.to_vec()?),
            DType::I32 => Storage::I32(self.to_vec()?),
            DType::U32 => Storage::U32(self.to_vec()?),
            DType::U8 => Storage::U8(self.to_vec()?),
        };
        let out = Tensor::from_parts(
            Arc::new(storage),
            Layout::contiguous(self.shape()),
            GradTrack::None,
        );
        Ok(Tensor::record(out, "contiguous", &[self], |g| {
            Ok(vec![Some(g.clone())])
        }))
    }

    /// Reshape with `-1` allowed once: a view when contiguous, a copy otherwise.
    pub fn reshape(&self, shape: &[isize]) -> Result<Tensor> {
        let shape = infer_shape("reshape", self.numel(), shape)?;
        self.reshape_to(&shape)
    }

    /// Reshape to an explicit shape with the same element count.
    pub fn reshape_to(&self, shape: &[usize]) -> Result<Tensor> {
        if crate::layout::checked_numel(shape) != Some(self.numel()) {
            return Err(Error::invalid(
                "reshape",
                format!("cannot view shape {:?} as {shape:?}", self.shape()),
            ));
        }
        let src = self.contiguous()?;
        let layout = src
            .layout()
            .reshape(shape)
            .expect("contiguous layouts always reshape");
        let out = src.with_layout(layout);
        let in_shape = self.shape().to_vec();
        Ok(Tensor::record(out, "reshape", &[&src], move |g| {
            Ok(vec![Some(g.reshape_to(&in_shape)?)])
        }))
    }

    /// A view with dims `d0` and `d1` swapped.
    pub fn transpose(&self, d0: isize, d1: isize) -> Result<Tensor> {
        let out = self.with_layout(self.layout().transpose(d0, d1)?);
        Ok(Tensor::record(out, "transpose", &[self], move |g| {
            Ok(vec![Some(g.transpose(d0, d1)?)])
        }))
    }

    /// Transpose of the last two dims (matrix transpose of every batch element), as a view.
    pub fn t(&self) -> Result<Tensor> {
        self.transpose(-2, -1)
    }

    /// A view with dims reordered: output dim i is input dim `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        let out = self.with_layout(self.layout().permute(perm)?);
        let mut inverse = vec![0; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i;
        }
        Ok(Tensor::record(out, "permute", &[self], move |g| {
            Ok(vec![Some(g.permute(&inverse)?)])
        }))
    }

    /// A view of elements `start..start+len` along `dim`.
    pub fn narrow(&self, dim: isize, start: usize, len: usize) -> Result<Tensor> {
        let out = self.with_layout(self.layout().narrow(dim, start, len)?);
        let d = crate::layout::resolve_dim("narrow", dim, self.shape())?;
        let in_shape = self.shape().to_vec();
        Ok(Tensor::record(out, "narrow", &[self], move |g| {
            Ok(vec![Some(g.pad_into(&in_shape, d, start)?)])
        }))
    }

    /// The inverse of `narrow` for gradients: zeros of `shape` with `self` written at
    /// `start..` along `dim`. On a GPU: zeros on the device and one 2-D device copy
    /// (ops/concat.rs); the result keeps the gradient's dtype.
    fn pad_into(&self, shape: &[usize], dim: usize, start: usize) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(dev) = crate::ops::cuda_inputs("narrow backward", &[self])? {
            return crate::ops::concat::pad_cuda(&dev, self, shape, dim, start);
        }
        let mut buf = crate::cpu::pool::zeroed(shape.iter().product());
        let src = self.f32_data()?;
        let region = Layout::contiguous(shape).narrow(dim as isize, start, self.shape()[dim])?;
        region.scatter(&src, &mut buf);
        Ok(Tensor::f32_owned(buf, shape))
    }

    /// A view expanded to `shape` (size-1 or missing leading dims repeat, stride 0).
    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Tensor> {
        if shape == self.shape() {
            return Ok(self.clone());
        }
        let out = self.with_layout(self.layout().broadcast_to(shape)?);
        let in_shape = self.shape().to_vec();
        Ok(Tensor::record(out, "broadcast_to", &[self], move |g| {
            Ok(vec![Some(g.sum_to_shape(&in_shape)?)])
        }))
    }

    /// A view with a size-1 dim inserted at `dim`.
    pub fn unsqueeze(&self, dim: isize) -> Result<Tensor> {
        let out = self.with_layout(self.layout().unsqueeze(dim)?);
        let in_shape = self.shape().to_vec();
        Ok(Tensor::record(out, "unsqueeze", &[self], move |g| {
            Ok(vec![Some(g.reshape_to(&in_shape)?)])
        }))
    }

    /// A view with size-1 dim `dim` removed.
    pub fn squeeze(&self, dim: isize) -> Result<Tensor> {
        let out = self.with_layout(self.layout().squeeze(dim)?);
        let in_shape = self.shape().to_vec();
        Ok(Tensor::record(out, "squeeze", &[self], move |g| {
            Ok(vec![Some(g.reshape_to(&in_shape)?)])
        }))
    }
}

/// The elements of a host tensor in row-major order, in a storage of their own.
#[cfg(feature = "cuda")]
fn owned_storage(t: &Tensor) -> Result<Storage> {
    Ok(match t.dtype() {
        DType::F32 => Storage::F32(t.to_vec()?),
        DType::BF16 => Storage::BF16(t.to_vec()?),
        DType::F16 => Storage::F16(t.to_vec()?),
        DType::I64 => Storage::I64(t.to_vec()?),
        DType::I32 => Storage::I32(t.to_vec()?),
        DType::U32 => Storage::U32(t.to_vec()?),
        DType::U8 => Storage::U8(t.to_vec()?),
    })
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = self.to_f64_vec();
        let shown: Vec<f64> = v.iter().take(8).copied().collect();
        write!(
            f,
            "Tensor(shape={:?}, dtype={}, data={:?}{})",
            self.shape(),
            self.dtype(),
            shown,
            if v.len() > 8 { " ..." } else { "" }
        )
    }
}

#[cfg(test)]
mod device_tests {
    use crate::{DType, Device, Tensor};

    #[test]
    fn cpu_tensors_report_the_cpu_and_to_device_cpu_is_identity() {
        let x = Tensor::randn(&[2, 3], 0.0, 1.0, 1);
        assert_eq!(x.device(), Device::Cpu);
        let y = x.to_device(Device::Cpu).unwrap();
        assert!(y.shares_storage(&x));
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
    }

    #[test]
    fn synchronize_is_a_no_op_on_the_cpu_and_an_error_without_a_gpu() {
        Device::Cpu.synchronize().unwrap();
        #[cfg(feature = "cuda")]
        if crate::cuda::device(0).is_ok() {
            Device::Cuda(0).synchronize().unwrap();
            return;
        }
        let e = Device::Cuda(0).synchronize().unwrap_err();
        assert!(matches!(e, crate::Error::Cuda { .. }), "{e}");
    }

    #[test]
    fn to_cuda_without_a_gpu_is_a_clear_error() {
        #[cfg(feature = "cuda")]
        if crate::cuda::device(0).is_ok() {
            // A machine with a GPU: the round trip is exact (the GPU tests cover the rest).
            let x = Tensor::randn(&[3, 5], 0.0, 1.0, 2).t().unwrap();
            let back = x
                .to_device(Device::Cuda(0))
                .unwrap()
                .to_device(Device::Cpu)
                .unwrap();
            assert_eq!(back.to_f64_vec(), x.to_f64_vec());
            return;
        }
        for dtype in [DType::F32, DType::BF16, DType::I64] {
            let x = Tensor::randn(&[2, 2], 0.0, 1.0, 3).to_dtype(dtype).unwrap();
            let e = x.to_device(Device::Cuda(0)).unwrap_err();
            assert!(matches!(e, crate::Error::Cuda { .. }), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains("no CUDA driver library found")
                    || msg.contains("no CUDA device 0")
                    || msg.contains("without the `cuda` feature"),
                "{msg}"
            );
        }
    }
}
