//! Optimisers: AdamW with decoupled weight decay, and clipping by global gradient norm.
//!
//! Moments are f32 (master state), one pair per parameter, in the order the parameters were
//! given; [`AdamW::state`] and [`AdamW::load_state`] move them in and out of checkpoints so a
//! resumed run continues exactly.
//!
//! Parameters on a CUDA device are updated there by kernels/adamw.cu, one launch per parameter
//! and no host round-trip: the moments are f32 device buffers on the parameter's device, an f32
//! parameter is its own master copy (the kernel reads it and writes the new value to a fresh
//! buffer, since tensors are immutable values), and a bf16 parameter gets f32 master weights on
//! the device, updated in place, from which the kernel writes the new bf16 value. Moments follow
//! their parameter: they move to its device at the next step if it moved. [`clip_grad_norm`]
//! sums squares on the device and synchronises once per device for the total.

use crate::cpu::vec;
use crate::{Device, Error, Parameter, Result, Tensor};

/// AdamW hyper-parameters (the learning rate is given to each step, so schedules stay outside).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// β1 0.9, β2 0.95 (the GPT-3/InstructGPT setting), ε 1e-8, weight decay 0.1.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// Where a parameter's moments live.
enum Moments {
    /// Host vectors (parameters on the CPU, and every parameter before its first step).
    Host { m: Vec<f32>, v: Vec<f32> },
    /// Not allocated yet: zeros (a parameter created on a GPU, before its first step), so a
    /// GPU model's moments are never built on the host first.
    Zero,
    /// Device buffers beside a CUDA parameter.
    #[cfg(feature = "cuda")]
    Cuda(cuda::DeviceMoments),
}

struct Slot {
    name: String,
    param: Parameter,
    decay: bool,
    moments: Moments,
}

impl Slot {
    /// The moments as host vectors (a copy from the device if they live there).
    fn host_moments(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = self.param.shape().iter().product();
        match &self.moments {
            Moments::Host { m, v } => Ok((m.clone(), v.clone())),
            Moments::Zero => Ok((vec![0.0; n], vec![0.0; n])),
            #[cfg(feature = "cuda")]
            Moments::Cuda(d) => d.to_host(),
        }
    }
}

/// AdamW over a fixed list of named parameters.
pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    step: u64,
}

/// The optimiser's state for a checkpoint: the step and each parameter's two moments.
pub struct AdamWState {
    pub step: u64,
    /// (parameter name, first moment, second moment), each moment shaped like its parameter.
    pub moments: Vec<(String, Tensor, Tensor)>,
}

impl AdamW {
    /// Weight decay applies to matrices (rank ≥ 2) only: not to biases, LayerNorm gains or
    /// other vectors, as is usual for transformers.
    pub fn new(params: Vec<(String, Parameter)>, config: AdamWConfig) -> AdamW {
        let slots = params
            .into_iter()
            .map(|(name, param)| {
                let value = param.tensor();
                let shape = value.shape();
                let n = shape.iter().product();
                let moments = if value.device() == Device::Cpu {
                    Moments::Host {
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    }
                } else {
                    Moments::Zero
                };
                Slot {
                    name,
                    decay: shape.len() >= 2,
                    param,
                    moments,
                }
            })
            .collect();
        AdamW {
            config,
            slots,
            step: 0,
        }
    }

