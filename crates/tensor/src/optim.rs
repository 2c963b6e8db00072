//! Optimisers: AdamW with decoupled weight decay, and clipping by global gradient norm.
//!
//! Moments are f32 (master state), one pair per parameter, in the order the parameters were
//! given; [`AdamW::state`] and [`AdamW::load_state`] move them in and out of checkpoints so a
//! resumed run continues exactly.

use crate::cpu::vec;
use crate::{Error, Parameter, Result, Tensor};

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

struct Slot {
    name: String,
    param: Parameter,
    decay: bool,
    m: Vec<f32>,
    v: Vec<f32>,
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
                let shape = param.shape();
                let n = shape.iter().product();
                Slot {
                    name,
                    decay: shape.len() >= 2,
                    param,
                    m: vec![0.0; n],
                    v: vec![0.0; n],
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
    pub fn step(&mut self, lr: f32) -> Result<()> {
        self.step += 1;
        let c = self.config;
        for slot in &mut self.slots {
            let Some(grad) = slot.param.grad() else {
                continue;
            };
            let g = grad.f32_data()?;
            let p_now = slot.param.tensor();
            let src = p_now.f32_data()?;
            let mut p = crate::cpu::pool::for_overwrite(src.len());
            p.copy_from_slice(&src);
            let wd = if slot.decay { c.weight_decay } else { 0.0 };
            vec::adamw(
                &mut p,
                &g,
                &mut slot.m,
                &mut slot.v,
                lr,
                c.beta1,
                c.beta2,
                c.eps,
                wd,
                self.step,
            );
            let shape = slot.param.shape();
            slot.param.set(&Tensor::from_vec(p, &shape)?)?;
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

    /// A copy of the state for checkpointing.
    pub fn state(&self) -> Result<AdamWState> {
        let moments = self
            .slots
            .iter()
            .map(|s| {
                let shape = s.param.shape();
                Ok((
                    s.name.clone(),
                    Tensor::from_vec(s.m.clone(), &shape)?,
                    Tensor::from_vec(s.v.clone(), &shape)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamWState {
            step: self.step,
            moments,
        })
    }

    /// Restores a state saved by [`AdamW::state`]; names and shapes must match.
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
        for (slot, (name, m, v)) in self.slots.iter_mut().zip(&state.moments) {
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
            slot.m = m.f32_data()?.into_owned();
            slot.v = v.f32_data()?.into_owned();
        }
        self.step = state.step;
        Ok(())
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm before
/// clipping (computed in f64, in parameter order, so it is deterministic).
pub fn clip_grad_norm(params: &[Parameter], max_norm: f32) -> Result<f32> {
    let mut total = 0.0f64;
    for p in params {
        if let Some(g) = p.grad() {
            total += g
                .f32_data()?
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>();
        }
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
