//! Elementwise binary ops with NumPy broadcasting (add, sub, mul, div), scalar ops, the `gt`
//! comparison, and `where_`/`masked_fill`. Backward rules reduce gradients back over broadcast
//! dims.
//!
//! On CUDA (kernels/elementwise.cu) every operand is read through its broadcast view (stride 0
//! on expanded dims), so nothing is expanded in memory. Masks (the condition of `where_` and
//! `masked_fill`) follow the rule ops/embedding.rs gives for indices:
//! - a mask on the host (any dtype and layout; nonzero is true) is converted to u8 there and
//!   copied up at its own shape (a [T, T] causal mask broadcast over [B, H, T, T] crosses the
//!   bus once, T² bytes);
//! - a mask on the values' GPU is used in place when it is u8 (any layout; `gt` makes such
//!   masks), turned into u8 on the device when it is f32 or bf16 (`compare_ne_T` against zero),
//!   and brought through the host once when it has another integer dtype (no integer kernels);
//! - a mask on another device, or on a GPU while the values are on the CPU, is an
//!   `Error::Cuda`: data never moves between devices on its own.

use super::{map_f32, zip_f32};
use crate::cpu::vec;
use crate::layout::broadcast_shapes;
use crate::{DType, Error, Result, Tensor};

#[derive(Clone, Copy)]
enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryOp {
    fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
        }
    }

    /// The op's name in kernels/elementwise.cu (`binary_<name>_T`).
    #[cfg(feature = "cuda")]
    fn cuda_name(self) -> &'static str {
        self.name()
    }

    fn kernel(self) -> fn(&[f32], &[f32], &mut [f32]) {
        match self {
            BinaryOp::Add => vec::add,
            BinaryOp::Sub => vec::sub,
            BinaryOp::Mul => vec::mul,
            BinaryOp::Div => vec::div,
        }
    }
}

/// The forward of a broadcasting binary op, untracked.
fn binary_forward(op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let shape = broadcast_shapes(op.name(), a.shape(), b.shape())?;
    #[cfg(feature = "cuda")]
    if let Some(dev) = super::cuda_inputs(op.name(), &[a, b])? {
        return binary_cuda(&dev, op, a, b, &shape);
    }
    let kernel = op.kernel();
    if a.shape() == b.shape() {
        return zip_f32(a, b, kernel);
    }
    // Common case in models: [.., D] with [D] (a bias, a scale): one kernel call per row over
    // contiguous rows, no expanded copy of the small operand.
    let last = *shape.last().unwrap_or(&1);
    if a.shape() == shape.as_slice() && b.shape().len() <= 1 && b.numel() == last && last > 0 {
        let (sa, sb) = (a.f32_data()?, b.f32_data()?);
        // Every row is written by the kernel: a pooled buffer needs no clearing.
        let mut out = crate::cpu::pool::for_overwrite(sa.len());
        for (ra, ro) in sa.chunks(last).zip(out.chunks_mut(last)) {
            kernel(ra, &sb, ro);
        }
        return Ok(Tensor::f32_owned(out, &shape));
    }
    // General case: expand both operands (stride-0 views gathered into row-major order).
    let ea = a.detach().broadcast_to(&shape)?;
    let eb = b.detach().broadcast_to(&shape)?;
    zip_f32(&ea, &eb, kernel)
}

/// `binary_<op>_T` of kernels/elementwise.cu: both operands read through their broadcast
/// views (stride 0 on expanded dims), so no expanded copy is made; contiguous output.
#[cfg(feature = "cuda")]
fn binary_cuda(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    op: BinaryOp,
    a: &Tensor,
    b: &Tensor,
    shape: &[usize],
) -> Result<Tensor> {
    super::same_dtype(op.name(), a, b)?;
    let entry = format!(
        "binary_{}_{}",
        op.cuda_name(),
        super::tname(op.name(), a.dtype())?
    );
    strided_pair_cuda(dev, op.name(), &entry, a, b, shape, a.dtype())
}

