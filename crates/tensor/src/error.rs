//! The engine's error type: every variant carries the operation and the offending values, so a
//! reader knows what to change without a debugger.

use std::path::PathBuf;

/// Errors from tensor construction, ops, autograd and file I/O.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: shapes {lhs:?} and {rhs:?} are incompatible")]
    ShapeMismatch {
        op: &'static str,
        lhs: Vec<usize>,
        rhs: Vec<usize>,
    },
    #[error("{op}: dimension {dim} out of range for shape {shape:?}")]
    DimOutOfRange {
        op: &'static str,
        dim: isize,
        shape: Vec<usize>,
    },
    #[error("{op}: expected dtype {expected}, got {got}")]
    DTypeMismatch {
        op: &'static str,
        expected: crate::DType,
        got: crate::DType,
    },
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },
    #[error("safetensors {path}: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    /// An I/O failure on `path`. The OS error is part of the message (not a separate source),
    /// so chained error reports print it once.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// The CUDA backend: no driver library or device, an NVRTC compile error, a failed driver
    /// call. Asking for a GPU where there is none is this error, never a panic.
    #[error("{op}: {msg}")]
    Cuda { op: &'static str, msg: String },
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An `Invalid` error for `op` with a formatted message.
    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Invalid {
            op,
            msg: msg.into(),
        }
    }

    /// A `Cuda` error for `op` with a formatted message.
    pub fn cuda(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Cuda {
            op,
            msg: msg.into(),
        }
    }
}
