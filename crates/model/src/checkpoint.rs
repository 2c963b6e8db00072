//! Checkpoints: a directory that `transformers` can read and write, plus our training state.
//!
//! ```text
//! DIR/config.json                   GPT2Config keys (GptConfig::to_json)
//! DIR/model.safetensors             weights, HF names and layouts (Conv1D [in, out]), f32,
//!                                   metadata {"format": "pt"} as transformers requires
//! DIR/training_state.safetensors    optional: AdamW moments ("<param>.exp_avg",
//!                                   "<param>.exp_avg_sq") and, in the metadata key
//!                                   "rlhf_training_state", JSON with the step, the data
//!                                   position, an RNG state and free-form extras
//! ```
//!
//! A language model saves as `GPT2LMHeadModel` (the tied `lm_head.weight` is not stored, as
//! transformers does not store it either); a [`ScalarModel`] as `GPT2ForSequenceClassification`
//! with one label (`score.weight` `[1, d]`).
//!
//! A model on a GPU saves like any other: every tensor is copied to the host first
//! (`safetensors::save` does), so the files never depend on where the model ran. Loading gives
//! a model on the CPU; move it with [`Gpt::to_device`] before building its trainer, then
//! [`restore_trainer`] hands the optimiser the (host) moments from the file.
//!
//! [`save_checkpoint`] writes the whole directory under a temporary name and swaps it into
//! place, so a crash never leaves weights from one step beside a training state from another.
//! Every error names the file and the problem.

use crate::config::GptConfig;
use crate::error::{ModelError, Result};
use crate::gpt::Gpt;
use crate::head::{ScalarHead, ScalarModel};
use crate::train::{DataPosition, Trainer};
use rlhf_tensor::optim::AdamWState;
use rlhf_tensor::{safetensors, DType, Tensor};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub const CONFIG_FILE: &str = "config.json";
pub const MODEL_FILE: &str = "model.safetensors";
pub const TRAINING_STATE_FILE: &str = "training_state.safetensors";
/// Metadata key of the training state's JSON.
pub const TRAINING_STATE_KEY: &str = "rlhf_training_state";

/// Everything a resumed run needs besides the weights.
pub struct TrainingState {
    /// The optimiser's step count and moments.
    pub optimizer: AdamWState,
    /// Where the data order was.
    pub data: Option<DataPosition>,
    /// A generator's state ([`rlhf_tensor::Rng::state`]), e.g. for sampling during training.
    pub rng: Option<[u64; 4]>,
    /// Anything else the caller wants back (run settings, best score so far ...).
    pub extra: Value,
}

impl std::fmt::Debug for TrainingState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainingState")
            .field("step", &self.optimizer.step)
            .field("moments", &self.optimizer.moments.len())
            .field("data", &self.data)
            .field("rng", &self.rng)
            .field("extra", &self.extra)
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError {
    let path = path.to_path_buf();
    move |source| ModelError::Io { path, source }
}

fn bad(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, flushed and
/// fsynced, then renamed over `path`. Readers see the old file or the whole new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| bad(path, "path has no file name"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        unique()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn unique() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

fn format_pt() -> BTreeMap<String, String> {
    // transformers refuses safetensors files whose metadata lacks format = "pt".
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}

fn write_weights(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Ok(safetensors::save(path, &refs, Some(&format_pt()))?)
}

/// Writes `config.json` and `model.safetensors` of a language model into `dir` (created if
/// needed), each file atomically.
pub fn save_model(dir: &Path, model: &Gpt) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    model.config().save(&dir.join(CONFIG_FILE))?;
    write_weights(&dir.join(MODEL_FILE), &model.named_tensors())
}

/// Writes a reward or value model as `GPT2ForSequenceClassification` with one label.
pub fn save_scalar_model(dir: &Path, model: &ScalarModel) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut config = model.trunk.config().clone();
    let x = &mut config.extra;
    x.insert(
        "architectures".into(),
        json!(["GPT2ForSequenceClassification"]),
    );
    x.insert("id2label".into(), json!({"0": "LABEL_0"}));
    x.insert("label2id".into(), json!({"LABEL_0": 0}));
    // The batched sequence-classification forward in transformers needs a pad id to find each
    // sequence's last token.
    if x.get("pad_token_id").is_none_or(Value::is_null) {
        x.insert("pad_token_id".into(), json!(config.eos_token_id));
    }
    config.save(&dir.join(CONFIG_FILE))?;
    let mut tensors = model.trunk.named_tensors();
    tensors.extend(
        model
            .head
            .named_parameters()
            .into_iter()
            .map(|(n, p)| (n, p.tensor().detach())),
    );
    write_weights(&dir.join(MODEL_FILE), &tensors)
}

