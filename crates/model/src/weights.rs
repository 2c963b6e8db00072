//! The GPT-2 parameter set as one generic structure, so the same code walks it whether it holds
//! trainable [`Parameter`](rlhf_tensor::Parameter)s (the model), plain [`Tensor`](rlhf_tensor::Tensor)s (one forward's weights, a gradient
//! check's perturbed copies, a loaded checkpoint) or anything else.
//!
//! Names and order are exactly those of Hugging Face's `GPT2LMHeadModel.named_parameters()`:
//! `transformer.wte.weight`, `transformer.wpe.weight`, then for each block `ln_1`, `attn.c_attn`,
//! `attn.c_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj` (weight then bias), then `transformer.ln_f`.
//! Linear weights use transformers' Conv1D layout `[in, out]` (y = x·W + b): no transposes when
//! moving checkpoints between the two.

use crate::config::GptConfig;

/// One transformer block's weights.
#[derive(Clone, Debug)]
pub struct BlockWeights<T> {
    pub ln_1_weight: T,
    pub ln_1_bias: T,
    /// Fused query/key/value projection, `[d, 3d]`.
    pub c_attn_weight: T,
    pub c_attn_bias: T,
    /// Attention output projection, `[d, d]`.
    pub attn_c_proj_weight: T,
    pub attn_c_proj_bias: T,
    pub ln_2_weight: T,
    pub ln_2_bias: T,
    /// MLP up-projection, `[d, 4d]`.
    pub c_fc_weight: T,
    pub c_fc_bias: T,
    /// MLP down-projection, `[4d, d]`.
    pub mlp_c_proj_weight: T,
    pub mlp_c_proj_bias: T,
}

/// The whole trunk's weights (the LM head is tied to `wte`).
#[derive(Clone, Debug)]
pub struct GptWeights<T> {
    /// Token embedding `[vocab, d]`, also the LM head.
    pub wte: T,
    /// Position embedding `[n_positions, d]`.
    pub wpe: T,
    pub h: Vec<BlockWeights<T>>,
    pub ln_f_weight: T,
    pub ln_f_bias: T,
}

/// The kind of a parameter, which decides its initialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    Embedding,
    /// A linear weight on the residual path's output (`c_proj`): GPT-2 scales its init by
    /// 1/√(2·n_layer) so the residual stream's variance does not grow with depth.
    ResidualProjection,
    Linear,
    Bias,
    NormWeight,
    NormBias,
}

const BLOCK_FIELDS: [(&str, ParamKind); 12] = [
    ("ln_1.weight", ParamKind::NormWeight),
    ("ln_1.bias", ParamKind::NormBias),
    ("attn.c_attn.weight", ParamKind::Linear),
    ("attn.c_attn.bias", ParamKind::Bias),
    ("attn.c_proj.weight", ParamKind::ResidualProjection),
    ("attn.c_proj.bias", ParamKind::Bias),
    ("ln_2.weight", ParamKind::NormWeight),
    ("ln_2.bias", ParamKind::NormBias),
    ("mlp.c_fc.weight", ParamKind::Linear),
    ("mlp.c_fc.bias", ParamKind::Bias),
    ("mlp.c_proj.weight", ParamKind::ResidualProjection),
    ("mlp.c_proj.bias", ParamKind::Bias),
];

impl<T> BlockWeights<T> {
    fn fields(&self) -> [&T; 12] {
        [
            &self.ln_1_weight,
            &self.ln_1_bias,
            &self.c_attn_weight,
            &self.c_attn_bias,
            &self.attn_c_proj_weight,
            &self.attn_c_proj_bias,
            &self.ln_2_weight,
            &self.ln_2_bias,
            &self.c_fc_weight,
            &self.c_fc_bias,
            &self.mlp_c_proj_weight,
            &self.mlp_c_proj_bias,
        ]
    }

    fn fields_mut(&mut self) -> [&mut T; 12] {
        [
            &mut self.ln_1_weight,
            &mut self.ln_1_bias,
            &mut self.c_attn_weight,
            &mut self.c_attn_bias,
            &mut self.attn_c_proj_weight,
            &mut self.attn_c_proj_bias,
            &mut self.ln_2_weight,
            &mut self.ln_2_bias,
            &mut self.c_fc_weight,
            &mut self.c_fc_bias,
            &mut self.mlp_c_proj_weight,
            &mut self.mlp_c_proj_bias,
        ]
    }

    fn from_fields(mut f: impl FnMut(usize) -> T) -> Self {
        BlockWeights {
            ln_1_weight: f(0),
            ln_1_bias: f(1),
            c_attn_weight: f(2),
            c_attn_bias: f(3),
            attn_c_proj_weight: f(4),
            attn_c_proj_bias: f(5),
            ln_2_weight: f(6),
            ln_2_bias: f(7),
            c_fc_weight: f(8),
            c_fc_bias: f(9),
            mlp_c_proj_weight: f(10),
            mlp_c_proj_bias: f(11),
        }
    }
}

