//! Reading: a safetensors file mapped into memory, its header validated once at open.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::{parse_header, Header, TensorInfo};
use crate::{Error, Result};

/// A memory-mapped safetensors file with a validated header.
///
/// Cheap to clone (an `Arc` inside); tensor bytes borrow the mapping, which lives as long as any
/// clone. The mapping starts on a page boundary, so a tensor at file offset `begin` sits at a
/// memory address with the same alignment as `begin` (files from [`super::write()`] put every tensor
/// at a multiple of its element size).
#[derive(Clone)]
pub struct MappedFile {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    mmap: Mmap,
    header: Header,
    /// Tensor name → index into `header.tensors`.
    by_name: HashMap<String, usize>,
}

impl MappedFile {
    /// Opens and maps `path` and validates its header (see [`parse_header`]).
    pub fn open(path: &Path) -> Result<Self> {
        let io_err = |source| Error::Io {
            path: path.to_path_buf(),
            err: source,
        };
        let file = File::open(path).map_err(io_err)?;
        // SAFETY: mapping a file is sound as long as no one modifies or truncates it while the
        // mapping lives; the OS cannot enforce that for other processes. We map read-only and never
        // write through it; checkpoints written by this crate are replaced by rename (a new inode),
        // which leaves existing mappings intact. If another process truncates the file in place
        // anyway, touching the lost pages raises SIGBUS, and in-place writes show through as
        // changed bytes; both are the usual, accepted caveat of memory-mapped reading. The bounds
        // checks of `parse_header` use the length at mapping time and never read past it.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        let header = parse_header(&mmap, path)?;
        let by_name = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(MappedFile {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                mmap,
                header,
                by_name,
            }),
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.inner.header
    }

    /// The tensors in file order (same as `header().tensors`).
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.inner.header.tensors
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.inner.mmap
    }

    /// The data bytes of `info`, a tensor of this file's header.
    ///
    /// # Panics
    /// If `info`'s offsets lie outside this file, which can only happen for a `TensorInfo` taken
    /// from another file's header (a caller bug; a header of this file is validated).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        self.bytes().get(info.begin..info.end).unwrap_or_else(|| {
            panic!(
                "tensor_bytes: tensor {:?} [{}, {}) lies outside {} ({} bytes); \
                 was its TensorInfo taken from another file?",
                info.name,
                info.begin,
                info.end,
                self.path().display(),
                self.bytes().len()
            )
        })
    }

    /// The header entry of the tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        let &i = self.inner.by_name.get(name)?;
        Some(&self.inner.header.tensors[i])
    }
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile")
            .field("path", &self.inner.path)
            .field("len", &self.inner.mmap.len())
            .field("tensors", &self.inner.header.tensors.len())
            .finish()
    }
}
