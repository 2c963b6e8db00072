//! concat and stack. The backward hands each input its slice of the gradient (a narrow view).
//!
//! On CUDA each input (made dense first when strided) lands in its slot of the output with one
//! 2-D device copy (`outer` rows of `len·inner` elements): no kernel, no host traffic.

use crate::layout::resolve_dim;
use crate::{Error, Result, Tensor};

/// The CPU concat: for each outer index, each input's block in turn.
fn concat_cpu(tensors: &[&Tensor], d: usize, shape: &[usize]) -> Result<Tensor> {
    let outer: usize = shape[..d].iter().product();
    let inner: usize = shape[d + 1..].iter().product();
    let mut out = Vec::with_capacity(shape.iter().product());
    let datas = tensors
        .iter()
        .map(|t| t.f32_data())
        .collect::<Result<Vec<_>>>()?;
    for o in 0..outer {
        for (t, data) in tensors.iter().zip(&datas) {
            let block = t.shape()[d] * inner;
            out.extend_from_slice(&data[o * block..(o + 1) * block]);
        }
    }
    Ok(Tensor::f32_owned(out, shape))
}

/// The CUDA concat: input i, dense, is `outer` rows of `len_i · inner` elements; its slot in
/// the output is the same rows, `shape[d] · inner` elements apart, starting at the sum of the
/// earlier inputs' lengths. One cuMemcpy2DAsync per input.
#[cfg(feature = "cuda")]
fn concat_cuda(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    tensors: &[&Tensor],
    d: usize,
    shape: &[usize],
) -> Result<Tensor> {
    const OP: &str = "concat";
    let first = tensors[0];
    for t in tensors {
        super::same_dtype(OP, first, t)?;
    }
    super::tname(OP, first.dtype())?;
    let esz = first.dtype().size_in_bytes();
    let outer: usize = shape[..d].iter().product();
    let inner: usize = shape[d + 1..].iter().product();
    let out = super::cuda_empty(dev, first.dtype(), shape)?;
    let base = super::ptr(&out)?;
    let dst_pitch = shape[d] * inner * esz;
    let mut start = 0;
    for t in tensors {
        let width = t.shape()[d] * inner * esz;
        if width > 0 && outer > 0 {
            let src = super::dense(t)?;
            let dst = base + (start * inner * esz) as u64;
            // SAFETY: src is a dense [outer, len, inner] buffer (`outer` rows of `width` bytes,
            // pitch `width`) in its own storage; the destination rows start `start·inner`
            // elements into a fresh output of `outer` rows of `dst_pitch` bytes, and
            // start·inner·esz + width ≤ dst_pitch, so every row stays inside its output row.
            // A fresh output never overlaps an input.
            unsafe {
                super::cuda_copy_2d(
                    OP,
                    dev,
                    (dst, dst_pitch),
                    (super::ptr(&src)?, width),
                    width,
                    outer,
                )?
            };
        }
        start += t.shape()[d];
    }
    Ok(out)
}

impl Tensor {
    /// Joins tensors along an existing dim; all other dims must agree.
    pub fn concat(tensors: &[&Tensor], dim: isize) -> Result<Tensor> {
        let first = tensors
            .first()
            .ok_or_else(|| Error::invalid("concat", "no tensors given"))?;
        let d = resolve_dim("concat", dim, first.shape())?;
        let mut shape = first.shape().to_vec();
        shape[d] = 0;
        for t in tensors {
            let ok = t.rank() == first.rank()
                && t.shape()
                    .iter()
                    .enumerate()
                    .all(|(i, &s)| i == d || s == first.shape()[i]);
            if !ok {
                return Err(Error::ShapeMismatch {
                    op: "concat",
                    lhs: first.shape().to_vec(),
                    rhs: t.shape().to_vec(),
                });
            }
            shape[d] += t.shape()[d];
        }
        #[cfg(feature = "cuda")]
        let out = match super::cuda_inputs("concat", tensors)? {
            Some(dev) => concat_cuda(&dev, tensors, d, &shape)?,
            None => concat_cpu(tensors, d, &shape)?,
        };
        #[cfg(not(feature = "cuda"))]
        let out = concat_cpu(tensors, d, &shape)?;
        let sizes: Vec<usize> = tensors.iter().map(|t| t.shape()[d]).collect();
        let inputs: Vec<&Tensor> = tensors.to_vec();
        Ok(Tensor::record(out, "concat", &inputs, move |g| {
            let mut start = 0;
            let mut grads = Vec::with_capacity(sizes.len());
            for &len in &sizes {
                grads.push(Some(g.narrow(d as isize, start, len)?.contiguous()?));
                start += len;
            }
            Ok(grads)
        }))
    }

    /// Joins same-shape tensors along a new dim `dim`.
    pub fn stack(tensors: &[&Tensor], dim: isize) -> Result<Tensor> {
        let expanded = tensors
            .iter()
            .map(|t| t.unsqueeze(dim))
            .collect::<Result<Vec<_>>>()?;
        Tensor::concat(&expanded.iter().collect::<Vec<_>>(), dim)
    }
}

#[cfg(test)]
mod tests {
    use crate::gradcheck::check_gradients;
    use crate::Tensor;

    #[test]
    fn concat_and_stack() {
        let a = Tensor::arange(0.0, 4.0, 1.0)
            .unwrap()
            .reshape(&[2, 2])
            .unwrap();
        let b = Tensor::arange(4.0, 6.0, 1.0)
            .unwrap()
            .reshape(&[2, 1])
            .unwrap();
        let c = Tensor::concat(&[&a, &b], 1).unwrap();
        assert_eq!(c.to_f64_vec(), vec![0.0, 1.0, 4.0, 2.0, 3.0, 5.0]);
        let s = Tensor::stack(&[&a, &a], 0).unwrap();
        assert_eq!(s.shape(), &[2, 2, 2]);
        assert!(Tensor::concat(&[&a, &b], 0).is_err());
        let err = check_gradients(&[a, b], |t| Tensor::concat(&[&t[0], &t[1]], -1), 1e-3).unwrap();
        assert!(err < 1e-3);
    }
}
