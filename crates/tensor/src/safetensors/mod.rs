//! Safetensors files at the byte level: parsing and validating the header, memory-mapping a file
//! for reading, and writing a file atomically.
//!
//! # The format
//!
//! ```text
//! [8 bytes: N, little-endian u64] [N bytes: UTF-8 JSON header] [data section: raw little-endian tensor bytes]
//! ```
//!
//! The header is a JSON object mapping each tensor name to
//! `{"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}`, with offsets relative to the
//! first byte of the data section, plus an optional `"__metadata__"` object of string → string.
//!
//! # What the reader accepts
//!
//! [`parse_header`] is strict, and as strict as the reference implementation (the Python
//! `safetensors` package's Rust core) on layout: the tensors, sorted by offset, must tile the data
//! section exactly — no overlaps, no gaps, no trailing bytes — so every byte of the file is either
//! the length field, the header or exactly one tensor's data. On top of that it rejects what the
//! reference would silently accept: duplicate keys anywhere in the header (JSON parsers normally
//! keep the last one), unknown keys in a tensor entry, and dtypes this engine does not support
//! (F64, I8, ...; see [`DType`]). Every rejection is an [`Error::Safetensors`] naming the file and
//! the problem (the tensor, its offsets, the sizes involved); malformed input never panics and is
//! never read out of bounds.
//!
//! # What the writer produces
//!
//! [`write()`] and [`serialize`] lay out tensors the way the reference writer does: sorted by dtype
//! (widest element first: I64, F32, U32, I32, BF16, F16, U8), then by name, packed without gaps,
//! and the JSON header padded with spaces so the data section starts at a multiple of 8 bytes.
//! Together that puts every tensor at a file offset that is a multiple of its element size, so a
//! page-aligned mapping of the file can be viewed as `&[f32]` etc. without copying. (Aligning every
//! tensor to 8 bytes would need gaps, which readers following the reference reject.) For the same
//! tensors and metadata the output has the same header entries, offsets and data bytes as the
//! Python `safetensors` package's; only the order of several metadata keys may differ, since the
//! reference keeps them in a hash map and this writer in a `BTreeMap`.

mod mapped;
mod parse;
mod tensors;
mod write;

use std::collections::BTreeMap;

pub use mapped::MappedFile;
pub use parse::{parse_header, MAX_HEADER_LEN};
pub use tensors::{load, save, tensor_from, Loaded};
pub use write::{serialize, write};

use crate::DType;
#[cfg(doc)]
use crate::Error;

/// One tensor's entry in a parsed header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the first data byte in the file (data section start + relative offset).
    pub begin: usize,
    /// Absolute byte offset one past the last data byte in the file.
    pub end: usize,
}

impl TensorInfo {
    /// Number of elements (product of the shape; 1 for a 0-dimensional tensor).
    /// Cannot overflow: [`parse_header`] checked it.
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of data bytes, `end - begin`.
    pub fn byte_len(&self) -> usize {
        self.end - self.begin
    }
}

/// A parsed and validated header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The tensors in file order (ascending `begin`; equal `begin`s, which only empty tensors can
    /// share, in header order).
    pub tensors: Vec<TensorInfo>,
    /// The `"__metadata__"` object, if the header has one (possibly empty).
    pub metadata: Option<BTreeMap<String, String>>,
    /// Absolute offset of the data section: 8 + header length.
    pub data_start: usize,
}

/// A tensor to write: name, dtype, shape and its raw little-endian bytes (row-major, contiguous).
#[derive(Clone, Copy, Debug)]
pub struct RawTensor<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// Key of the optional metadata object in the header; not allowed as a tensor name.
pub const METADATA_KEY: &str = "__metadata__";

/// Number of elements of `shape`, `None` on overflow.
fn checked_num_elements(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}
