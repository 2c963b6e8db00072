//! Elementwise unary ops and their derivatives: exp, log, sqrt, tanh, relu, gelu (tanh
//! approximation, as GPT-2), sigmoid, log_sigmoid (stable), powf, clamp, abs.

use super::{map_f32, zip_f32};
use crate::cpu::vec;
use crate::{Result, Tensor};

/// Maps each element with a scalar closure (for the ops that are not hot enough for SIMD).
fn map_scalar(x: &Tensor, f: impl Fn(f32) -> f32) -> Result<Tensor> {
    map_f32(x, |a, o| {
        for (o, &a) in o.iter_mut().zip(a) {
            *o = f(a);
        }
    })
}

/// A unary op's forward: the CUDA kernel `unary_<name>_T` (kernels/elementwise.cu) for a GPU
/// tensor, the CPU kernel otherwise.
fn unary_fwd(
    x: &Tensor,
    name: &str,
    params: (f32, f32),
    cpu: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.cuda_storage().is_some() {
        return super::cuda_unary(x, name, params.0, params.1);
    }
    let _ = (name, params);
    cpu(x)
}

/// A derivative factor for a backward rule: the scalar map on the CPU, or the same function
/// composed from ops with CUDA kernels for a GPU tensor (`gpu: None` when there is no such
/// composition yet, which is then an `Error::Cuda` naming the op).
fn deriv(
    x: &Tensor,
    op: &'static str,
    cpu: impl Fn(f32) -> f32,
    gpu: Option<fn(&Tensor) -> Result<Tensor>>,
) -> Result<Tensor> {
    if x.device() != crate::Device::Cpu {
        return match gpu {
            Some(f) => f(x),
            None => Err(crate::Error::cuda(
                op,
                format!(
                    "the backward of {op} has no CUDA path yet (tensor on {})",
                    x.device()
                ),
            )),
        };
    }
    map_scalar(x, cpu)
}

/// A scalar `v` as a rank-0 tensor in `like`'s dtype on `like`'s device (broadcast by the
/// ops below).
#[cfg(feature = "cuda")]
fn scalar_like(v: f32, like: &Tensor) -> Result<Tensor> {
    Tensor::scalar(v)
        .to_dtype(like.dtype())?
        .to_device(like.device())
}

/// The derivative masks of relu, abs and clamp on a GPU, built from `compare_*_T` masks and
/// `where_`, with the CPU's values at every input (NaN included: every comparison with NaN
/// is false, so NaN gets 0 as on the CPU). The masks have x's shape (the scalars broadcast).
/// For bf16 inputs clamp's bounds are compared in bf16.
#[cfg(feature = "cuda")]
mod gpu_deriv {
    use super::scalar_like;
    use crate::{Result, Tensor};

    /// 1 where x > 0, else 0.
    pub(super) fn relu(x: &Tensor) -> Result<Tensor> {
        let (zero, one) = (scalar_like(0.0, x)?, scalar_like(1.0, x)?);
        Tensor::where_(&x.gt(&zero)?, &one, &zero)
    }

    /// 1 where x > 0, -1 where x < 0, else 0 (zero and NaN).
    pub(super) fn abs(x: &Tensor) -> Result<Tensor> {
        let (zero, one, minus) = (
            scalar_like(0.0, x)?,
            scalar_like(1.0, x)?,
            scalar_like(-1.0, x)?,
        );
        let neg = Tensor::where_(&zero.gt(x)?, &minus, &zero)?;
        Tensor::where_(&x.gt(&zero)?, &one, &neg)
    }

    /// 1 where lo ≤ x ≤ hi, else 0 (NaN: 0).
    pub(super) fn clamp(x: &Tensor, lo: f32, hi: f32) -> Result<Tensor> {
        let dev = crate::ops::cuda_inputs("clamp backward", &[x])?
            .ok_or_else(|| crate::Error::cuda("clamp backward", "the input is not on a GPU"))?;
        let (zero, one) = (scalar_like(0.0, x)?, scalar_like(1.0, x)?);
        // Out of range: x > hi, lo > x, or x ≠ x (NaN, which both comparisons miss).
        let nan = super::super::binary::compare_cuda(&dev, "ne", x, x, x.shape())?;
        let d = Tensor::where_(&x.gt(&scalar_like(hi, x)?)?, &zero, &one)?;
        let d = Tensor::where_(&scalar_like(lo, x)?.gt(x)?, &zero, &d)?;
        Tensor::where_(&nan, &zero, &d)
    }
}

impl Tensor {
    /// e^x.
    pub fn exp(&self) -> Result<Tensor> {
        let out = unary_fwd(self, "exp", (0.0, 0.0), |x| map_f32(x, vec::exp))?;
        let y = out.clone();
        Ok(Tensor::record(out, "exp", &[self], move |g| {
            Ok(vec![Some(g.mul(&y)?)])
        }))
    }