/// One launch of an elementwise.cu kernel shaped `entry(i64 n, Strided la, Strided lb,
/// const T* a, const T* b, U* out)` (`binary_*_T`, `compare_*_T`): both operands read through
/// their broadcast views of `shape` (stride 0 on expanded dims, no expanded copy), the output a
/// fresh contiguous tensor of `out_dtype`.
#[cfg(feature = "cuda")]
fn strided_pair_cuda(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    op: &'static str,
    entry: &str,
    a: &Tensor,
    b: &Tensor,
    shape: &[usize],
    out_dtype: DType,
) -> Result<Tensor> {
    use crate::cuda::storage::{binary_vector_path, coalesced, map_config};
    use cudarc::driver::PushKernelArg;
    let out = super::cuda_uninit(dev, out_dtype, shape)?;
    let n = out.numel();
    if n == 0 {
        return Ok(out);
    }
    let (ea, eb) = (
        a.detach().broadcast_to(shape)?,
        b.detach().broadcast_to(shape)?,
    );
    let [la, lb] = coalesced(shape, [ea.layout().strides(), eb.layout().strides()])?;
    let (pa, pb, po, n64) = (
        super::ptr(&ea)?,
        super::ptr(&eb)?,
        super::ptr(&out)?,
        n as i64,
    );
    let f = dev.function("elementwise", entry)?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&n64).arg(&la).arg(&lb).arg(&pa).arg(&pb).arg(&po);
    // binary_* (outputs in the operands' dtype) have elementwise.cu's vector path (flat
    // operands or repeated rows), which sizes the launch; compare_* (u8 masks) do not.
    let vector = out_dtype != DType::U8 && binary_vector_path(&[la, lb], &[pa, pb, po]);
    // SAFETY: the kernel takes (i64 n, Strided la, Strided lb, const T* a, const T* b, U* out)
    // (the callers pick such entries, with T the operands' dtype); both operands are read
    // through layouts of the output's shape inside their storages; out is a fresh buffer of n
    // elements of U = out_dtype.
    unsafe { super::launch(op, entry, l, map_config(n, vector))? };
    Ok(out)
}

fn binary(op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let out = binary_forward(op, a, b)?;
    let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
    let (ac, bc) = (a.detach(), b.detach());
    let needs = (a.tracks_grad(), b.tracks_grad());
    Ok(Tensor::record(out, op.name(), &[a, b], move |g| {
        let (ga, gb) = match op {
            BinaryOp::Add => (g.clone(), g.clone()),
            BinaryOp::Sub => (g.clone(), g.neg()?),
            BinaryOp::Mul => (
                if needs.0 { g.mul(&bc)? } else { g.clone() },
                if needs.1 { g.mul(&ac)? } else { g.clone() },
            ),
            BinaryOp::Div => {
                let ga = if needs.0 { g.div(&bc)? } else { g.clone() };
                // d(a/b)/db = -a / b^2
                let gb = if needs.1 {
                    g.mul(&ac)?.div(&bc.mul(&bc)?)?.neg()?
                } else {
                    g.clone()
                };
                (ga, gb)
            }
        };
        Ok(vec![
            needs.0.then(|| ga.sum_to_shape(&sa)).transpose()?,
            needs.1.then(|| gb.sum_to_shape(&sb)).transpose()?,
        ])
    }))
}

impl Tensor {
    /// Elementwise `self + other` with broadcasting.
    pub fn add(&self, other: &Tensor) -> Result<Tensor> {
        binary(BinaryOp::Add, self, other)
    }

    /// Elementwise `self - other` with broadcasting.
    pub fn sub(&self, other: &Tensor) -> Result<Tensor> {
        binary(BinaryOp::Sub, self, other)
    }

    /// Elementwise `self * other` with broadcasting.
    pub fn mul(&self, other: &Tensor) -> Result<Tensor> {
        binary(BinaryOp::Mul, self, other)
    }

    /// Elementwise `self / other` with broadcasting.
    pub fn div(&self, other: &Tensor) -> Result<Tensor> {
        binary(BinaryOp::Div, self, other)
    }