    pub fn config(&self) -> AdamWConfig {
        self.config
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr` from the accumulated gradients. Parameters without a
    /// gradient (unused in this step's graph) keep their value and moments.
    ///
    /// A gradient on another device than its parameter, or of another shape, is an error,
    /// reported before any parameter changes.
    pub fn step(&mut self, lr: f32) -> Result<()> {
        self.step_inner(lr, None)
    }

    /// [`clip_grad_norm`] to `max_norm` (`f32::INFINITY`: measure only), then, when the norm
    /// is finite, [`AdamW::step`]; returns the norm before clipping. A non-finite norm takes no
    /// step: no value, moment or step count changes, and the gradients stay as they are.
    ///
    /// When every gradient is on one GPU the clipping is folded into the update: the norm and
    /// the scale stay in device memory (kernels/adamw.cu `adamw_clip_scale`) and the update
    /// kernel scales each gradient element as it reads it, so there is no host round trip
    /// before the update and no pass of its own over the gradients; the norm is read once the
    /// update is queued. The numbers are clip_grad_norm's (the same f32 device sum of squares,
    /// square root and scale), and the gradients themselves are not rescaled.
    pub fn step_clipped(&mut self, lr: f32, max_norm: f32) -> Result<f32> {
        #[cfg(feature = "cuda")]
        {
            let grads: Vec<Tensor> = self.slots.iter().filter_map(|s| s.param.grad()).collect();
            let one_gpu = match grads.first().map(|g| g.device()) {
                Some(Device::Cuda(o)) if grads.iter().all(|g| g.device() == Device::Cuda(o)) => {
                    Some(o)
                }
                _ => None,
            };
            if let Some(o) = one_gpu {
                let dev = crate::cuda::device(o)?;
                let refs: Vec<&Tensor> = grads.iter().collect();
                let clip = cuda::clip_on_device(&dev, &refs, max_norm)?;
                self.step_inner(lr, Some(&clip))?;
                let norm = clip.to_device(Device::Cpu)?.to_f64_vec()[0] as f32;
                if !norm.is_finite() {
                    // The kernels kept every value and moment: only the count moved.
                    self.step -= 1;
                }
                return Ok(norm);
            }
        }
        let params: Vec<Parameter> = self.slots.iter().map(|s| s.param.clone()).collect();
        let norm = clip_grad_norm(&params, max_norm)?;
        if norm.is_finite() {
            self.step(lr)?;
        }
        Ok(norm)
    }

    /// [`AdamW::step`], with `clip` ([norm, scale] on the gradients' GPU, from
    /// `cuda::clip_on_device`) folded into the CUDA updates.
    fn step_inner(&mut self, lr: f32, clip: Option<&Tensor>) -> Result<()> {
        let mut work = Vec::with_capacity(self.slots.len());
        for (i, slot) in self.slots.iter().enumerate() {
            let Some(grad) = slot.param.grad() else {
                continue;
            };
            let value = slot.param.tensor();
            if grad.device() != value.device() {
                return Err(Error::cuda(
                    "AdamW::step",
                    format!(
                        "parameter {} {:?} is on {} but its gradient is on {}: keep a model's \
                         parameters and gradients on one device",
                        slot.name,
                        value.shape(),
                        value.device(),
                        grad.device()
                    ),
                ));
            }
            if grad.shape() != value.shape() {
                return Err(Error::ShapeMismatch {
                    op: "AdamW::step",
                    lhs: value.shape().to_vec(),
                    rhs: grad.shape().to_vec(),
                });
            }
            work.push((i, value, grad));
        }
        self.step += 1;
        let c = self.config;
        for (i, value, grad) in work {
            let slot = &mut self.slots[i];
            let wd = if slot.decay { c.weight_decay } else { 0.0 };
            match value.device() {
                Device::Cpu => step_cpu(slot, &value, &grad, lr, c, wd, self.step)?,
                #[cfg(feature = "cuda")]
                Device::Cuda(_) => {
                    let k = AdamStepConstants::new(lr, c, wd, self.step);
                    cuda::step(slot, &value, &grad, k, clip)?
                }
                #[cfg(not(feature = "cuda"))]
                Device::Cuda(_) => {
                    return Err(Error::cuda(
                        "AdamW::step",
                        "rlhf-tensor was built without the `cuda` feature",
                    ))
                }
            }
        }
        Ok(())
    }

    /// Clears every parameter's gradient.
    pub fn zero_grad(&self) {
        for s in &self.slots {
            s.param.zero_grad();
        }
    }

    /// The parameters, in order.
    pub fn parameters(&self) -> Vec<Parameter> {
        self.slots.iter().map(|s| s.param.clone()).collect()
    }

    /// A copy of the state for checkpointing (moments on a GPU are copied to the host).
    pub fn state(&self) -> Result<AdamWState> {
        let moments = self
            .slots
            .iter()
            .map(|s| {
                let shape = s.param.shape();
                let (m, v) = s.host_moments()?;
                Ok((
                    s.name.clone(),
                    Tensor::from_vec(m, &shape)?,
                    Tensor::from_vec(v, &shape)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamWState {
            step: self.step,
            moments,
        })
    }

    /// Restores a state saved by [`AdamW::state`]; names and shapes must match. Moments go to
    /// the device their parameter is on (f32 master weights of bf16 parameters start again
    /// from the parameter's value).
    pub fn load_state(&mut self, state: &AdamWState) -> Result<()> {
        if state.moments.len() != self.slots.len() {
            return Err(Error::invalid(
                "AdamW::load_state",
                format!(
                    "state has {} parameters, the optimiser {}",
                    state.moments.len(),
                    self.slots.len()
                ),
            ));
        }
        for (slot, (name, m, v)) in self.slots.iter().zip(&state.moments) {
            if *name != slot.name || m.shape() != slot.param.shape() || v.shape() != m.shape() {
                return Err(Error::invalid(
                    "AdamW::load_state",
                    format!(
                        "state entry {name} {:?} does not match parameter {} {:?}",
                        m.shape(),
                        slot.name,
                        slot.param.shape()
                    ),
                ));
            }
        }
        for (slot, (_, m, v)) in self.slots.iter_mut().zip(&state.moments) {
            // Host copies whatever device the saved tensors are on.
            let host = |t: &Tensor| -> Result<Vec<f32>> {
                Ok(t.to_device(Device::Cpu)?.f32_data()?.into_owned())
            };
            let (m, v) = (host(m)?, host(v)?);
            slot.moments = match slot.param.tensor().device() {
                Device::Cpu => Moments::Host { m, v },
                #[cfg(feature = "cuda")]
                Device::Cuda(n) => Moments::Cuda(cuda::DeviceMoments::upload(n, &m, &v)?),
                #[cfg(not(feature = "cuda"))]
                Device::Cuda(_) => Moments::Host { m, v },
            };
        }
        self.step = state.step;
        Ok(())
    }
}

/// The CPU update: cpu::vec::adamw on the host copies of the value and moments.
fn step_cpu(
    slot: &mut Slot,
    value: &Tensor,
    grad: &Tensor,
    lr: f32,
    c: AdamWConfig,
    wd: f32,
    step: u64,
) -> Result<()> {
    if !matches!(slot.moments, Moments::Host { .. }) {
        let (m, v) = slot.host_moments()?;
        slot.moments = Moments::Host { m, v };
    }
    let Moments::Host { m, v } = &mut slot.moments else {
        unreachable!("moments were just moved to the host");
    };
    let g = grad.f32_data()?;
    let src = value.f32_data()?;
    // A pooled buffer: the parameter's previous storage goes back to the pool for the next step.
    let mut p = crate::cpu::pool::for_overwrite(src.len());
    p.copy_from_slice(&src);
    drop(src);
    vec::adamw(&mut p, &g, m, v, lr, c.beta1, c.beta2, c.eps, wd, step);
    let shape = slot.param.shape();
    slot.param.set(&Tensor::from_vec(p, &shape)?)
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm before
/// clipping. Gradients on the CPU are summed in f64, in parameter order, so it is
/// deterministic; gradients on a GPU are summed there (f32, in a fixed order: deterministic
/// too) with one synchronisation per device, and their totals added after the CPU's.
pub fn clip_grad_norm(params: &[Parameter], max_norm: f32) -> Result<f32> {
    let mut total = 0.0f64;
    #[cfg(feature = "cuda")]
    let mut on_gpu = Vec::new();
    for p in params {
        if let Some(g) = p.grad() {
            if g.device() != Device::Cpu {
                #[cfg(feature = "cuda")]
                on_gpu.push(g);
                continue;
            }
            total += g
                .f32_data()?
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>();
        }
    }
    #[cfg(feature = "cuda")]
    {
        total += cuda::sum_of_squares(&on_gpu)?;
    }
    let norm = total.sqrt() as f32;
    if norm.is_finite() && norm > max_norm && norm > 0.0 {
        let scale = max_norm / norm;
        for p in params {
            if let Some(g) = p.grad() {
                p.set_grad(Some(g.mul_scalar(scale)?));
            }
        }
    }
    Ok(norm)
}

/// The per-step constants of cpu::vec's AdamW (its `AdamCoeffs`), which kernels/adamw.cu takes
/// as arguments: computed in f64 and rounded to f32 exactly as the CPU computes them, so both
/// devices step with the same numbers.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct AdamStepConstants {
    decay: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    inv_bias_correction2_sqrt: f32,
    eps: f32,
    step_size: f32,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl AdamStepConstants {
    fn new(lr: f32, c: AdamWConfig, weight_decay: f32, step: u64) -> AdamStepConstants {
        let (lr64, b1, b2) = (lr as f64, c.beta1 as f64, c.beta2 as f64);
        let t = step as f64;
        AdamStepConstants {
            decay: (1.0 - lr64 * weight_decay as f64) as f32,
            beta1: c.beta1,
            one_minus_beta1: (1.0 - b1) as f32,
            beta2: c.beta2,
            one_minus_beta2: (1.0 - b2) as f32,
            inv_bias_correction2_sqrt: (1.0 / (1.0 - b2.powf(t)).sqrt()) as f32,
            eps: c.eps,
            step_size: (lr64 / (1.0 - b1.powf(t))) as f32,
        }
    }

    /// kernels/adamw.cu's update of one element, operation for operation (`mul_add` is the
    /// kernel's fmaf; the other products and the division round on their own, as its
    /// __fmul_rn and __fdiv_rn do): the model the CPU tests hold to the CPU's own AdamW.
    #[cfg(test)]
    fn kernel_update(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let decayed = p * self.decay;
        let m = self.beta1.mul_add(m, self.one_minus_beta1 * g);
        let v = self.beta2.mul_add(v, (self.one_minus_beta2 * g) * g);
        let denom = v.sqrt().mul_add(self.inv_bias_correction2_sqrt, self.eps);
        let p = (-self.step_size).mul_add(m / denom, decayed);
        (p, m, v)
    }
}

/// AdamW and gradient norms on CUDA devices.
#[cfg(feature = "cuda")]
mod cuda {
    use super::{AdamStepConstants, Moments, Slot};
    use crate::cuda::{CudaDevice, CudaStorage};
    use crate::ops::{cuda_uninit, cuda_zeros, dense, launch, ptr};
    use crate::{DType, Device, Error, Result, Tensor};
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    use std::sync::Arc;

    const OP: &str = "AdamW::step";

    /// A parameter's moments on its device, and for a bf16 parameter its f32 master weights.
    pub(super) struct DeviceMoments {
        ordinal: usize,
        /// f32 [n], contiguous, owned by this optimiser alone (updated in place).
        m: Tensor,
        v: Tensor,
        /// (f32 master weights [n], the bf16 value last given to the parameter): the master
        /// weights hold only while the parameter still holds that value; a value set from
        /// outside (a loaded checkpoint) starts them again from the new value.
        master: Option<(Tensor, Tensor)>,
    }

    impl DeviceMoments {
        /// Host moments copied to device `ordinal`.
        pub(super) fn upload(ordinal: usize, m: &[f32], v: &[f32]) -> Result<DeviceMoments> {
            let dev = crate::cuda::device(ordinal)?;
            if m.is_empty() {
                return DeviceMoments::zeros(&dev, 0);
            }
            let up =
                |x: &[f32]| Tensor::from_slice(x, &[x.len()])?.to_device(Device::Cuda(ordinal));
            Ok(DeviceMoments {
                ordinal,
                m: up(m)?,
                v: up(v)?,
                master: None,
            })
        }

        fn zeros(dev: &Arc<CudaDevice>, n: usize) -> Result<DeviceMoments> {
            Ok(DeviceMoments {
                ordinal: dev.ordinal(),
                m: cuda_zeros(dev, DType::F32, &[n])?,
                v: cuda_zeros(dev, DType::F32, &[n])?,
                master: None,
            })
        }

        /// Both moments copied to the host (two device-to-host copies).
        pub(super) fn to_host(&self) -> Result<(Vec<f32>, Vec<f32>)> {
            let host = |t: &Tensor| -> Result<Vec<f32>> { t.to_vec::<f32>() };
            Ok((host(&self.m)?, host(&self.v)?))
        }
    }

    /// One AdamW step of a parameter on a CUDA device (gradient on the same device, checked by
    /// the caller): one adamw.cu launch.
    pub(super) fn step(
        slot: &mut Slot,
        value: &Tensor,
        grad: &Tensor,
        k: AdamStepConstants,
        clip: Option<&Tensor>,
    ) -> Result<()> {
        let dev = value
            .cuda_storage()
            .ok_or_else(|| Error::cuda(OP, "parameter not on a GPU"))?
            .device()
            .clone();
        let n = value.numel();
        if grad.shape() != value.shape() {
            // The kernel reads n gradient elements: a mismatch must never reach it.
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: value.shape().to_vec(),
                rhs: grad.shape().to_vec(),
            });
        }
        // Moments onto this device: allocated at the first step, moved if the parameter moved.
        let here = matches!(&slot.moments, Moments::Cuda(d) if d.ordinal == dev.ordinal());
        if !here {
            slot.moments = Moments::Cuda(match &slot.moments {
                Moments::Zero => DeviceMoments::zeros(&dev, n)?,
                _ => {
                    let (m, v) = slot.host_moments()?;
                    DeviceMoments::upload(dev.ordinal(), &m, &v)?
                }
            });
        }
        let Moments::Cuda(state) = &mut slot.moments else {
            unreachable!("moments were just moved to the device");
        };
        let entry = match grad.dtype() {
            DType::F32 => "adamw_f32",
            DType::BF16 => "adamw_bf16grad",
            d => {
                return Err(Error::cuda(
                    OP,
                    format!(
                        "parameter {}: gradient of dtype {d} (the CUDA AdamW takes f32 or bf16)",
                        slot.name
                    ),
                ))
            }
        };
        if n == 0 {
            return Ok(());
        }
        let g = dense(grad)?;
        // (p_in, p_out, p_bf16 copy-out, the parameter's new value)
        let (p_in, p_out, bf16_out, new_value) = match value.dtype() {
            DType::F32 => {
                // The value is the master copy; the new value goes to a fresh buffer.
                let p_in = dense(value)?;
                let out = cuda_uninit(&dev, DType::F32, value.shape())?;
                (p_in, out.clone(), 0u64, out)
            }
            DType::BF16 => {
                let master = match &state.master {
                    Some((master, last)) if last.shares_storage(value) => master.clone(),
                    _ => dense(&value.detach().to_dtype(DType::F32)?)?,
                };
                let out = cuda_uninit(&dev, DType::BF16, value.shape())?;
                state.master = Some((master.clone(), out.clone()));
                (master.clone(), master, ptr(&out)?, out)
            }
            d => {
                return Err(Error::cuda(
                    OP,
                    format!(
                        "parameter {} has dtype {d}: the CUDA AdamW updates f32 and bf16 \
                         parameters",
                        slot.name
                    ),
                ))
            }
        };
        let (pp_in, pp_out, pg, pm, pv) = (
            ptr(&p_in)?,
            ptr(&p_out)?,
            ptr(&g)?,
            ptr(&state.m)?,
            ptr(&state.v)?,
        );
        let n64 = n as i64;
        let f = dev.function("adamw", entry)?;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&n64)
            .arg(&pp_in)
            .arg(&pp_out)
            .arg(&pg)
            .arg(&pm)
            .arg(&pv);
        // [norm, scale] from clip_on_device (0: no clipping in the kernel).
        let pclip = match clip {
            Some(c) => ptr(c)?,
            None => 0u64,
        };
        l.arg(&bf16_out).arg(&pclip);
        l.arg(&k.decay).arg(&k.beta1).arg(&k.one_minus_beta1);
        l.arg(&k.beta2).arg(&k.one_minus_beta2);
        l.arg(&k.inv_bias_correction2_sqrt)
            .arg(&k.eps)
            .arg(&k.step_size);
        // About 4 elements a thread: the kernel's 16-byte vector step (adamw.cu).
        let cfg = crate::cuda::storage::grid_stride_config(n, 4);
        // SAFETY: adamw_{f32,bf16grad}(i64 n, const float* p_in, float* p_out, const G* g,
        // float* m, float* v, bf16* p_bf16, const float* clip, 8 × float): clip null or two
        // floats on this device (clip_on_device); every other buffer is contiguous with n
        // elements (p_in, g dense copies or contiguous already; m, v allocated with n; p_out
        // and the bf16 copy fresh, or p_out = p_in, the master weights, which the kernel
        // updates element by element in place, as its header allows). m, v and the master are
        // owned by this optimiser alone, so writing them in place changes no tensor anyone
        // else holds.
        unsafe { launch(OP, entry, l, cfg)? };
        slot.param.set(&new_value)
    }

    /// Σ x² over every gradient in `grads` (each on a CUDA device), in f64 from f32 device
    /// totals ([`device_sumsq`] per device); one copy of that single float to the host per
    /// device.
    pub(super) fn sum_of_squares(grads: &[Tensor]) -> Result<f64> {
        let mut ordinals: Vec<usize> = Vec::new();
        for g in grads {
            if let Device::Cuda(o) = g.device() {
                if !ordinals.contains(&o) {
                    ordinals.push(o);
                }
            }
        }
        let mut total = 0.0f64;
        for o in ordinals {
            let dev = crate::cuda::device(o)?;
            let mine: Vec<&Tensor> = grads
                .iter()
                .filter(|g| g.device() == Device::Cuda(o))
                .collect();
            // The one synchronisation: the copy waits for the stream.
            let host = device_sumsq(&dev, &mine)?.to_host()?;
            let sum = host
                .as_slice::<f32>()
                .and_then(|s| s.first().copied())
                .ok_or_else(|| {
                    Error::cuda(CLIP, "the device total did not come back as one f32")
                })?;
            total += f64::from(sum);
        }
        Ok(total)
    }

    const CLIP: &str = "clip_grad_norm";

    /// Σ x² over `grads` (all on `dev`) as one f32 in device memory: reduce_sumsq_partial_T
    /// writes per-block partial sums of each gradient into one f32 buffer and
    /// reduce_sum_rows_f32 adds them up, in a fixed order (deterministic).
    fn device_sumsq(dev: &Arc<CudaDevice>, grads: &[&Tensor]) -> Result<CudaStorage> {
        const THREADS: u32 = 256;
        // Blocks per gradient: from its length alone (so the result does not depend on the
        // card), at most 1024, as reduce.cu's header suggests.
        let blocks = |n: usize| n.div_ceil(4096).clamp(1, 1024);
        let mine: Vec<Tensor> = grads
            .iter()
            .filter(|g| g.numel() > 0)
            .map(|g| dense(g))
            .collect::<Result<_>>()?;
        let n_partial: usize = mine.iter().map(|g| blocks(g.numel())).sum();
        if n_partial == 0 {
            return CudaStorage::zeros(dev, DType::F32, 1);
        }
        let partial = CudaStorage::uninit(dev, DType::F32, n_partial)?;
        let mut at = 0;
        for g in &mine {
            let entry = match g.dtype() {
                DType::F32 => "reduce_sumsq_partial_f32",
                DType::BF16 => "reduce_sumsq_partial_bf16",
                d => {
                    return Err(Error::cuda(
                        CLIP,
                        format!(
                            "gradient {:?} of dtype {d}: expected f32 or bf16",
                            g.shape()
                        ),
                    ))
                }
            };
            let nb = blocks(g.numel());
            let (n64, px, pp) = (g.numel() as i64, ptr(g)?, partial.ptr(at));
            let f = dev.function("reduce", entry)?;
            let mut l = dev.stream().launch_builder(&f);
            l.arg(&n64).arg(&px).arg(&pp);
            let cfg = LaunchConfig {
                grid_dim: (nb as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: reduce_sumsq_partial_T(i64 n, const T* x, float* partial): x a
            // contiguous gradient of n elements; block b writes partial[b] for b < nb,
            // inside this gradient's nb slots of the n_partial-float buffer.
            unsafe { launch(CLIP, entry, l, cfg)? };
            at += nb;
        }
        let out = CudaStorage::uninit(dev, DType::F32, 1)?;
        let (rows, cols, scale) = (1i64, n_partial as i64, 1.0f32);
        let (pp, po) = (partial.ptr(0), out.ptr(0));
        let entry = "reduce_sum_rows_f32";
        let f = dev.function("reduce", entry)?;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&rows).arg(&cols).arg(&pp).arg(&po).arg(&scale);
        // SAFETY: reduce_sum_rows_f32(i64 rows, i64 cols, const float* x, float* out,
        // float scale): one row of the n_partial partial sums, one f32 out.
        unsafe {
            launch(
                CLIP,
                entry,
                l,
                crate::cuda::storage::rows_config(1, THREADS),
            )?
        };
        Ok(out)
    }

    /// The global norm of `grads` (all on `dev`) and the clip scale for `max_norm`, as
    /// [norm, scale] f32 in device memory (adamw.cu's adamw_clip_scale): what the fused update
    /// reads, with no host synchronisation.
    pub(super) fn clip_on_device(
        dev: &Arc<CudaDevice>,
        grads: &[&Tensor],
        max_norm: f32,
    ) -> Result<Tensor> {
        let sumsq = device_sumsq(dev, grads)?;
        let clip = cuda_uninit(dev, DType::F32, &[2])?;
        let (ps, pc) = (sumsq.ptr(0), ptr(&clip)?);
        let entry = "adamw_clip_scale";
        let f = dev.function("adamw", entry)?;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&ps).arg(&max_norm).arg(&pc);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: adamw_clip_scale(const float* sumsq, float max_norm, float* clip): one f32
        // in, two f32 out, both buffers on this device.
        unsafe { launch(CLIP, entry, l, cfg)? };
        Ok(clip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_minimises_a_quadratic() {
        let w = Parameter::new(Tensor::from_vec(vec![3.0f32, -2.0, 0.5, 4.0], &[2, 2]).unwrap());
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default());
        for _ in 0..300 {
            opt.zero_grad();
            w.tensor()
                .square()
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            opt.step(0.05).unwrap();
        }
        for x in w.tensor().to_f64_vec() {
            assert!(x.abs() < 0.05, "{x}");
        }
    }

    #[test]
    fn first_step_matches_formula() {
        // With zero moments, bias correction makes the first Adam step exactly lr·sign(g)
        // (up to ε), after decoupled decay.
        let w = Parameter::new(Tensor::from_vec(vec![1.0f32, -1.0], &[1, 2]).unwrap());
        let c = AdamWConfig {
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], c);
        w.set_grad(Some(Tensor::from_vec(vec![0.3f32, -7.0], &[1, 2]).unwrap()));
        opt.step(0.1).unwrap();
        let v = w.tensor().to_f64_vec();
        assert!((v[0] - (1.0 * (1.0 - 0.05) - 0.1)).abs() < 1e-5, "{v:?}");
        assert!((v[1] - (-(1.0 - 0.05) + 0.1)).abs() < 1e-5, "{v:?}");
    }

    #[test]
    fn clipping_scales_to_max_norm_and_state_round_trips() {
        let a = Parameter::new(Tensor::zeros(&[2]));
        a.set_grad(Some(Tensor::from_vec(vec![3.0f32, 4.0], &[2]).unwrap()));
        assert_eq!(clip_grad_norm(std::slice::from_ref(&a), 1.0).unwrap(), 5.0);
        let g = a.grad().unwrap().to_f64_vec();
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);

        let mut opt = AdamW::new(vec![("a".into(), a.clone())], AdamWConfig::default());
        opt.step(0.01).unwrap();
        let st = opt.state().unwrap();
        let mut other = AdamW::new(vec![("a".into(), a.clone())], AdamWConfig::default());
        other.load_state(&st).unwrap();
        assert_eq!(other.steps(), 1);
        let bad = AdamW::new(vec![("b".into(), a)], AdamWConfig::default());
        let mut bad = bad;
        assert!(bad.load_state(&st).is_err());
    }

    #[test]
    fn step_clipped_is_clip_then_step_and_skips_non_finite_norms() {
        let values = [vec![0.5f32, -1.0, 2.0], vec![0.25f32, 3.0]];
        let grads = [vec![3.0f32, 4.0, -12.0], vec![0.5f32, -0.25]];
        let make = || -> Vec<(String, Parameter)> {
            values
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let p = Parameter::new(Tensor::from_vec(v.clone(), &[v.len()]).unwrap());
                    (format!("p{i}"), p)
                })
                .collect()
        };
        let set_grads = |ps: &[(String, Parameter)]| {
            for ((_, p), g) in ps.iter().zip(&grads) {
                p.set_grad(Some(Tensor::from_vec(g.clone(), &[g.len()]).unwrap()));
            }
        };
        for max in [1.0f32, f32::INFINITY] {
            let (a, b) = (make(), make());
            let mut oa = AdamW::new(a.clone(), AdamWConfig::default());
            let mut ob = AdamW::new(b.clone(), AdamWConfig::default());
            for _ in 0..3 {
                set_grads(&a);
                set_grads(&b);
                let params: Vec<Parameter> = a.iter().map(|(_, p)| p.clone()).collect();
                let want = clip_grad_norm(&params, max).unwrap();
                oa.step(0.01).unwrap();
                assert_eq!(ob.step_clipped(0.01, max).unwrap(), want);
                for ((_, pa), (_, pb)) in a.iter().zip(&b) {
                    assert_eq!(pa.tensor().to_f64_vec(), pb.tensor().to_f64_vec());
                }
            }
            assert_eq!(ob.steps(), 3);
        }
        // A NaN gradient: the norm comes back NaN and nothing moves.
        let ps = make();
        let mut opt = AdamW::new(ps.clone(), AdamWConfig::default());
        set_grads(&ps);
        opt.step_clipped(0.01, 1.0).unwrap();
        let before: Vec<Vec<f64>> = ps.iter().map(|(_, p)| p.tensor().to_f64_vec()).collect();
        ps[1]
            .1
            .set_grad(Some(Tensor::from_vec(vec![f32::NAN, 1.0], &[2]).unwrap()));
        assert!(opt.step_clipped(0.01, 1.0).unwrap().is_nan());
        assert_eq!(opt.steps(), 1);
        let after: Vec<Vec<f64>> = ps.iter().map(|(_, p)| p.tensor().to_f64_vec()).collect();
        assert_eq!(before, after);
    }

    #[test]
    fn kernel_model_matches_the_cpu_adamw() {
        // kernels/adamw.cu, transcribed in AdamStepConstants::kernel_update, against the CPU:
        // bitwise on the SIMD paths (the same FMAs in the same places), within an ulp or two
        // of the scalar path (which rounds the fused steps twice).
        use crate::cpu::{vec::adamw_with, Isa};
        let n = 1037; // full vectors and a tail at every width
        let mut rng = crate::Rng::new(17);
        let mut draw = |lo: f32, hi: f32| -> Vec<f32> {
            (0..n).map(|_| lo + (hi - lo) * rng.next_f32()).collect()
        };
        let (p0, g, m0) = (draw(-2.0, 2.0), draw(-1.0, 1.0), draw(-0.1, 0.1));
        let v0 = draw(0.0, 0.01);
        let c = AdamWConfig::default();
        for (step, lr, wd) in [(1u64, 1e-3f32, 0.1f32), (7, 3e-4, 0.0), (1000, 6e-4, 0.1)] {
            let k = AdamStepConstants::new(lr, c, wd, step);
            let model: Vec<(f32, f32, f32)> = (0..n)
                .map(|i| k.kernel_update(p0[i], g[i], m0[i], v0[i]))
                .collect();
            for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
                if !isa.is_available() {
                    continue;
                }
                let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
                adamw_with(
                    isa, &mut p, &g, &mut m, &mut v, lr, c.beta1, c.beta2, c.eps, wd, step,
                );
                for (i, &(pk, mk, vk)) in model.iter().enumerate() {
                    if isa == Isa::Scalar {
                        // Bounded by the scale of the summed terms (about 0.1 for the moments
                        // here), not of the result: m's two terms nearly cancel at times.
                        let close =
                            |a: f32, b: f32| (a - b).abs() <= 4.0 * f32::EPSILON * (b.abs() + 0.1);
                        assert!(
                            close(p[i], pk) && close(m[i], mk) && close(v[i], vk),
                            "{isa:?} step {step} element {i}: cpu ({}, {}, {}) kernel \
                             ({pk}, {mk}, {vk})",
                            p[i],
                            m[i],
                            v[i]
                        );
                    } else {
                        assert_eq!(
                            (p[i].to_bits(), m[i].to_bits(), v[i].to_bits()),
                            (pk.to_bits(), mk.to_bits(), vk.to_bits()),
                            "{isa:?} step {step} element {i}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_gradient_of_another_shape_is_an_error_not_a_panic() {
        let w = Parameter::new(Tensor::ones(&[2, 3]));
        w.set_grad(Some(Tensor::ones(&[3, 2])));
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default());
        let e = opt.step(0.1).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
        assert_eq!(opt.steps(), 0);
        assert_eq!(w.tensor().to_f64_vec(), vec![1.0; 6]);
    }

    #[test]
    fn gradients_on_another_device_are_refused_before_any_update() {
        // Without a GPU the only reachable mismatch is none at all; with one, a CUDA gradient
        // on a CPU parameter must be an error that leaves every parameter unchanged.
        let w = Parameter::new(Tensor::from_vec(vec![1.0f32, 2.0], &[2]).unwrap());
        let x = Parameter::new(Tensor::from_vec(vec![3.0f32], &[1]).unwrap());
        x.set_grad(Some(Tensor::ones(&[1])));
        let Ok(g) = Tensor::ones(&[2]).to_device(Device::Cuda(0)) else {
            return;
        };
        w.set_grad(Some(g));
        let mut opt = AdamW::new(
            vec![("x".into(), x.clone()), ("w".into(), w.clone())],
            AdamWConfig::default(),
        );
        let e = opt.step(0.1).unwrap_err();
        assert!(matches!(e, Error::Cuda { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("parameter w [2] is on cpu but its gradient is on cuda:0"),
            "{e}"
        );
        assert_eq!(opt.steps(), 0);
        assert_eq!(x.tensor().to_f64_vec(), vec![3.0]);
    }
}

/// Linear warmup to `peak`, then cosine decay to `floor_ratio · peak` at `total_steps`
/// (InstructGPT's SFT decays to 10% of peak). Steps count from 0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CosineSchedule {
    pub peak: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub floor_ratio: f32,
}

impl CosineSchedule {
    /// The learning rate for step `step`.
    pub fn lr(&self, step: u64) -> f32 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f32 / self.warmup_steps as f32;
        }
        let floor = self.peak * self.floor_ratio;
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let t = ((step - self.warmup_steps) as f32 / span as f32).min(1.0);
        floor + (self.peak - floor) * 0.5 * (1.0 + (std::f32::consts::PI * t).cos())
    }
}

#[cfg(test)]
mod schedule_tests {
    use super::CosineSchedule;

    #[test]
    fn warms_up_then_decays_to_floor() {
        let s = CosineSchedule {
            peak: 1.0,
            warmup_steps: 10,
            total_steps: 110,
            floor_ratio: 0.1,
        };
        assert!((s.lr(0) - 0.1).abs() < 1e-6);
        assert!((s.lr(9) - 1.0).abs() < 1e-6);
        assert!((s.lr(60) - 0.55).abs() < 1e-5);
        assert!((s.lr(110) - 0.1).abs() < 1e-6);
        assert!((s.lr(1000) - 0.1).abs() < 1e-6);
        assert!(s.lr(30) > s.lr(40));
    }
}
