//! Tensors in and out of safetensors files.
//!
//! [`load`] views each tensor inside the memory-mapped file without copying when its bytes are
//! aligned for its dtype (always the case for files from [`write()`](super::write()) and the Python
//! writer); a misaligned tensor is copied into owned storage. Either way the result is an
//! ordinary [`Tensor`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::{MappedFile, RawTensor, TensorInfo};
use crate::layout::Layout;
use crate::storage::{ByteSource, Storage};
use crate::{DType, Error, Result, Tensor};
use half::{bf16, f16};

impl ByteSource for MappedFile {
    fn bytes(&self) -> &[u8] {
        MappedFile::bytes(self)
    }
}

/// The tensors of a safetensors file, in file order, and its metadata.
pub struct Loaded {
    pub tensors: Vec<(String, Tensor)>,
    pub metadata: Option<BTreeMap<String, String>>,
    /// How many tensors are zero-copy views of the mapping (the rest were copied).
    pub zero_copy: usize,
}

impl Loaded {
    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

/// Copies little-endian bytes into owned storage (the misaligned fallback).
fn copied_storage(dtype: DType, bytes: &[u8]) -> Storage {
    fn read<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
        bytes
            .chunks_exact(std::mem::size_of::<T>())
            .map(bytemuck::pod_read_unaligned)
            .collect()
    }
    match dtype {
        DType::F32 => Storage::F32(read::<f32>(bytes)),
        DType::BF16 => Storage::BF16(read::<bf16>(bytes)),
        DType::F16 => Storage::F16(read::<f16>(bytes)),
        DType::I64 => Storage::I64(read::<i64>(bytes)),
        DType::I32 => Storage::I32(read::<i32>(bytes)),
        DType::U32 => Storage::U32(read::<u32>(bytes)),
        DType::U8 => Storage::U8(bytes.to_vec()),
    }
}

/// One tensor of a mapped file as a [`Tensor`], and whether it is a zero-copy view.
pub fn tensor_from(file: &MappedFile, info: &TensorInfo) -> Result<(Tensor, bool)> {
    let source: Arc<dyn ByteSource> = Arc::new(file.clone());
    let (storage, zero_copy) = match Storage::mapped(source, info.begin, info.end, info.dtype) {
        Some(s) => (s, true),
        None => (copied_storage(info.dtype, file.tensor_bytes(info)), false),
    };
    let t = Tensor::from_storage(Arc::new(storage), Layout::contiguous(&info.shape))?;
    Ok((t, zero_copy))
}

/// Opens `path` and returns all its tensors (see the module docs on copying).
pub fn load(path: &Path) -> Result<Loaded> {
    let file = MappedFile::open(path)?;
    let mut tensors = Vec::with_capacity(file.tensors().len());
    let mut zero_copy = 0;
    for info in file.tensors() {
        let (t, z) = tensor_from(&file, info)?;
        zero_copy += usize::from(z);
        tensors.push((info.name.clone(), t));
    }
    Ok(Loaded {
        tensors,
        metadata: file.header().metadata.clone(),
        zero_copy,
    })
}

/// Writes named tensors (any dtype, any layout: strided ones are made contiguous first) and
/// optional metadata to `path`, atomically (see [`write()`](super::write())).
pub fn save(
    path: &Path,
    tensors: &[(&str, &Tensor)],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    let contiguous = tensors
        .iter()
        .map(|(_, t)| t.detach().to_device(crate::Device::Cpu)?.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let raw = tensors
        .iter()
        .zip(&contiguous)
        .map(|((name, _), t)| {
            let size = t.dtype().size_in_bytes();
            let start = t.layout().offset() * size;
            let bytes = t
                .storage()
                .as_bytes()
                .get(start..start + t.numel() * size)
                .ok_or_else(|| {
                    Error::invalid("safetensors::save", format!("{name}: storage too short"))
                })?;
            Ok(RawTensor {
                name,
                dtype: t.dtype(),
                shape: t.shape(),
                data: bytes,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    super::write(path, &raw, metadata)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_zero_copy_and_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let a = Tensor::randn(&[3, 4], 0.0, 1.0, 1);
        let at = a.t().unwrap(); // strided: saved as its contiguous copy
        let b = a.to_dtype(DType::BF16).unwrap();
        let ids = Tensor::from_vec(vec![1i64, -2, 3], &[3]).unwrap();
        let mut meta = BTreeMap::new();
        meta.insert("config".to_string(), "{\"n\":1}".to_string());
        save(
            &path,
            &[("a", &a), ("at", &at), ("b", &b), ("ids", &ids)],
            Some(&meta),
        )
        .unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.zero_copy, 4);
        assert_eq!(loaded.metadata.as_ref(), Some(&meta));
        assert_eq!(loaded.get("a").unwrap().to_f64_vec(), a.to_f64_vec());
        assert_eq!(loaded.get("at").unwrap().to_f64_vec(), at.to_f64_vec());
        assert_eq!(loaded.get("at").unwrap().shape(), &[4, 3]);
        assert_eq!(loaded.get("b").unwrap().to_f64_vec(), b.to_f64_vec());
        assert_eq!(
            loaded.get("ids").unwrap().to_i64_vec().unwrap(),
            vec![1, -2, 3]
        );
        assert!(loaded.get("a").unwrap().storage().is_mapped());
        // Mapped tensors compute like any other.
        let s = loaded.get("a").unwrap().sum_all().unwrap().item().unwrap();
        assert!((s - a.sum_all().unwrap().item().unwrap()).abs() < 1e-5);
    }

    #[test]
    fn misaligned_tensors_are_copied() {
        // A U8 tensor of odd length first pushes the F32 tensor to an odd offset: hand-built.
        let header = r#"{"u":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"f":{"dtype":"F32","shape":[1],"data_offsets":[1,5]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.push(7);
        bytes.extend_from_slice(&2.5f32.to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.get("f").unwrap().to_f64_vec(), vec![2.5]);
        assert_eq!(loaded.get("u").unwrap().to_f64_vec(), vec![7.0]);
        assert!(loaded.zero_copy >= 1);
    }
}
