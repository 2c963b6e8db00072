//! The crate's error type. Bad input always names where it came from: the file and line of a
//! JSON Lines record, the byte offset of invalid UTF-8 in a text file.

use std::path::PathBuf;

/// Errors from reading and writing datasets and from invalid arguments.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An I/O failure on a named file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A record that could not be read; `line` is 1-based.
    #[error("{source_name}:{line}: {msg}")]
    Line {
        source_name: String,
        line: u64,
        msg: String,
    },
    /// Text that is not valid UTF-8; `offset` is the byte offset of the first bad byte.
    #[error("{source_name}: invalid UTF-8 at byte offset {offset}")]
    Utf8 { source_name: String, offset: u64 },
    /// A record that parsed but whose content is not usable for the asked operation (e.g. an
    /// HH-RLHF pair with no shared "\n\nAssistant:" turn to split at).
    #[error("{what}: {msg}")]
    Record { what: &'static str, msg: String },
    /// A caller passed an argument outside its domain.
    #[error("{op}: {msg}")]
    InvalidArgument { op: &'static str, msg: String },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        DataError::InvalidArgument {
            op,
            msg: msg.into(),
        }
    }
}

/// Shorthand used across the crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