    /// `self + s`.
    pub fn add_scalar(&self, s: f32) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.cuda_storage().is_some() {
            let out = super::cuda_unary(self, "add_scalar", s, 0.0)?;
            return Ok(Tensor::record(out, "add_scalar", &[self], |g| {
                Ok(vec![Some(g.clone())])
            }));
        }
        let out = map_f32(self, |x, o| vec::add_scalar(x, s, o))?;
        Ok(Tensor::record(out, "add_scalar", &[self], |g| {
            Ok(vec![Some(g.clone())])
        }))
    }

    /// `self * s`.
    pub fn mul_scalar(&self, s: f32) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        let out = if self.cuda_storage().is_some() {
            super::cuda_unary(self, "mul_scalar", s, 0.0)?
        } else {
            map_f32(self, |x, o| vec::mul_scalar(x, s, o))?
        };
        #[cfg(not(feature = "cuda"))]
        let out = map_f32(self, |x, o| vec::mul_scalar(x, s, o))?;
        Ok(Tensor::record(out, "mul_scalar", &[self], move |g| {
            Ok(vec![Some(g.mul_scalar(s)?)])
        }))
    }

    /// `self - s`.
    pub fn sub_scalar(&self, s: f32) -> Result<Tensor> {
        self.add_scalar(-s)
    }

    /// `self / s`.
    pub fn div_scalar(&self, s: f32) -> Result<Tensor> {
        self.mul_scalar(1.0 / s)
    }

    /// `-self`.
    pub fn neg(&self) -> Result<Tensor> {
        self.mul_scalar(-1.0)
    }

    /// Elementwise `cond ? a : b` with broadcasting of all three. `cond` is any dtype; nonzero
    /// is true. Gradients flow to `a` where the condition holds and to `b` elsewhere.
    ///
    /// On a GPU, `a` and `b` share a dtype (f32 or bf16) and the mask may be on the host or on
    /// their GPU (module docs).
    pub fn where_(cond: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(dev) = super::cuda_inputs("where", &[a, b])? {
            return where_cuda(&dev, cond, a, b);
        }
        mask_on_host("where", cond)?;
        let ab = broadcast_shapes("where", a.shape(), b.shape())?;
        let shape = broadcast_shapes("where", cond.shape(), &ab)?;
        let mask: Vec<bool> = cond
            .detach()
            .broadcast_to(&shape)?
            .to_f64_vec()
            .into_iter()
            .map(|c| c != 0.0)
            .collect();
        let ea = a.detach().broadcast_to(&shape)?.f32_data()?.into_owned();
        let eb = b.detach().broadcast_to(&shape)?.f32_data()?.into_owned();
        let out: Vec<f32> = mask
            .iter()
            .zip(ea.iter().zip(&eb))
            .map(|(&m, (&x, &y))| if m { x } else { y })
            .collect();
        let out = Tensor::f32_owned(out, &shape);
        let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
        Ok(Tensor::record(out, "where", &[a, b], move |g| {
            let gv = g.f32_data()?;
            let (mut ga, mut gb) = (
                crate::cpu::pool::zeroed(gv.len()),
                crate::cpu::pool::zeroed(gv.len()),
            );
            for (i, &m) in mask.iter().enumerate() {
                if m {
                    ga[i] = gv[i];
                } else {
                    gb[i] = gv[i];
                }
            }
            let shape = g.shape();
            Ok(vec![
                Some(Tensor::f32_owned(ga, shape).sum_to_shape(&sa)?),
                Some(Tensor::f32_owned(gb, shape).sum_to_shape(&sb)?),
            ])
        }))
    }

    /// `value` where `mask` is nonzero, `self` elsewhere (mask broadcasts to self's shape).
    pub fn masked_fill(&self, mask: &Tensor, value: f32) -> Result<Tensor> {
        let shape = broadcast_shapes("masked_fill", mask.shape(), self.shape())?;
        if shape != self.shape() {
            return Err(Error::ShapeMismatch {
                op: "masked_fill",
                lhs: self.shape().to_vec(),
                rhs: mask.shape().to_vec(),
            });
        }
        let fill = Tensor::scalar(value);
        // On a GPU the fill value is a one-element tensor there, in self's dtype (rounded once
        // for bf16), read through a broadcast view.
        #[cfg(feature = "cuda")]
        let fill = if self.device() == crate::Device::Cpu {
            fill
        } else {
            fill.to_dtype(self.dtype())?.to_device(self.device())?
        };
        Tensor::where_(mask, &fill, self)
    }

    /// Elementwise comparison `self > other` (broadcasting) as a u8 mask; not differentiable.
    /// On a GPU both operands share a dtype (f32 or bf16) and the mask stays on the GPU.
    pub fn gt(&self, other: &Tensor) -> Result<Tensor> {
        let shape = broadcast_shapes("gt", self.shape(), other.shape())?;
        #[cfg(feature = "cuda")]
        if let Some(dev) = super::cuda_inputs("gt", &[self, other])? {
            return compare_cuda(&dev, "gt", self, other, &shape);
        }
        let a = self.detach().broadcast_to(&shape)?.f32_data()?.into_owned();
        let b = other
            .detach()
            .broadcast_to(&shape)?
            .f32_data()?
            .into_owned();
        let m: Vec<u8> = a.iter().zip(&b).map(|(x, y)| u8::from(x > y)).collect();
        Tensor::from_vec(m, &shape)
    }

    /// Sums a gradient over the dims that broadcasting expanded, giving `shape` back.
    pub fn sum_to_shape(&self, shape: &[usize]) -> Result<Tensor> {
        if self.shape() == shape {
            return Ok(self.clone());
        }
        let lead = self
            .rank()
            .checked_sub(shape.len())
            .ok_or_else(|| Error::ShapeMismatch {
                op: "sum_to_shape",
                lhs: self.shape().to_vec(),
                rhs: shape.to_vec(),
            })?;
        // Each sum accumulates in f32 but stores its result in the tensor's dtype. Chained over
        // several dims, a bf16 gradient would be rounded once per dim, and where the sum
        // cancels that compounds to percents (5% in the CUDA `where` test, seen under the CPU
        // emulator): narrow dtypes are summed in f32 and rounded once at the end.
        let reductions = lead
            + shape
                .iter()
                .zip(&self.shape()[lead..])
                .filter(|(&want, &have)| want == 1 && have != 1)
                .count();
        // Only leading dims go (a bias's gradient from [B, T, C] activations): one sum over
        // them merged, a single pass that rounds once, in place of a sum per dim (and, for
        // narrow dtypes on a GPU, the f32 copy of the whole gradient that those would need;
        // the CPU sums f32 only).
        let sums_natively = self.dtype() == DType::F32 || self.device() != crate::Device::Cpu;
        if lead > 1 && self.shape()[lead..] == *shape && sums_natively && self.is_contiguous() {
            let rows: usize = self.shape()[..lead].iter().product();
            let merged: Vec<usize> = std::iter::once(rows)
                .chain(self.shape()[lead..].iter().copied())
                .collect();
            return self.reshape_to(&merged)?.sum(0, false);
        }
        let narrow = matches!(self.dtype(), DType::BF16 | DType::F16) && reductions > 1;
        let mut t = if narrow {
            self.to_dtype(DType::F32)?
        } else {
            self.clone()
        };
        for _ in 0..lead {
            t = t.sum(0, false)?;
        }
        for (d, &want) in shape.iter().enumerate() {
            if want == 1 && t.shape()[d] != 1 {
                t = t.sum(d as isize, true)?;
            }
        }
        if narrow {
            t = t.to_dtype(self.dtype())?;
        }
        if t.shape() != shape {
            return Err(Error::ShapeMismatch {
                op: "sum_to_shape",
                lhs: self.shape().to_vec(),
                rhs: shape.to_vec(),
            });
        }
        Ok(t)
    }
}

