//! [`GptConfig`]: the hyper-parameters of a GPT-2 model, read from and written to Hugging Face
//! `config.json` files (the keys `transformers.GPT2Config` uses), plus named presets.
//!
//! Reading is strict where a silent misreading would give a different model: the sizes must be
//! present and positive, `n_embd` must split evenly over the heads, and options that change the
//! maths (another activation, unscaled attention, untied embeddings ...) are errors rather than
//! being ignored. Keys this crate does not interpret are kept in [`GptConfig::extra`] and written
//! back, so a config survives a load/save round trip.

use crate::error::{ModelError, Result};
use crate::tokenizer::{ByteTokenizer, Gpt2Tokenizer, Tokenizer};
use serde_json::{Map, Value};
use std::path::Path;

/// Which tokenizer a model's ids come from. Stored in config.json under the key
/// `rlhf_tokenizer` (transformers keeps unknown keys as attributes and otherwise ignores them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenizerKind {
    /// 256 byte values plus special tokens ([`ByteTokenizer`]).
    Byte,
    /// GPT-2's BPE, r50k_base ([`Gpt2Tokenizer`]).
    Gpt2,
}

impl TokenizerKind {
    pub fn name(self) -> &'static str {
        match self {
            TokenizerKind::Byte => "byte",
            TokenizerKind::Gpt2 => "gpt2",
        }
    }

    pub fn parse(s: &str) -> Option<TokenizerKind> {
        match s {
            "byte" => Some(TokenizerKind::Byte),
            "gpt2" | "r50k_base" => Some(TokenizerKind::Gpt2),
            _ => None,
        }
    }

    /// The number of ids the tokenizer can produce (the smallest vocabulary that fits it).
    pub fn vocab_size(self) -> usize {
        match self {
            TokenizerKind::Byte => ByteTokenizer::VOCAB_SIZE,
            TokenizerKind::Gpt2 => Gpt2Tokenizer::VOCAB_SIZE,
        }
    }

    /// The end-of-text id.
    pub fn eos_token_id(self) -> u32 {
        match self {
            TokenizerKind::Byte => ByteTokenizer::EOS,
            TokenizerKind::Gpt2 => Gpt2Tokenizer::EOS,
        }
    }

    /// A tokenizer of this kind.
    pub fn build(self) -> Result<Box<dyn Tokenizer>> {
        Ok(match self {
            TokenizerKind::Byte => Box::new(ByteTokenizer::new()),
            TokenizerKind::Gpt2 => Box::new(Gpt2Tokenizer::new()?),
        })
    }
}

/// GPT-2 hyper-parameters, named as in Hugging Face's `GPT2Config`.
#[derive(Clone, Debug, PartialEq)]
pub struct GptConfig {
    pub vocab_size: usize,
    /// Context length: the number of learned positions.
    pub n_positions: usize,
    /// Model width d.
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// MLP width; `None` (`null` in JSON) means 4·n_embd.
    pub n_inner: Option<usize>,
    pub layer_norm_epsilon: f32,
    /// Dropout on each residual branch's output (attention and MLP projections).
    pub resid_pdrop: f32,
    /// Dropout on the summed token and position embeddings.
    pub embd_pdrop: f32,
    /// Dropout on the attention probabilities.
    pub attn_pdrop: f32,
    /// Standard deviation of the normal initialisation.
    pub initializer_range: f32,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    /// The tokenizer the ids come from; `None` for a checkpoint from elsewhere whose
    /// vocabulary is neither of ours (the model still loads and runs on ids).
    pub tokenizer: Option<TokenizerKind>,
    /// Keys this crate does not interpret (`architectures`, `task_specific_params`,
    /// `torch_dtype` ...), written back unchanged.
    pub extra: Map<String, Value>,
}

/// The names [`GptConfig::preset`] accepts.
pub const PRESETS: [&str; 6] = [
    "tiny",
    "small-cpu",
    "gpt2",
    "gpt2-medium",
    "gpt2-large",
    "gpt2-xl",
];

/// Activation names that mean GELU with the tanh approximation in transformers.
const TANH_GELUS: [&str; 3] = ["gelu_new", "gelu_pytorch_tanh", "gelu_fast"];

