//! Embedding lookup: rows of a table selected by integer ids. The backward is a scatter-add of
//! the output gradient into the table's rows (ids may repeat).
//!
//! On CUDA (the table on a GPU; kernels/embedding.cu) the ids may be on the host or on the
//! table's GPU; the same rule holds for gather_last's indices and cross_entropy's targets:
//! - host ids (any integer dtype, any layout) are checked on the host, so an out-of-range id is
//!   the CPU path's own error before anything launches, then copied up as i64;
//! - contiguous i64 ids on the table's GPU are read in place; the kernel zero-fills the rows of
//!   bad ids and reports the first bad position through a device flag, which the forward reads
//!   back (a wait for the GPU) to return the same error;
//! - other ids on the GPU (a narrowed view, i32) go through the host once (no integer copy
//!   kernel exists), then as host ids.
//!
//! Ids on another device, or a table on the CPU with ids on a GPU, are an `Error::Cuda`.
//! A bad id is never a device fault: the kernels bounds-check every id before reading.
//!
//! The backward adds rows in token order, one thread per (row, column): bitwise the CPU's sum
//! for f32, with no atomics; the f32 sum is cast to a bf16 table's dtype once at the end.

use crate::{Error, Result, Tensor};

/// Validates index values against `limit`, naming the op and the offending id.
pub(crate) fn checked_indices(op: &'static str, ids: &Tensor, limit: usize) -> Result<Vec<usize>> {
    check_index_values(op, &ids.to_i64_vec()?, limit)
}

/// [`checked_indices`] over values already on the host.
pub(crate) fn check_index_values(
    op: &'static str,
    ids: &[i64],
    limit: usize,
) -> Result<Vec<usize>> {
    ids.iter()
        .map(|&i| {
            if i < 0 || i as usize >= limit {
                Err(Error::invalid(
                    op,
                    format!("index {i} out of range 0..{limit}"),
                ))
            } else {
                Ok(i as usize)
            }
        })
        .collect()
}

/// The error for a bad index a kernel reported at flat position `pos` of `idx` (a GPU tensor):
/// the CPU path's message, found again on the host (this is the error path, so one copy of the
/// indices does not matter).
#[cfg(feature = "cuda")]
pub(crate) fn bad_index_error(op: &'static str, idx: &Tensor, pos: usize, limit: usize) -> Error {
    match idx.to_i64_vec() {
        Ok(v) => match check_index_values(op, &v, limit) {
            Err(e) => e,
            Ok(_) => Error::cuda(
                op,
                format!(
                    "the kernel flagged index position {pos}, but every index is in 0..{limit}"
                ),
            ),
        },
        Err(e) => e,
    }
}

impl Tensor {
    /// `table[ids]`: for ids of shape [...] and a table [V, D], returns [..., D].
    pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
        if table.rank() != 2 {
            return Err(Error::invalid(
                "embedding",
                format!("table must be [vocab, dim], got {:?}", table.shape()),
            ));
        }
        let (v, d) = (table.shape()[0], table.shape()[1]);
        #[cfg(feature = "cuda")]
        if let Some(dev) = table.cuda_storage().map(|s| s.device().clone()) {
            return embedding_cuda(&dev, ids, table);
        }
        super::indices_on_host("embedding", ids)?;
        let idx = checked_indices("embedding", ids, v)?;
        let t = table.f32_data()?;
        // Every row is copied from the table.
        let mut out = crate::cpu::pool::for_overwrite(idx.len() * d);
        for (o, &i) in out.chunks_mut(d.max(1)).zip(&idx) {
            o.copy_from_slice(&t[i * d..(i + 1) * d]);
        }
        let mut shape = ids.shape().to_vec();
        shape.push(d);
        let out = Tensor::f32_owned(out, &shape);
        Ok(Tensor::record(out, "embedding", &[table], move |g| {
            let gv = g.f32_data()?;
            let mut gt = crate::cpu::pool::zeroed(v * d);
            // Sequential in token order: repeated ids accumulate deterministically.
            for (row, &i) in gv.chunks(d.max(1)).zip(&idx) {
                crate::cpu::vec::axpy(1.0, row, &mut gt[i * d..(i + 1) * d]);
            }
            Ok(vec![Some(Tensor::f32_owned(gt, &[v, d]))])
        }))
    }
}

/// Id buckets of the backward launch (gridDim.y): each block column reads every id (8 a
/// thread) and adds the rows whose id falls in its bucket. The sums are in token order
/// whatever the count; 256 keep about 30 matches per block for GPT-2's 8192 tokens (the
/// additions to one column run one after another) and 1536 blocks for its width of 768.
#[cfg(feature = "cuda")]
const EMB_BUCKETS: usize = 256;