    /// Natural logarithm.
    pub fn log(&self) -> Result<Tensor> {
        let out = unary_fwd(self, "log", (0.0, 0.0), |x| map_f32(x, vec::log))?;
        let x = self.detach();
        Ok(Tensor::record(out, "log", &[self], move |g| {
            Ok(vec![Some(g.div(&x)?)])
        }))
    }

    /// Square root.
    pub fn sqrt(&self) -> Result<Tensor> {
        let out = unary_fwd(self, "sqrt", (0.0, 0.0), |x| map_scalar(x, f32::sqrt))?;
        let y = out.clone();
        Ok(Tensor::record(out, "sqrt", &[self], move |g| {
            Ok(vec![Some(g.div(&y.mul_scalar(2.0)?)?)])
        }))
    }

    /// Hyperbolic tangent.
    pub fn tanh(&self) -> Result<Tensor> {
        let out = unary_fwd(self, "tanh", (0.0, 0.0), |x| map_f32(x, vec::tanh))?;
        let y = out.clone();
        Ok(Tensor::record(out, "tanh", &[self], move |g| {
            let d = deriv(
                &y,
                "tanh",
                |t| 1.0 - t * t,
                Some(|y| y.mul(y)?.neg()?.add_scalar(1.0)),
            )?;
            Ok(vec![Some(g.mul(&d)?)])
        }))
    }

    /// max(x, 0). The derivative at exactly 0 is taken as 0.
    pub fn relu(&self) -> Result<Tensor> {
        let out = unary_fwd(self, "relu", (0.0, 0.0), |x| map_scalar(x, |x| x.max(0.0)))?;
        let x = self.detach();
        Ok(Tensor::record(out, "relu", &[self], move |g| {
            #[cfg(feature = "cuda")]
            if x.device() != crate::Device::Cpu {
                return Ok(vec![Some(g.mul(&gpu_deriv::relu(&x)?)?)]);
            }
            let d = deriv(&x, "relu", |v| if v > 0.0 { 1.0 } else { 0.0 }, None)?;
            Ok(vec![Some(g.mul(&d)?)])
        }))
    }

    /// GELU with the tanh approximation GPT-2 uses.
    pub fn gelu(&self) -> Result<Tensor> {
        let out = unary_fwd(self, "gelu", (0.0, 0.0), |x| map_f32(x, vec::gelu))?;
        let x = self.detach();
        Ok(Tensor::record(out, "gelu", &[self], move |g| {
            #[cfg(feature = "cuda")]
            if let Some(dev) = super::cuda_inputs("gelu backward", &[&x, g])? {
                return Ok(vec![Some(gelu_backward_cuda(&dev, &x, g)?)]);
            }
            let g = g.contiguous()?;
            Ok(vec![Some(zip_f32(&x, &g, vec::gelu_backward)?)])
        }))
    }

    /// 1 / (1 + e^-x).
    pub fn sigmoid(&self) -> Result<Tensor> {
        let out = unary_fwd(self, "sigmoid", (0.0, 0.0), |x| map_f32(x, vec::sigmoid))?;
        let y = out.clone();
        Ok(Tensor::record(out, "sigmoid", &[self], move |g| {
            let d = deriv(
                &y,
                "sigmoid",
                |s| s * (1.0 - s),
                Some(|y| y.mul(&y.neg()?.add_scalar(1.0)?)),
            )?;
            Ok(vec![Some(g.mul(&d)?)])
        }))
    }

    /// log σ(x) = min(x, 0) - log(1 + e^-|x|): finite for any finite x (no log of 0).
    pub fn log_sigmoid(&self) -> Result<Tensor> {
        let out = unary_fwd(self, "log_sigmoid", (0.0, 0.0), |x| {
            map_scalar(x, |x| x.min(0.0) - (-x.abs()).exp().ln_1p())
        })?;
        let x = self.detach();
        Ok(Tensor::record(out, "log_sigmoid", &[self], move |g| {
            // d/dx log σ(x) = 1 - σ(x) = σ(-x)
            let d = deriv(
                &x,
                "log_sigmoid",
                |v| 1.0 / (1.0 + v.exp()),
                Some(|x| x.neg()?.sigmoid()),
            )?;
            Ok(vec![Some(g.mul(&d)?)])
        }))
    }

    /// x^p elementwise.
    pub fn powf(&self, p: f32) -> Result<Tensor> {
        let out = unary_fwd(self, "powf", (p, 0.0), |x| map_scalar(x, |x| x.powf(p)))?;
        let x = self.detach();
        Ok(Tensor::record(out, "powf", &[self], move |g| {
            let d = if x.device() == crate::Device::Cpu {
                map_scalar(&x, |v| p * v.powf(p - 1.0))?
            } else {
                x.powf(p - 1.0)?.mul_scalar(p)?
            };
            Ok(vec![Some(g.mul(&d)?)])
        }))
    }

