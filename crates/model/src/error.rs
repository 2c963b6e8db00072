//! The model crate's error type. Every variant says where the problem is (the file, the
//! parameter, the argument) and what it is, so the message alone tells a user what to fix.

use std::path::PathBuf;

/// Errors from configs, models, tokenizers, generation, training and checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A config that is malformed or describes a model this crate cannot build. `path` is the
    /// config file when the config came from one.
    #[error("{}{msg}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Config { path: Option<PathBuf>, msg: String },
    /// A bad argument to a model, generation or training call (ids out of range, a prompt longer
    /// than the context, mismatched batch shapes ...).
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },
    /// Text or ids a tokenizer cannot handle.
    #[error("tokenizer {tokenizer}: {msg}")]
    Tokenizer { tokenizer: String, msg: String },
    /// A checkpoint file that is missing, malformed or does not fit the model.
    #[error("checkpoint {}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An error from the tensor engine (shapes, dtypes, safetensors parsing ...).
    #[error(transparent)]
    Tensor(#[from] rlhf_tensor::Error),
}

/// Shorthand used across the crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        ModelError::Invalid {
            op,
            msg: msg.into(),
        }
    }

    pub(crate) fn config(msg: impl Into<String>) -> Self {
        ModelError::Config {
            path: None,
            msg: msg.into(),
        }
    }

    /// Attaches a file path to a config error that has none yet.
    pub(crate) fn in_file(self, file: &std::path::Path) -> Self {
        match self {
            ModelError::Config { path: None, msg } => ModelError::Config {
                path: Some(file.to_path_buf()),
                msg,
            },
            other => other,
        }
    }
}