/// An `Error::Cuda` when a mask is on a GPU while the values it selects are on the CPU: a mask
/// may follow its data up to a GPU, but data never silently comes down to the host.
fn mask_on_host(op: &'static str, mask: &Tensor) -> Result<()> {
    if mask.device() == crate::Device::Cpu {
        return Ok(());
    }
    Err(Error::cuda(
        op,
        format!(
            "mask of shape {:?} is on {} but the values are on the CPU: move the mask with \
             to_device(Device::Cpu), or the values to its GPU",
            mask.shape(),
            mask.device()
        ),
    ))
}

/// `compare_<name>_T` of kernels/elementwise.cu: `a <name> b` over broadcast views of both
/// (same dtype, f32 or bf16) into a fresh contiguous u8 mask of `shape` on `dev`.
#[cfg(feature = "cuda")]
pub(crate) fn compare_cuda(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    name: &'static str,
    a: &Tensor,
    b: &Tensor,
    shape: &[usize],
) -> Result<Tensor> {
    super::same_dtype(name, a, b)?;
    let entry = format!("compare_{name}_{}", super::tname(name, a.dtype())?);
    strided_pair_cuda(dev, name, &entry, a, b, shape, DType::U8)
}

/// A `where_` condition as `where_T` reads it: a u8 tensor on `dev`, any layout, at the
/// condition's own shape (broadcast later through a view). The rule is in the module docs.
#[cfg(feature = "cuda")]
fn cuda_mask(
    op: &'static str,
    cond: &Tensor,
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
) -> Result<Tensor> {
    use crate::storage::Storage;
    use crate::Device;
    let here = Device::Cuda(dev.ordinal());
    let host_nonzero = |cond: &Tensor| -> Result<Tensor> {
        let m: Vec<u8> = if cond.dtype() == DType::U8 {
            cond.to_vec::<u8>()?
        } else {
            cond.to_f64_vec()
                .into_iter()
                .map(|c| u8::from(c != 0.0))
                .collect()
        };
        super::cuda_from_host(dev, &Storage::U8(m), cond.shape())
    };
    match cond.device() {
        Device::Cpu => host_nonzero(cond),
        d if d == here => match cond.dtype() {
            DType::U8 => Ok(cond.detach()),
            DType::F32 | DType::BF16 => {
                // A zero-filled one-element tensor: the zero to compare against.
                let zero = super::cuda_zeros(dev, cond.dtype(), &[])?;
                compare_cuda(dev, "ne", cond, &zero, cond.shape())
            }
            // Other integer masks have no kernel: one round trip through the host.
            _ => host_nonzero(&cond.to_device(Device::Cpu)?),
        },
        d => Err(Error::cuda(
            op,
            format!(
                "mask of shape {:?} is on {d} but the values are on {here}: move them to one \
                 device with to_device first",
                cond.shape()
            ),
        )),
    }
}

