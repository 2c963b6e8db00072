//! Embedding lookup: rows of a table selected by integer ids. The backward is a scatter-add of
//! the output gradient into the table's rows (ids may repeat).

use crate::{Error, Result, Tensor};

/// Validates index values against `limit`, naming the op and the offending id.
pub(crate) fn checked_indices(op: &'static str, ids: &Tensor, limit: usize) -> Result<Vec<usize>> {
    ids.to_i64_vec()?
        .into_iter()
        .map(|i| {
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

impl Tensor {
    /// `table[ids]`: for ids of shape [...] and a table [V, D], returns [..., D].
    pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
        super::cpu_only("embedding", &[ids, table])?;
        if table.rank() != 2 {
            return Err(Error::invalid(
                "embedding",
                format!("table must be [vocab, dim], got {:?}", table.shape()),
            ));
        }
        let (v, d) = (table.shape()[0], table.shape()[1]);
        let idx = checked_indices("embedding", ids, v)?;
        let t = table.f32_data()?;
        let mut out = crate::cpu::pool::zeroed(idx.len() * d);
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
