//! A scalar head on the trunk: one number per position, for the reward and value models.
//!
//! [`ScalarHead`] is a linear map d → 1 named like Hugging Face's
//! `GPT2ForSequenceClassification` head with one label: `score.weight` of shape `[1, d]` (a
//! `torch.nn.Linear` weight, `[out, in]`), without a bias by default. [`ScalarModel`] pairs it
//! with a [`Gpt`] trunk.

use crate::error::{ModelError, Result};
use crate::gpt::Gpt;
use rlhf_tensor::{DType, Device, Parameter, Tensor};

/// A linear map from hidden states `[.., d]` to one value per position `[..]`.
pub struct ScalarHead {
    weight: Parameter,
    bias: Option<Parameter>,
}

impl ScalarHead {
    /// Weight N(0, std²) drawn from `seed`; with `bias`, a zero bias `score.bias` `[1]`.
    pub fn new(d: usize, std: f32, bias: bool, seed: u64) -> ScalarHead {
        ScalarHead {
            weight: Parameter::new(Tensor::randn(&[1, d], 0.0, std, seed)),
            bias: bias.then(|| Parameter::new(Tensor::zeros(&[1]))),
        }
    }

    /// A head with the given weight `[1, d]` and optional bias `[1]`.
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Result<ScalarHead> {
        if weight.rank() != 2 || weight.shape()[0] != 1 {
            return Err(ModelError::invalid(
                "ScalarHead",
                format!("score.weight must be [1, d], got {:?}", weight.shape()),
            ));
        }
        if let Some(b) = &bias {
            if b.shape() != [1] {
                return Err(ModelError::invalid(
                    "ScalarHead",
                    format!("score.bias must be [1], got {:?}", b.shape()),
                ));
            }
        }
        Ok(ScalarHead {
            weight: Parameter::new(weight.contiguous()?.detach()),
            bias: bias.map(|b| Parameter::new(b.detach())),
        })
    }

    /// `score.weight` (and `score.bias` when present).
    pub fn named_parameters(&self) -> Vec<(String, Parameter)> {
        let mut out = vec![("score.weight".to_string(), self.weight.clone())];
        if let Some(b) = &self.bias {
            out.push(("score.bias".to_string(), b.clone()));
        }
        out
    }

    /// Values `[..]` of hidden states `[.., d]`: hidden · weightᵀ (+ bias), the transpose a view.
    /// Under mixed precision the weight is cast to the hidden states' dtype (a tracked cast,
    /// f32 gradients) and the values come back in f32.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let dtype = hidden.dtype();
        let mut y = hidden.matmul(&self.weight.tensor().to_dtype(dtype)?.t()?)?;
        if let Some(b) = &self.bias {
            y = y.add(&b.tensor().to_dtype(dtype)?)?;
        }
        Ok(y.squeeze(-1)?.to_dtype(DType::F32)?)
    }

    /// Moves the head's parameters to `device` (the handles stay the same; gradients are
    /// cleared).
    pub fn to_device(&self, device: Device) -> Result<()> {
        let params = self.named_parameters();
        let moved = params
            .iter()
            .map(|(_, p)| Ok(p.tensor().detach().to_device(device)?.detach()))
            .collect::<Result<Vec<Tensor>>>()?;
        for ((_, p), t) in params.iter().zip(&moved) {
            p.set(t)?;
            p.zero_grad();
        }
        Ok(())
    }

    /// An independent copy with the same values.
    pub fn deep_clone(&self) -> ScalarHead {
        ScalarHead {
            weight: Parameter::new(self.weight.tensor().detach()),
            bias: self
                .bias
                .as_ref()
                .map(|b| Parameter::new(b.tensor().detach())),
        }
    }
}

/// A trunk with a scalar head: the reward model and the value model.
pub struct ScalarModel {
    pub trunk: Gpt,
    pub head: ScalarHead,
}

impl ScalarModel {
    /// A trunk (the SFT model, say) with a fresh head: weight N(0, initializer_range²) drawn
    /// from `seed`, no bias.
    pub fn from_trunk(trunk: Gpt, seed: u64) -> ScalarModel {
        let c = trunk.config();
        let head = ScalarHead::new(c.n_embd, c.initializer_range, false, seed);
        ScalarModel { trunk, head }
    }

    /// Values `[B, T]` for ids `[B, T]` (one per position; a reward model reads the value at
    /// each sequence's last real token, see [`values_at`]).
    pub fn values(&self, ids: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        self.head
            .forward(&self.trunk.hidden_states(ids, dropout_seed)?)
    }

    /// Moves trunk and head to `device` (see [`Gpt::to_device`]).
    pub fn to_device(&mut self, device: Device) -> Result<()> {
        let from = self.trunk.device();
        self.trunk.to_device(device)?;
        if let Err(e) = self.head.to_device(device) {
            // Leave the model whole where it was (the head is still there).
            let _ = self.trunk.to_device(from);
            return Err(e);
        }
        Ok(())
    }

    /// The trunk's parameters (`transformer.*`) then the head's (`score.*`), as
    /// `GPT2ForSequenceClassification` names them.
    pub fn named_parameters(&self) -> Vec<(String, Parameter)> {
        let mut out = self.trunk.named_parameters();
        out.extend(self.head.named_parameters());
        out
    }

    pub fn deep_clone(&self) -> ScalarModel {
        ScalarModel {
            trunk: self.trunk.deep_clone(),
            head: self.head.deep_clone(),
        }
    }
}

/// Picks `values[b, positions[b]]` from `[B, T]` values: `[B]`, differentiable.
pub fn values_at(values: &Tensor, positions: &[usize]) -> Result<Tensor> {
    if values.rank() != 2 || values.shape()[0] != positions.len() {
        return Err(ModelError::invalid(
            "values_at",
            format!(
                "values {:?} and {} positions do not match",
                values.shape(),
                positions.len()
            ),
        ));
    }
    let t = values.shape()[1];
    if let Some(&p) = positions.iter().find(|&&p| p >= t) {
        return Err(ModelError::invalid(
            "values_at",
            format!("position {p} is outside a sequence of {t}"),
        ));
    }
    let idx = Tensor::from_vec(
        positions.iter().map(|&p| p as i64).collect::<Vec<_>>(),
        &[positions.len(), 1],
    )?
    .to_device(values.device())?;
    Ok(values.gather_last(&idx)?.squeeze(-1)?)
}