/// The config and named tensors of a checkpoint directory.
fn read_dir(dir: &Path) -> Result<(GptConfig, HashMap<String, Tensor>, PathBuf)> {
    if !dir.is_dir() {
        return Err(bad(dir, "not a directory"));
    }
    let config = GptConfig::load(&dir.join(CONFIG_FILE))?;
    let path = dir.join(MODEL_FILE);
    if !path.is_file() {
        return Err(bad(
            &path,
            "missing (a checkpoint directory needs model.safetensors)",
        ));
    }
    let loaded = safetensors::load(&path)?;
    Ok((config, loaded.tensors.into_iter().collect(), path))
}

/// Loads a language model from a checkpoint directory: ours, or one that transformers'
/// `GPT2LMHeadModel.save_pretrained` wrote (f32, bf16 or f16 weights). A reward or value
/// model's directory loads too, its `score.*` head ignored.
pub fn load_model(dir: &Path) -> Result<Gpt> {
    let (config, mut tensors, path) = read_dir(dir)?;
    tensors.retain(|n, _| !n.starts_with("score."));
    Gpt::from_named_tensors(config, tensors).map_err(|e| bad(&path, e.to_string()))
}

/// Loads a reward or value model (trunk plus `score.weight`, optional `score.bias`).
pub fn load_scalar_model(dir: &Path) -> Result<ScalarModel> {
    let (config, mut tensors, path) = read_dir(dir)?;
    let weight = tensors.remove("score.weight").ok_or_else(|| {
        bad(
            &path,
            "no score.weight: a language-model checkpoint has no scalar head (start one with \
             ScalarModel::from_trunk)",
        )
    })?;
    let bias = tensors.remove("score.bias");
    let f32 = |t: Tensor| -> Result<Tensor> {
        Ok(if t.dtype() == DType::F32 {
            t
        } else {
            t.to_dtype(DType::F32)?
        })
    };
    let d = config.n_embd;
    if weight.shape() != [1, d] {
        return Err(bad(
            &path,
            format!(
                "score.weight has shape {:?}, expected [1, {d}]",
                weight.shape()
            ),
        ));
    }
    let head = ScalarHead::from_tensors(f32(weight)?, bias.map(f32).transpose()?)
        .map_err(|e| bad(&path, e.to_string()))?;
    let trunk = Gpt::from_named_tensors(config, tensors).map_err(|e| bad(&path, e.to_string()))?;
    Ok(ScalarModel { trunk, head })
}

/// Writes the training state file into `dir` (atomically).
pub fn save_training_state(dir: &Path, state: &TrainingState) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(2 * state.optimizer.moments.len());
    for (name, m, v) in &state.optimizer.moments {
        tensors.push((format!("{name}.exp_avg"), m.clone()));
        tensors.push((format!("{name}.exp_avg_sq"), v.clone()));
    }
    // JSON numbers are often read as doubles, so 64-bit values travel as decimal strings.
    let info = json!({
        "version": 1,
        "step": state.optimizer.step.to_string(),
        "params": state.optimizer.moments.iter().map(|(n, _, _)| n.clone()).collect::<Vec<_>>(),
        "data": state.data.map(|d| json!({"epoch": d.epoch.to_string(), "pos": d.pos})),
        "rng": state.rng.map(|s| s.iter().map(u64::to_string).collect::<Vec<_>>()),
        "extra": state.extra,
    });
    let mut meta = BTreeMap::new();
    meta.insert(TRAINING_STATE_KEY.to_string(), info.to_string());
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Ok(safetensors::save(
        &dir.join(TRAINING_STATE_FILE),
        &refs,
        Some(&meta),
    )?)
}

fn parse_u64(path: &Path, what: &str, v: &Value) -> Result<u64> {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_u64())
        .ok_or_else(|| {
            bad(
                path,
                format!("{what}: expected an unsigned integer, got {v}"),
            )
        })
}