/// kernels/embedding.cu: `embedding_fwd_T` and, in the backward, `embedding_bwd_T` into a
/// zeroed f32 table gradient (cast to the table's dtype after).
#[cfg(feature = "cuda")]
fn embedding_cuda(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    ids: &Tensor,
    table: &Tensor,
) -> Result<Tensor> {
    use crate::cuda::storage::elementwise_config;
    use crate::DType;
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    const OP: &str = "embedding";
    let dtype = table.dtype();
    let tn = super::tname(OP, dtype)?;
    let (v, d) = (table.shape()[0], table.shape()[1]);
    let (idt, host) = super::cuda_index_tensor(OP, ids, dev)?;
    if let Some(vals) = &host {
        check_index_values(OP, vals, v)?;
    }
    let n = ids.numel();
    let mut shape = ids.shape().to_vec();
    shape.push(d);
    let out = super::cuda_uninit(dev, dtype, &shape)?;
    if n > 0 && d > 0 {
        let td = super::dense(table)?;
        let bad = super::cuda_bad_flag(dev)?;
        let entry = format!("embedding_fwd_{tn}");
        let (n64, d64, v64) = (n as i64, d as i64, v as i64);
        let (pi, pt, po, pb) = (
            super::ptr(&idt)?,
            super::ptr(&td)?,
            super::ptr(&out)?,
            super::ptr(&bad)?,
        );
        let f = dev.function("embedding", &entry)?;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&n64)
            .arg(&d64)
            .arg(&v64)
            .arg(&pi)
            .arg(&pt)
            .arg(&po)
            .arg(&pb);
        // SAFETY: embedding_fwd_T(i64 n, i64 dim, i64 vocab, const i64* ids, const T* table,
        // T* out, u64* bad): ids n contiguous i64, table a contiguous [vocab, dim] buffer of T
        // (every id is bounds-checked by the kernel before the read), out a fresh [n, dim]
        // buffer, bad one u64 (an i64 buffer of -1).
        unsafe { super::launch(OP, &entry, l, elementwise_config(n * d))? };
        if host.is_none() {
            if let Some(pos) = super::read_bad_flag(&bad)? {
                return Err(bad_index_error(OP, &idt, pos, v));
            }
        }
    } else if host.is_none() && n > 0 {
        // d == 0: no launch to check the ids, but the CPU path rejects bad ones all the same.
        check_index_values(OP, &idt.to_i64_vec()?, v)?;
    }
    let dev = dev.clone();
    Ok(Tensor::record(out, OP, &[table], move |g| {
        if g.dtype() != dtype {
            return Err(Error::DTypeMismatch {
                op: OP,
                expected: dtype,
                got: g.dtype(),
            });
        }
        let dtable = super::cuda_zeros(&dev, DType::F32, &[v, d])?;
        if n > 0 && d > 0 {
            let g = super::dense(g)?;
            // The ids were validated by the forward; the kernel still bounds-checks them.
            let bad = super::cuda_bad_flag(&dev)?;
            let entry = format!("embedding_bwd_{tn}");
            let (n64, d64, v64) = (n as i64, d as i64, v as i64);
            let (pi, pg, pd, pb) = (
                super::ptr(&idt)?,
                super::ptr(&g)?,
                super::ptr(&dtable)?,
                super::ptr(&bad)?,
            );
            let f = dev.function("embedding", &entry)?;
            let mut l = dev.stream().launch_builder(&f);
            l.arg(&n64)
                .arg(&d64)
                .arg(&v64)
                .arg(&pi)
                .arg(&pg)
                .arg(&pd)
                .arg(&pb);
            let cfg = LaunchConfig {
                grid_dim: (d.div_ceil(128) as u32, EMB_BUCKETS.min(v).max(1) as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: embedding_bwd_T(i64 n, i64 dim, i64 vocab, const i64* ids, const T*
            // dout, float* dtable, u64* bad) with blockDim 128 as the kernel requires: ids n
            // contiguous i64, dout a contiguous [n, dim] buffer of T, dtable a zeroed
            // [vocab, dim] f32 buffer, bad one u64.
            unsafe { super::launch(OP, &entry, l, cfg)? };
        }
        Ok(vec![Some(dtable.to_dtype(dtype)?)])
    }))
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::check_gradients;
    use crate::Tensor;

    #[test]
    fn looks_up_rows_and_rejects_bad_ids() {
        let table = Tensor::arange(0.0, 6.0, 1.0)
            .unwrap()
            .reshape(&[3, 2])
            .unwrap();
        let ids = Tensor::from_vec(vec![2i64, 0, 2], &[3]).unwrap();
        let e = Tensor::embedding(&ids, &table).unwrap();
        assert_eq!(e.to_f64_vec(), vec![4.0, 5.0, 0.0, 1.0, 4.0, 5.0]);
        let bad = Tensor::from_vec(vec![3i64], &[1]).unwrap();
        let msg = Tensor::embedding(&bad, &table).unwrap_err().to_string();
        assert!(msg.contains("index 3 out of range"), "{msg}");
    }

    #[test]
    fn embedding_gradient_scatter_adds() {
        let table = Tensor::randn(&[4, 3], 0.0, 1.0, 1);
        let ids = Tensor::from_vec(vec![1i64, 1, 3, 0, 1], &[5]).unwrap();
        let err = check_gradients(&[table], |t| Tensor::embedding(&ids, &t[0]), 1e-3).unwrap();
        assert!(err < 1e-3, "{err}");
    }
}
