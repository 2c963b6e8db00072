//! Writing: layout (order, offsets, padded header) and the atomic file write.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{checked_num_elements, RawTensor, METADATA_KEY};
use crate::{DType, Error, Result};

/// Serializes `tensors` and `metadata` into an in-memory safetensors file (same bytes as [`write()`]
/// puts on disk). Meant for small files and tests; checkpoints go through [`write()`], which streams.
pub fn serialize(
    tensors: &[RawTensor<'_>],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<Vec<u8>> {
    let layout = Layout::new(tensors, metadata, Path::new("<in-memory>"))?;
    let mut out = Vec::with_capacity(layout.prefix.len() + layout.data_len);
    out.extend_from_slice(&layout.prefix);
    for &i in &layout.order {
        out.extend_from_slice(tensors[i].data);
    }
    Ok(out)
}

/// Writes a safetensors file at `path`, atomically.
///
/// The file is written to a temporary file in the same directory, flushed and fsynced, renamed
/// over `path`, and then the directory is fsynced so the rename itself is durable. Readers see
/// either the old file or the complete new one, never a partial write; after a crash at most a
/// stray `.NAME.*.tmp` file is left behind. On error the temporary file is removed and `path` is
/// untouched.
///
/// Layout as the reference writer: tensors sorted by dtype (widest first) then name, packed, the
/// header padded with spaces to a multiple of 8 bytes, so each tensor's file offset is a multiple
/// of its element size (see the module docs).
///
/// Errors: duplicate names, a tensor named `__metadata__`, a tensor whose `data` length differs
/// from its shape's element count × dtype size, and any I/O failure (as [`Error::Io`]).
pub fn write(
    path: &Path,
    tensors: &[RawTensor<'_>],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    let layout = Layout::new(tensors, metadata, path)?;
    let file_name = path.file_name().ok_or_else(|| Error::Safetensors {
        path: path.to_path_buf(),
        msg: "path has no file name".to_string(),
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Unique within this process by the counter and across processes by the pid; create_new
    // below refuses to clobber anything that exists anyway.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));

    let result = write_to_temp(&tmp, &layout, tensors).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            err: source,
        })
    });
    if result.is_err() {
        // Best effort: the original error is the one worth reporting.
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    sync_dir(&dir)
}

fn write_to_temp(tmp: &Path, layout: &Layout, tensors: &[RawTensor<'_>]) -> Result<()> {
    let io_err = |source| Error::Io {
        path: tmp.to_path_buf(),
        err: source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(io_err)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&layout.prefix).map_err(io_err)?;
    for &i in &layout.order {
        w.write_all(tensors[i].data).map_err(io_err)?;
    }
    let file = w.into_inner().map_err(|e| io_err(e.into_error()))?;
    file.sync_all().map_err(io_err)
}

/// Makes a rename inside `dir` durable. Only Unix can open and fsync a directory; elsewhere the
/// rename is as durable as the platform makes it.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                err: source,
            })?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Where everything goes: the length field and padded header, and the order of the tensors' data.
struct Layout {
    /// 8-byte length field followed by the padded JSON header.
    prefix: Vec<u8>,
    /// Indices into the caller's tensors, in data order.
    order: Vec<usize>,
    data_len: usize,
}

impl Layout {
    fn new(
        tensors: &[RawTensor<'_>],
        metadata: Option<&BTreeMap<String, String>>,
        path: &Path,
    ) -> Result<Self> {
        let err = |msg: String| Error::Safetensors {
            path: path.to_path_buf(),
            msg,
        };
        let mut seen = HashSet::with_capacity(tensors.len());
        for t in tensors {
            if t.name == METADATA_KEY {
                return Err(err(format!(
                    "cannot write a tensor named {METADATA_KEY:?}: the name is reserved for metadata"
                )));
            }
            if !seen.insert(t.name) {
                return Err(err(format!("duplicate tensor name {:?}", t.name)));
            }
            let expected =
                checked_num_elements(t.shape).and_then(|n| n.checked_mul(t.dtype.size_in_bytes()));
            if expected != Some(t.data.len()) {
                let needed = match expected {
                    Some(n) => format!("{n} bytes"),
                    None => "more bytes than fit in usize".to_string(),
                };
                return Err(err(format!(
                    "tensor {:?}: {} bytes of data but shape {:?} of {} needs {needed}",
                    t.name,
                    t.data.len(),
                    t.shape,
                    t.dtype.safetensors_name()
                )));
            }
        }

        // The reference writer's order: its dtype enum descending, then name. For our dtypes that
        // is widest element first, which is what keeps every tensor aligned to its element size.
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by(|&a, &b| {
            let (ta, tb) = (&tensors[a], &tensors[b]);
            dtype_rank(tb.dtype)
                .cmp(&dtype_rank(ta.dtype))
                .then_with(|| ta.name.cmp(tb.name))
        });

        // JSON by hand: the format is fixed and this keeps key order (metadata first, then the
        // tensors in data order) exactly as the reference writes it. serde_json escapes strings.
        let json_str = |s: &str| serde_json::to_string(s).expect("serializing a str cannot fail");
        let mut json = String::from("{");
        let mut first = true;
        let mut sep = |json: &mut String| {
            if !std::mem::take(&mut first) {
                json.push(',');
            }
        };
        if let Some(meta) = metadata {
            sep(&mut json);
            json.push_str(&json_str(METADATA_KEY));
            json.push_str(":{");
            for (i, (k, v)) in meta.iter().enumerate() {
                if i > 0 {
                    json.push(',');
                }
                json.push_str(&json_str(k));
                json.push(':');
                json.push_str(&json_str(v));
            }
            json.push('}');
        }
        let mut offset = 0usize;
        for &i in &order {
            let t = &tensors[i];
            let end = offset.checked_add(t.data.len()).ok_or_else(|| {
                err("total data size is more bytes than fit in usize".to_string())
            })?;
            sep(&mut json);
            let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
            json.push_str(&format!(
                "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
                json_str(t.name),
                t.dtype.safetensors_name(),
                shape.join(",")
            ));
            offset = end;
        }
        json.push('}');
        // Pad with spaces (valid trailing JSON whitespace) so the data section starts at a
        // multiple of 8: 8 + header length, with header length a multiple of 8.
        let padded = json.len().div_ceil(8) * 8;
        let mut prefix = Vec::with_capacity(8 + padded);
        prefix.extend_from_slice(&(padded as u64).to_le_bytes());
        prefix.extend_from_slice(json.as_bytes());
        prefix.resize(8 + padded, b' ');
        if padded as u64 > super::MAX_HEADER_LEN {
            return Err(err(format!(
                "header would be {padded} bytes, more than readers accept ({})",
                super::MAX_HEADER_LEN
            )));
        }
        Ok(Layout {
            prefix,
            order,
            data_len: offset,
        })
    }
}

/// Position in the reference implementation's dtype enum, whose descending order sets the data
/// order: I64, F32, U32, I32, BF16, F16, U8.
fn dtype_rank(dtype: DType) -> u8 {
    match dtype {
        DType::U8 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::I32 => 3,
        DType::U32 => 4,
        DType::F32 => 5,
        DType::I64 => 6,
    }
}