/// Reads the training state file of `dir`; `None` when the directory has none (weights only).
pub fn load_training_state(dir: &Path) -> Result<Option<TrainingState>> {
    let path = dir.join(TRAINING_STATE_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let loaded = safetensors::load(&path)?;
    let text = loaded
        .metadata
        .as_ref()
        .and_then(|m| m.get(TRAINING_STATE_KEY))
        .ok_or_else(|| {
            bad(
                &path,
                format!("no {TRAINING_STATE_KEY:?} entry in the metadata"),
            )
        })?;
    let info: Value = serde_json::from_str(text).map_err(|e| {
        bad(
            &path,
            format!("{TRAINING_STATE_KEY} is not valid JSON: {e}"),
        )
    })?;
    if info["version"] != 1 {
        return Err(bad(
            &path,
            format!("unsupported training state version {}", info["version"]),
        ));
    }
    let step = parse_u64(&path, "step", &info["step"])?;
    let names = info["params"]
        .as_array()
        .ok_or_else(|| bad(&path, "params: expected a list of parameter names"))?;
    let mut by_name: HashMap<String, Tensor> = loaded.tensors.into_iter().collect();
    let mut moments = Vec::with_capacity(names.len());
    for n in names {
        let n = n
            .as_str()
            .ok_or_else(|| bad(&path, format!("params: {n} is not a name")))?;
        let mut take = |suffix: &str| -> Result<Tensor> {
            let key = format!("{n}.{suffix}");
            let t = by_name
                .remove(&key)
                .ok_or_else(|| bad(&path, format!("missing tensor {key}")))?;
            if t.dtype() != DType::F32 {
                return Err(bad(
                    &path,
                    format!("{key} has dtype {}, expected f32", t.dtype()),
                ));
            }
            Ok(t)
        };
        let (m, v) = (take("exp_avg")?, take("exp_avg_sq")?);
        if m.shape() != v.shape() {
            return Err(bad(
                &path,
                format!("{n}: moments of shapes {:?} and {:?}", m.shape(), v.shape()),
            ));
        }
        moments.push((n.to_string(), m, v));
    }
    if !by_name.is_empty() {
        let mut extra: Vec<_> = by_name.into_keys().collect();
        extra.sort();
        return Err(bad(
            &path,
            format!("unexpected tensors: {}", extra.join(", ")),
        ));
    }
    let data = match &info["data"] {
        Value::Null => None,
        d => Some(DataPosition {
            epoch: parse_u64(&path, "data.epoch", &d["epoch"])?,
            pos: parse_u64(&path, "data.pos", &d["pos"])? as usize,
        }),
    };
    let rng = match &info["rng"] {
        Value::Null => None,
        Value::Array(words) if words.len() == 4 => {
            let mut s = [0u64; 4];
            for (slot, w) in s.iter_mut().zip(words) {
                *slot = parse_u64(&path, "rng", w)?;
            }
            Some(s)
        }
        other => return Err(bad(&path, format!("rng: expected 4 words, got {other}"))),
    };
    Ok(Some(TrainingState {
        optimizer: AdamWState { step, moments },
        data,
        rng,
        extra: info["extra"].clone(),
    }))
}

/// Loads `dir`'s training state into `trainer` (names and shapes must match its parameters)
/// and returns it; an error naming the file when the directory has none.
pub fn restore_trainer(dir: &Path, trainer: &mut Trainer) -> Result<TrainingState> {
    let path = dir.join(TRAINING_STATE_FILE);
    let state = load_training_state(dir)?.ok_or_else(|| {
        bad(
            &path,
            "missing: this checkpoint has no training state to resume",
        )
    })?;
    trainer
        .load_optimizer_state(&state.optimizer)
        .map_err(|e| bad(&path, e.to_string()))?;
    Ok(state)
}

/// Writes a complete checkpoint (config, weights, and the training state when given) to `dir`
/// as one unit: everything goes into a fresh sibling directory, which then replaces `dir` by
/// renames. After a crash `dir` is either the previous checkpoint or the new one (a stray
/// `.NAME.*.tmp` or `.NAME.*.old` sibling may be left behind, the latter holding the previous
/// checkpoint if the crash fell between the two renames).
pub fn save_checkpoint(dir: &Path, model: &Gpt, state: Option<&TrainingState>) -> Result<()> {
    save_checkpoint_with(dir, |tmp| {
        save_model(tmp, model)?;
        state.map_or(Ok(()), |s| save_training_state(tmp, s))
    })
}

/// As [`save_checkpoint`] for a reward or value model.
pub fn save_scalar_checkpoint(
    dir: &Path,
    model: &ScalarModel,
    state: Option<&TrainingState>,
) -> Result<()> {
    save_checkpoint_with(dir, |tmp| {
        save_scalar_model(tmp, model)?;
        state.map_or(Ok(()), |s| save_training_state(tmp, s))
    })
}

fn save_checkpoint_with(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = dir
        .file_name()
        .ok_or_else(|| bad(dir, "path has no directory name"))?
        .to_string_lossy()
        .into_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let tag = format!("{}.{}", std::process::id(), unique());
    let tmp = parent.join(format!(".{name}.{tag}.tmp"));
    let old = parent.join(format!(".{name}.{tag}.old"));
    let result = (|| {
        std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        write(&tmp)?;
        let had_old = dir.exists();
        if had_old {
            std::fs::rename(dir, &old).map_err(io_err(dir))?;
        }
        if let Err(e) = std::fs::rename(&tmp, dir) {
            if had_old {
                // Put the previous checkpoint back rather than leave no checkpoint at all.
                let _ = std::fs::rename(&old, dir);
            }
            return Err(io_err(dir)(e));
        }
        // Make the renames durable before the old copy goes.
        if let Ok(d) = std::fs::File::open(&parent) {
            let _ = d.sync_all();
        }
        if had_old {
            std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