/// `where_T` of kernels/elementwise.cu: `mask ? a : b` over broadcast views of all three into a
/// fresh contiguous tensor of `shape` (a's dtype; a and b share it).
#[cfg(feature = "cuda")]
fn where_launch(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    mask: &Tensor,
    a: &Tensor,
    b: &Tensor,
    shape: &[usize],
) -> Result<Tensor> {
    use crate::cuda::storage::{coalesced, map_config};
    use cudarc::driver::PushKernelArg;
    const OP: &str = "where";
    super::same_dtype(OP, a, b)?;
    debug_assert_eq!(mask.dtype(), DType::U8, "where_T reads a u8 condition");
    let entry = format!("where_{}", super::tname(OP, a.dtype())?);
    let out = super::cuda_uninit(dev, a.dtype(), shape)?;
    let n = out.numel();
    if n == 0 {
        return Ok(out);
    }
    let (em, ea, eb) = (
        mask.detach().broadcast_to(shape)?,
        a.detach().broadcast_to(shape)?,
        b.detach().broadcast_to(shape)?,
    );
    let [lc, la, lb] = coalesced(
        shape,
        [
            em.layout().strides(),
            ea.layout().strides(),
            eb.layout().strides(),
        ],
    )?;
    let (pc, pa, pb, po, n64) = (
        super::ptr(&em)?,
        super::ptr(&ea)?,
        super::ptr(&eb)?,
        super::ptr(&out)?,
        n as i64,
    );
    let f = dev.function("elementwise", &entry)?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&n64)
        .arg(&lc)
        .arg(&la)
        .arg(&lb)
        .arg(&pc)
        .arg(&pa)
        .arg(&pb)
        .arg(&po);
    // SAFETY: where_T(i64 n, Strided lc, Strided la, Strided lb, const u8* c, const T* a,
    // const T* b, T* out): the u8 mask and both operands are read through layouts of the
    // output's shape inside their storages (the mask is a u8 tensor, checked above and by
    // cuda_mask); out is a fresh buffer of n elements of T.
    unsafe { super::launch(OP, &entry, l, map_config(n, false))? };
    Ok(out)
}

/// The CUDA `where_`: the condition as a u8 mask on the values' GPU ([`cuda_mask`]), then
/// `where_T`. The backward routes the gradient with the same mask: `where_T(mask, g, 0)` to `a`
/// and `where_T(mask, 0, g)` to `b` (0 a zero-filled one-element tensor in g's dtype, read
/// through a broadcast view), each summed back over broadcast dims on the device, and only for
/// the operands that track gradients (masked_fill's fill value never does).
#[cfg(feature = "cuda")]
fn where_cuda(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    cond: &Tensor,
    a: &Tensor,
    b: &Tensor,
) -> Result<Tensor> {
    const OP: &str = "where";
    super::same_dtype(OP, a, b)?;
    super::tname(OP, a.dtype())?;
    let ab = broadcast_shapes(OP, a.shape(), b.shape())?;
    let shape = broadcast_shapes(OP, cond.shape(), &ab)?;
    let mask = cuda_mask(OP, cond, dev)?;
    let out = where_launch(dev, &mask, a, b, &shape)?;
    let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
    let needs = (a.tracks_grad(), b.tracks_grad());
    Ok(Tensor::record(out, OP, &[a, b], move |g| {
        let dev = super::cuda_inputs(OP, &[g, &mask])?
            .ok_or_else(|| Error::cuda(OP, "backward: the gradient is not on a GPU"))?;
        let zero = super::cuda_zeros(&dev, g.dtype(), &[])?;
        let ga = needs
            .0
            .then(|| where_launch(&dev, &mask, g, &zero, g.shape())?.sum_to_shape(&sa))
            .transpose()?;
        let gb = needs
            .1
            .then(|| where_launch(&dev, &mask, &zero, g, g.shape())?.sum_to_shape(&sb))
            .transpose()?;
        Ok(vec![ga, gb])
    }))
}