impl GptConfig {
    fn sized(
        tokenizer: TokenizerKind,
        n_positions: usize,
        n_embd: usize,
        n_layer: usize,
        n_head: usize,
        pdrop: f32,
    ) -> GptConfig {
        let eos = tokenizer.eos_token_id();
        let mut extra = Map::new();
        extra.insert(
            "architectures".to_string(),
            Value::Array(vec!["GPT2LMHeadModel".into()]),
        );
        GptConfig {
            vocab_size: tokenizer.vocab_size(),
            n_positions,
            n_embd,
            n_layer,
            n_head,
            n_inner: None,
            layer_norm_epsilon: 1e-5,
            resid_pdrop: pdrop,
            embd_pdrop: pdrop,
            attn_pdrop: pdrop,
            initializer_range: 0.02,
            bos_token_id: eos,
            eos_token_id: eos,
            tokenizer: Some(tokenizer),
            extra,
        }
    }

    /// A named preset (see [`PRESETS`]):
    ///
    /// - `tiny`: byte vocabulary, 2 layers, 4 heads, d = 32, context 64, no dropout (tests);
    /// - `small-cpu`: byte vocabulary, 4 layers, 4 heads, d = 256, context 256, no dropout;
    /// - `gpt2` (124M), `gpt2-medium` (355M), `gpt2-large` (774M), `gpt2-xl` (1.5B): OpenAI's
    ///   sizes with the BPE vocabulary, context 1024 and dropout 0.1, as transformers has them.
    pub fn preset(name: &str) -> Result<GptConfig> {
        use TokenizerKind::*;
        Ok(match name {
            "tiny" => GptConfig::sized(Byte, 64, 32, 2, 4, 0.0),
            "small-cpu" => GptConfig::sized(Byte, 256, 256, 4, 4, 0.0),
            "gpt2" => GptConfig::sized(Gpt2, 1024, 768, 12, 12, 0.1),
            "gpt2-medium" => GptConfig::sized(Gpt2, 1024, 1024, 24, 16, 0.1),
            "gpt2-large" => GptConfig::sized(Gpt2, 1024, 1280, 36, 20, 0.1),
            "gpt2-xl" => GptConfig::sized(Gpt2, 1024, 1600, 48, 25, 0.1),
            other => {
                return Err(ModelError::config(format!(
                    "unknown preset {other:?}; expected one of {}",
                    PRESETS.join(", ")
                )))
            }
        })
    }