    /// Elementwise clamp into [lo, hi]; the gradient is zero where the value was clipped.
    pub fn clamp(&self, lo: f32, hi: f32) -> Result<Tensor> {
        let out = unary_fwd(self, "clamp", (lo, hi), |x| {
            map_scalar(x, |x| x.clamp(lo, hi))
        })?;
        let x = self.detach();
        Ok(Tensor::record(out, "clamp", &[self], move |g| {
            #[cfg(feature = "cuda")]
            if x.device() != crate::Device::Cpu {
                return Ok(vec![Some(g.mul(&gpu_deriv::clamp(&x, lo, hi)?)?)]);
            }
            let d = deriv(
                &x,
                "clamp",
                |v| if v >= lo && v <= hi { 1.0 } else { 0.0 },
                None,
            )?;
            Ok(vec![Some(g.mul(&d)?)])
        }))
    }

    /// |x|; the derivative at 0 is taken as 0.
    pub fn abs(&self) -> Result<Tensor> {
        let out = unary_fwd(self, "abs", (0.0, 0.0), |x| map_scalar(x, f32::abs))?;
        let x = self.detach();
        Ok(Tensor::record(out, "abs", &[self], move |g| {
            #[cfg(feature = "cuda")]
            if x.device() != crate::Device::Cpu {
                return Ok(vec![Some(g.mul(&gpu_deriv::abs(&x)?)?)]);
            }
            let d = deriv(
                &x,
                "abs",
                |v| {
                    if v > 0.0 {
                        1.0
                    } else if v < 0.0 {
                        -1.0
                    } else {
                        0.0
                    }
                },
                None,
            )?;
            Ok(vec![Some(g.mul(&d)?)])
        }))
    }

    /// x².
    pub fn square(&self) -> Result<Tensor> {
        self.mul(self)
    }
}

/// `gelu_backward_T(n, x, dy, dx)` of kernels/elementwise.cu (contiguous operands).
#[cfg(feature = "cuda")]
fn gelu_backward_cuda(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    x: &Tensor,
    g: &Tensor,
) -> Result<Tensor> {
    use cudarc::driver::PushKernelArg;
    const OP: &str = "gelu backward";
    super::same_dtype(OP, x, g)?;
    let entry = format!("gelu_backward_{}", super::tname(OP, x.dtype())?);
    let (x, g) = (super::dense(x)?, super::dense(g)?);
    let dx = super::cuda_uninit(dev, x.dtype(), x.shape())?;
    let n = x.numel();
    if n == 0 {
        return Ok(dx);
    }
    let (px, pg, pd, n64) = (super::ptr(&x)?, super::ptr(&g)?, super::ptr(&dx)?, n as i64);
    let f = dev.function("elementwise", &entry)?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&n64).arg(&px).arg(&pg).arg(&pd);
    // SAFETY: gelu_backward_T(i64 n, const T* x, const T* dy, T* dx), all three contiguous
    // with n elements (x and g made dense above, dx fresh).
    let vector = crate::cuda::storage::vector_path(&[], &[px, pg, pd]);
    unsafe { super::launch(OP, &entry, l, crate::cuda::storage::map_config(n, vector))? };
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::check_gradients;
    use crate::Tensor;

    #[test]
    fn log_sigmoid_is_stable_at_extremes() {
        let x = Tensor::from_vec(vec![-1000.0f32, 0.0, 1000.0], &[3]).unwrap();
        let y = x.log_sigmoid().unwrap().to_f64_vec();
        assert_eq!(y[0], -1000.0);
        assert!((y[1] + std::f64::consts::LN_2).abs() < 1e-6);
        assert_eq!(y[2], 0.0);
    }

    #[test]
    fn unary_gradients() {
        let x = Tensor::rand_uniform(&[2, 5], 0.3, 2.0, 11);
        type UnaryFn = fn(&[Tensor]) -> crate::Result<Tensor>;
        let fs: Vec<(&str, UnaryFn)> = vec![
            ("exp", |x| x[0].exp()),
            ("log", |x| x[0].log()),
            ("sqrt", |x| x[0].sqrt()),
            ("tanh", |x| x[0].tanh()),
            ("gelu", |x| x[0].gelu()),
            ("sigmoid", |x| x[0].sigmoid()),
            ("log_sigmoid", |x| x[0].log_sigmoid()),
            ("powf", |x| x[0].powf(1.7)),
            ("clamp", |x| x[0].clamp(0.0, 5.0)),
            ("relu", |x| x[0].relu()),
        ];
        for (name, f) in fs {
            let err = check_gradients(std::slice::from_ref(&x), f, 1e-3).unwrap();
            assert!(err < 2e-3, "{name}: {err}");
        }
    }
}