/// Ensures a tensor holds f32 elements (CPU compute dtype).
pub(crate) fn require_f32(op: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype() != DType::F32 {
        return Err(Error::DTypeMismatch {
            op,
            expected: DType::F32,
            got: t.dtype(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::check_gradients;
    use crate::{DType, Tensor};

    /// A bias gradient: [B, T, C] summed to [C] in one pass over the merged leading dims (the
    /// contiguous case) and dim by dim (a transposed view): both the f64 column sums, and in
    /// bf16 within one rounding of them.
    #[test]
    fn sum_to_shape_over_leading_dims() {
        let x = Tensor::randn(&[4, 6, 5], 0.0, 1.0, 3);
        let cols = |t: &Tensor| -> Vec<f64> {
            let v = t.to_f64_vec();
            (0..5).map(|c| v.iter().skip(c).step_by(5).sum()).collect()
        };
        for dtype in [DType::F32, DType::BF16] {
            let xd = x.to_dtype(dtype).unwrap();
            let want = cols(&xd);
            let fast = xd.sum_to_shape(&[5]).unwrap();
            let strided = xd.transpose(0, 1).unwrap().sum_to_shape(&[5]).unwrap();
            assert_eq!(fast.shape(), &[5]);
            // A shape that does not match the trailing dims is an error on either path.
            assert!(xd.sum_to_shape(&[4]).is_err());
            assert!(xd.transpose(0, 1).unwrap().sum_to_shape(&[4]).is_err());
            for got in [&fast, &strided] {
                assert_eq!(got.dtype(), dtype);
                for (g, w) in got.to_f64_vec().iter().zip(&want) {
                    let tol = if dtype == DType::BF16 { 1e-2 } else { 1e-5 };
                    assert!(
                        (g - w).abs() <= tol * w.abs().max(1.0),
                        "{dtype}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn broadcast_add_matches_explicit_expansion() {
        let a = Tensor::randn(&[3, 1, 4], 0.0, 1.0, 1);
        let b = Tensor::randn(&[5, 4], 0.0, 1.0, 2);
        let c = a.add(&b).unwrap();
        let e = a
            .broadcast_to(&[3, 5, 4])
            .unwrap()
            .contiguous()
            .unwrap()
            .add(&b.broadcast_to(&[3, 5, 4]).unwrap().contiguous().unwrap())
            .unwrap();
        assert_eq!(c.to_f64_vec(), e.to_f64_vec());
    }

    #[test]
    fn binary_gradients_with_broadcast() {
        let a = Tensor::randn(&[2, 3], 0.0, 1.0, 3);
        let b = Tensor::rand_uniform(&[3], 0.5, 2.0, 4);
        for f in [
            |x: &[Tensor]| x[0].add(&x[1]),
            |x: &[Tensor]| x[0].sub(&x[1]),
            |x: &[Tensor]| x[0].mul(&x[1]),
            |x: &[Tensor]| x[0].div(&x[1]),
        ] {
            let err = check_gradients(&[a.clone(), b.clone()], f, 1e-3).unwrap();
            assert!(err < 1e-3, "err {err}");
        }
    }

    #[test]
    fn where_routes_values_and_gradients() {
        let c = Tensor::from_vec(vec![1u8, 0, 1], &[3]).unwrap();
        let a = Tensor::from_vec(vec![1.0f32, 2.0, 3.0], &[3]).unwrap();
        let b = Tensor::from_vec(vec![10.0f32], &[1]).unwrap();
        let w = Tensor::where_(&c, &a, &b).unwrap();
        assert_eq!(w.to_f64_vec(), vec![1.0, 10.0, 3.0]);
        let err = check_gradients(&[a, b], |x| Tensor::where_(&c, &x[0], &x[1]), 1e-3).unwrap();
        assert!(err < 1e-3);
    }
}