    /// Width of each attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// Width of the MLP's hidden layer.
    pub fn mlp_width(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// Number of trainable values in the language model (the tied head counts once).
    pub fn num_parameters(&self) -> usize {
        let (d, f) = (self.n_embd, self.mlp_width());
        let block = 2 * d // ln_1
            + d * 3 * d + 3 * d // c_attn
            + d * d + d // attn.c_proj
            + 2 * d // ln_2
            + d * f + f // c_fc
            + f * d + d; // mlp.c_proj
        self.vocab_size * d + self.n_positions * d + self.n_layer * block + 2 * d
    }

    /// Checks that the config describes a model this crate can build.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(ModelError::config(format!("{key} must be positive, got 0")));
            }
        }
        if self.n_inner == Some(0) {
            return Err(ModelError::config(
                "n_inner must be positive or null, got 0",
            ));
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(ModelError::config(format!(
                "n_embd = {} is not divisible by n_head = {}",
                self.n_embd, self.n_head
            )));
        }
        for (key, p) in [
            ("resid_pdrop", self.resid_pdrop),
            ("embd_pdrop", self.embd_pdrop),
            ("attn_pdrop", self.attn_pdrop),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(ModelError::config(format!("{key} = {p} is not in [0, 1)")));
            }
        }
        if !(self.layer_norm_epsilon > 0.0 && self.layer_norm_epsilon.is_finite()) {
            return Err(ModelError::config(format!(
                "layer_norm_epsilon = {} must be positive and finite",
                self.layer_norm_epsilon
            )));
        }
        if !(self.initializer_range >= 0.0 && self.initializer_range.is_finite()) {
            return Err(ModelError::config(format!(
                "initializer_range = {} must be non-negative and finite",
                self.initializer_range
            )));
        }
        if let Some(kind) = self.tokenizer {
            let need = kind.vocab_size();
            if self.vocab_size < need {
                return Err(ModelError::config(format!(
                    "vocab_size = {} is smaller than the {} tokenizer's {need} ids",
                    self.vocab_size,
                    kind.name()
                )));
            }
        }
        // bos/eos ids are not checked against the vocabulary: transformers accepts configs
        // whose defaults (50256) exceed a small vocabulary, and generation validates the stop
        // token it is actually given.
        Ok(())
    }

    /// The model's tokenizer; an error when the config names none (a foreign checkpoint).
    pub fn build_tokenizer(&self) -> Result<Box<dyn Tokenizer>> {
        match self.tokenizer {
            Some(kind) => kind.build(),
            None => Err(ModelError::config(format!(
                "the config names no tokenizer (key rlhf_tokenizer) and its vocabulary of {} \
                 is not GPT-2's; set \"rlhf_tokenizer\": \"byte\" or \"gpt2\"",
                self.vocab_size
            ))),
        }
    }

    /// The config as a Hugging Face `config.json` object.
    pub fn to_json(&self) -> Value {
        let mut m = self.extra.clone();
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("model_type", "gpt2".into());
        put("vocab_size", self.vocab_size.into());
        put("n_positions", self.n_positions.into());
        put("n_embd", self.n_embd.into());
        put("n_layer", self.n_layer.into());
        put("n_head", self.n_head.into());
        put(
            "n_inner",
            self.n_inner.map(Value::from).unwrap_or(Value::Null),
        );
        put("activation_function", "gelu_new".into());
        put("layer_norm_epsilon", self.layer_norm_epsilon.into());
        put("resid_pdrop", self.resid_pdrop.into());
        put("embd_pdrop", self.embd_pdrop.into());
        put("attn_pdrop", self.attn_pdrop.into());
        put("initializer_range", self.initializer_range.into());
        put("bos_token_id", self.bos_token_id.into());
        put("eos_token_id", self.eos_token_id.into());
        put("scale_attn_weights", true.into());
        put("scale_attn_by_inverse_layer_idx", false.into());
        put("tie_word_embeddings", true.into());
        if let Some(kind) = self.tokenizer {
            put("rlhf_tokenizer", kind.name().into());
        }
        if !m.contains_key("architectures") {
            m.insert(
                "architectures".to_string(),
                Value::Array(vec!["GPT2LMHeadModel".into()]),
            );
        }
        Value::Object(m)
    }

    /// Pretty-printed `config.json` text.
    pub fn to_json_string(&self) -> String {
        // Serialising a Value built from plain numbers, strings and maps cannot fail.
        serde_json::to_string_pretty(&self.to_json()).unwrap_or_default() + "\n"
    }

    /// Reads a Hugging Face GPT-2 config object. Missing optional keys take transformers'
    /// defaults; the five sizes are required.
    pub fn from_json(value: &Value) -> Result<GptConfig> {
        let obj = value.as_object().ok_or_else(|| {
            ModelError::config(format!("expected a JSON object, got {}", json_kind(value)))
        })?;
        let mut extra = obj.clone();
        let mut take = |k: &str| extra.remove(k);

        if let Some(v) = take("model_type") {
            if v.as_str() != Some("gpt2") {
                return Err(ModelError::config(format!(
                    "model_type is {v}, only \"gpt2\" is supported"
                )));
            }
        }
        let vocab_size = req_usize("vocab_size", take("vocab_size"))?;
        let n_positions = req_usize("n_positions", take("n_positions"))?;
        let n_embd = req_usize("n_embd", take("n_embd"))?;
        let n_layer = req_usize("n_layer", take("n_layer"))?;
        let n_head = req_usize("n_head", take("n_head"))?;
        let n_inner = match take("n_inner") {
            None | Some(Value::Null) => None,
            Some(v) => Some(as_usize("n_inner", &v)?),
        };
        let activation = opt_str("activation_function", take("activation_function"))?
            .unwrap_or_else(|| "gelu_new".to_string());
        if !TANH_GELUS.contains(&activation.as_str()) {
            return Err(ModelError::config(format!(
                "activation_function {activation:?} is not supported; this model uses GELU with \
                 the tanh approximation ({})",
                TANH_GELUS.join(", ")
            )));
        }
        let require_bool = |key: &str, v: Option<Value>, want: bool| -> Result<()> {
            match v {
                None => Ok(()),
                Some(Value::Bool(b)) if b == want => Ok(()),
                Some(Value::Bool(b)) => Err(ModelError::config(format!(
                    "{key} = {b} is not supported (only {want})"
                ))),
                Some(other) => Err(ModelError::config(format!(
                    "{key}: expected a boolean, got {}",
                    json_kind(&other)
                ))),
            }
        };
        require_bool("scale_attn_weights", take("scale_attn_weights"), true)?;
        require_bool(
            "scale_attn_by_inverse_layer_idx",
            take("scale_attn_by_inverse_layer_idx"),
            false,
        )?;
        require_bool("tie_word_embeddings", take("tie_word_embeddings"), true)?;
        require_bool("add_cross_attention", take("add_cross_attention"), false)?;

        // Without our key, a vocabulary that holds GPT-2's ids is taken to be GPT-2's (every
        // GPT-2 checkpoint from transformers); anything else has an unknown tokenizer.
        let tokenizer = match opt_str("rlhf_tokenizer", take("rlhf_tokenizer"))? {
            None if vocab_size >= Gpt2Tokenizer::VOCAB_SIZE => Some(TokenizerKind::Gpt2),
            None => None,
            Some(s) => Some(TokenizerKind::parse(&s).ok_or_else(|| {
                ModelError::config(format!(
                    "rlhf_tokenizer {s:?} is unknown; expected \"byte\" or \"gpt2\""
                ))
            })?),
        };
        // transformers' default for both.
        let eos_default = tokenizer.map_or(Gpt2Tokenizer::EOS, TokenizerKind::eos_token_id);
        let cfg = GptConfig {
            vocab_size,
            n_positions,
            n_embd,
            n_layer,
            n_head,
            n_inner,
            layer_norm_epsilon: opt_f32("layer_norm_epsilon", take("layer_norm_epsilon"), 1e-5)?,
            resid_pdrop: opt_f32("resid_pdrop", take("resid_pdrop"), 0.1)?,
            embd_pdrop: opt_f32("embd_pdrop", take("embd_pdrop"), 0.1)?,
            attn_pdrop: opt_f32("attn_pdrop", take("attn_pdrop"), 0.1)?,
            initializer_range: opt_f32("initializer_range", take("initializer_range"), 0.02)?,
            bos_token_id: opt_id("bos_token_id", take("bos_token_id"), eos_default)?,
            eos_token_id: opt_id("eos_token_id", take("eos_token_id"), eos_default)?,
            tokenizer,
            extra,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses `config.json` text.
    pub fn from_json_str(text: &str) -> Result<GptConfig> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ModelError::config(format!("not valid JSON: {e}")))?;
        GptConfig::from_json(&value)
    }

    /// Reads a `config.json` file; errors name the file.
    pub fn load(path: &Path) -> Result<GptConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        GptConfig::from_json_str(&text).map_err(|e| e.in_file(path))
    }

    /// Writes `config.json` text to `path` (atomically: a temporary file renamed into place).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::checkpoint::write_atomic(path, self.to_json_string().as_bytes())
    }

    /// A preset name or a path to a config.json file.
    pub fn from_preset_or_file(spec: &str) -> Result<GptConfig> {
        if PRESETS.contains(&spec) {
            GptConfig::preset(spec)
        } else if Path::new(spec).exists() {
            GptConfig::load(Path::new(spec))
        } else {
            Err(ModelError::config(format!(
                "{spec:?} is neither a preset ({}) nor an existing config file",
                PRESETS.join(", ")
            )))
        }
    }
}