/// One parameter's name, shape and kind, in HF order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
}

impl<T> GptWeights<T> {
    /// Builds the structure by calling `f` on every parameter's spec, in HF order.
    pub fn build<E>(
        config: &GptConfig,
        mut f: impl FnMut(&ParamSpec) -> Result<T, E>,
    ) -> Result<GptWeights<T>, E> {
        let specs = param_specs(config);
        let mut it = specs.iter();
        let mut next = || it.next().expect("param_specs lists every parameter");
        let wte = f(next())?;
        let wpe = f(next())?;
        let mut h = Vec::with_capacity(config.n_layer);
        for _ in 0..config.n_layer {
            let mut vals: Vec<Option<T>> = Vec::with_capacity(12);
            for _ in 0..12 {
                vals.push(Some(f(next())?));
            }
            h.push(BlockWeights::from_fields(|i| {
                vals[i].take().expect("each field is taken once")
            }));
        }
        let ln_f_weight = f(next())?;
        let ln_f_bias = f(next())?;
        Ok(GptWeights {
            wte,
            wpe,
            h,
            ln_f_weight,
            ln_f_bias,
        })
    }

    /// Every parameter with its HF name, in HF order.
    pub fn named(&self) -> Vec<(String, &T)> {
        let mut out = vec![
            ("transformer.wte.weight".to_string(), &self.wte),
            ("transformer.wpe.weight".to_string(), &self.wpe),
        ];
        for (i, b) in self.h.iter().enumerate() {
            for ((suffix, _), t) in BLOCK_FIELDS.iter().zip(b.fields()) {
                out.push((format!("transformer.h.{i}.{suffix}"), t));
            }
        }
        out.push(("transformer.ln_f.weight".to_string(), &self.ln_f_weight));
        out.push(("transformer.ln_f.bias".to_string(), &self.ln_f_bias));
        out
    }

    /// As [`GptWeights::named`], mutably.
    pub fn named_mut(&mut self) -> Vec<(String, &mut T)> {
        let mut out = vec![
            ("transformer.wte.weight".to_string(), &mut self.wte),
            ("transformer.wpe.weight".to_string(), &mut self.wpe),
        ];
        for (i, b) in self.h.iter_mut().enumerate() {
            for ((suffix, _), t) in BLOCK_FIELDS.iter().zip(b.fields_mut()) {
                out.push((format!("transformer.h.{i}.{suffix}"), t));
            }
        }
        out.push(("transformer.ln_f.weight".to_string(), &mut self.ln_f_weight));
        out.push(("transformer.ln_f.bias".to_string(), &mut self.ln_f_bias));
        out
    }

    /// The parameter called `name`, mutably.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut T> {
        self.named_mut()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
    }

    /// The same structure with `f` applied to every parameter.
    pub fn map<U>(&self, mut f: impl FnMut(&T) -> U) -> GptWeights<U> {
        GptWeights {
            wte: f(&self.wte),
            wpe: f(&self.wpe),
            h: self
                .h
                .iter()
                .map(|b| {
                    let fields = b.fields();
                    let mapped: Vec<U> = fields.into_iter().map(&mut f).collect();
                    let mut mapped: Vec<Option<U>> = mapped.into_iter().map(Some).collect();
                    BlockWeights::from_fields(|i| mapped[i].take().expect("taken once"))
                })
                .collect(),
            ln_f_weight: f(&self.ln_f_weight),
            ln_f_bias: f(&self.ln_f_bias),
        }
    }
}

/// Names, shapes and kinds of every parameter of a model with `config`, in HF order.
pub fn param_specs(config: &GptConfig) -> Vec<ParamSpec> {
    let (v, p, d, f) = (
        config.vocab_size,
        config.n_positions,
        config.n_embd,
        config.mlp_width(),
    );
    let spec = |name: String, shape: Vec<usize>, kind| ParamSpec { name, shape, kind };
    let mut out = vec![
        spec(
            "transformer.wte.weight".into(),
            vec![v, d],
            ParamKind::Embedding,
        ),
        spec(
            "transformer.wpe.weight".into(),
            vec![p, d],
            ParamKind::Embedding,
        ),
    ];
    for i in 0..config.n_layer {
        let shapes: [Vec<usize>; 12] = [
            vec![d],
            vec![d],
            vec![d, 3 * d],
            vec![3 * d],
            vec![d, d],
            vec![d],
            vec![d],
            vec![d],
            vec![d, f],
            vec![f],
            vec![f, d],
            vec![d],
        ];
        for ((suffix, kind), shape) in BLOCK_FIELDS.iter().zip(shapes) {
            out.push(spec(format!("transformer.h.{i}.{suffix}"), shape, *kind));
        }
    }
    out.push(spec(
        "transformer.ln_f.weight".into(),
        vec![d],
        ParamKind::NormWeight,
    ));
    out.push(spec(
        "transformer.ln_f.bias".into(),
        vec![d],
        ParamKind::NormBias,
    ));
    out
}