impl serde::Serialize for GptConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for GptConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        GptConfig::from_json(&v).map_err(serde::de::Error::custom)
    }
}

fn json_kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

fn as_usize(key: &str, v: &Value) -> Result<usize> {
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| {
            ModelError::config(format!(
                "{key}: expected a non-negative integer, got {}",
                json_kind(v)
            ))
        })
}

fn req_usize(key: &str, v: Option<Value>) -> Result<usize> {
    match v {
        None => Err(ModelError::config(format!("missing key {key:?}"))),
        Some(v) => as_usize(key, &v),
    }
}

fn opt_f32(key: &str, v: Option<Value>, default: f32) -> Result<f32> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_f64().map(|x| x as f32).ok_or_else(|| {
            ModelError::config(format!("{key}: expected a number, got {}", json_kind(&v)))
        }),
    }
}

fn opt_id(key: &str, v: Option<Value>, default: u32) -> Result<u32> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                ModelError::config(format!("{key}: expected a token id, got {}", json_kind(&v)))
            }),
    }
}

fn opt_str(key: &str, v: Option<Value>) -> Result<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ModelError::config(format!(
            "{key}: expected a string, got {}",
            json_kind(&other)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_round_trip() {
        for name in PRESETS {
            let c = GptConfig::preset(name).unwrap();
            c.validate().unwrap();
            let back = GptConfig::from_json_str(&c.to_json_string()).unwrap();
            assert_eq!(back, c, "{name}");
        }
        let small = GptConfig::preset("small-cpu").unwrap();
        assert_eq!(
            (small.n_layer, small.n_head, small.n_embd, small.n_positions),
            (4, 4, 256, 256)
        );
        // GPT-2 small has 124,439,808 parameters (transformers' count with the tied head).
        assert_eq!(
            GptConfig::preset("gpt2").unwrap().num_parameters(),
            124_439_808
        );
        assert!(GptConfig::preset("gpt3").is_err());
    }

    #[test]
    fn reads_a_transformers_config() {
        // The keys transformers 4.x writes for GPT2LMHeadModel.save_pretrained.
        let text = r#"{
          "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
          "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256,
          "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
          "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_inner": null, "n_layer": 12,
          "n_positions": 1024, "reorder_and_upcast_attn": false, "resid_pdrop": 0.1,
          "scale_attn_by_inverse_layer_idx": false, "scale_attn_weights": true,
          "summary_activation": null, "summary_first_dropout": 0.1, "summary_proj_to_labels": true,
          "summary_type": "cls_index", "summary_use_proj": true,
          "task_specific_params": {"text-generation": {"do_sample": true, "max_length": 50}},
          "torch_dtype": "float32", "transformers_version": "4.44.0", "use_cache": true,
          "vocab_size": 50257
        }"#;
        let c = GptConfig::from_json_str(text).unwrap();
        let mut want = GptConfig::preset("gpt2").unwrap();
        want.extra = c.extra.clone();
        assert_eq!(c, want);
        assert_eq!(c.tokenizer, Some(TokenizerKind::Gpt2));
        // Unknown keys survive a round trip.
        let back = c.to_json();
        assert_eq!(
            back["task_specific_params"]["text-generation"]["max_length"],
            50
        );
        assert_eq!(back["n_ctx"], 1024);
    }

    #[test]
    fn a_small_foreign_vocabulary_has_no_tokenizer() {
        let mut j = GptConfig::preset("tiny").unwrap().to_json();
        let o = j.as_object_mut().unwrap();
        o.remove("rlhf_tokenizer");
        o.insert("vocab_size".into(), 64.into());
        let c = GptConfig::from_json(&j).unwrap();
        assert_eq!(c.tokenizer, None);
        let msg = c.build_tokenizer().err().unwrap().to_string();
        assert!(msg.contains("names no tokenizer"), "{msg}");
        assert!(!c
            .to_json()
            .as_object()
            .unwrap()
            .contains_key("rlhf_tokenizer"));
    }

    #[test]
    fn errors_name_the_problem() {
        let base = GptConfig::preset("tiny").unwrap().to_json();
        let cases: Vec<(&str, Value, &str)> = vec![
            ("n_head", 5.into(), "not divisible by n_head"),
            (
                "n_embd",
                "32".into(),
                "n_embd: expected a non-negative integer, got string",
            ),
            ("n_layer", 0.into(), "n_layer must be positive"),
            ("vocab_size", 100.into(), "smaller than the byte tokenizer"),
            (
                "activation_function",
                "relu".into(),
                "activation_function \"relu\"",
            ),
            (
                "tie_word_embeddings",
                false.into(),
                "tie_word_embeddings = false",
            ),
            ("resid_pdrop", 1.5.into(), "resid_pdrop = 1.5"),
            ("model_type", "llama".into(), "only \"gpt2\""),
            ("rlhf_tokenizer", "sentencepiece".into(), "rlhf_tokenizer"),
        ];
        for (key, v, want) in cases {
            let mut j = base.clone();
            j[key] = v;
            let msg = GptConfig::from_json(&j).unwrap_err().to_string();
            assert!(msg.contains(want), "{key}: {msg}");
        }
        let mut j = base.clone();
        j.as_object_mut().unwrap().remove("n_positions");
        let msg = GptConfig::from_json(&j).unwrap_err().to_string();
        assert!(msg.contains("missing key \"n_positions\""), "{msg}");
        let msg = GptConfig::from_json_str("[1, 2]").unwrap_err().to_string();
        assert!(msg.contains("expected a JSON object"), "{msg}");
    }
}
