//! concat and stack. The backward hands each input its slice of the gradient (a narrow view).
//!
//! On CUDA each input (made dense first when strided) lands in its slot of the output with one
//! 2-D device copy (`outer` rows of `len·inner` elements): no kernel, no host traffic. The same
//! copy is narrow's backward on a GPU ([`pad_cuda`]): the gradient written into its slot of a
//! zero tensor of the input's shape.

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

/// Writes `src` into its slot of `dst`: `dst` is a fresh contiguous tensor on `dev`, `src` has
/// `dst`'s shape except along `d`, where it covers `start..start + len`. Viewed around `d`, src
/// (made dense first when strided) is `outer` rows of `len·inner` elements and its slot the same
/// rows, `shape[d]·inner` elements apart, starting `start·inner` elements in: one
/// cuMemcpy2DAsync, no kernel. Shapes and dtypes are checked here because the copy's bounds
/// rest on them.
#[cfg(feature = "cuda")]
fn copy_into_slot(
    op: &'static str,
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    dst: &Tensor,
    src: &Tensor,
    d: usize,
    start: usize,
) -> Result<()> {
    let shape = dst.shape();
    let fits = dst.is_contiguous()
        && src.rank() == shape.len()
        && d < shape.len()
        && start + src.shape()[d] <= shape[d]
        && (0..shape.len()).all(|i| i == d || src.shape()[i] == shape[i]);
    if !fits {
        return Err(Error::ShapeMismatch {
            op,
            lhs: shape.to_vec(),
            rhs: src.shape().to_vec(),
        });
    }
    super::same_dtype(op, dst, src)?;
    let esz = dst.dtype().size_in_bytes();
    let outer: usize = shape[..d].iter().product();
    let inner: usize = shape[d + 1..].iter().product();
    let width = src.shape()[d] * inner * esz;
    if width == 0 || outer == 0 {
        return Ok(());
    }
    let src = super::dense(src)?;
    let dst_pitch = shape[d] * inner * esz;
    let dst_ptr = super::ptr(dst)? + (start * inner * esz) as u64;
    // SAFETY: src is a dense [outer, len, inner] buffer (`outer` rows of `width` bytes, pitch
    // `width`) in its own storage; the destination rows start `start·inner` elements into a
    // contiguous `dst` of `outer` rows of `dst_pitch` bytes, and start·inner·esz + width ≤
    // dst_pitch (checked above), so every row stays inside its row of dst. Callers pass a
    // fresh dst, which never overlaps an input.
    unsafe {
        super::cuda_copy_2d(
            op,
            dev,
            (dst_ptr, dst_pitch),
            (super::ptr(&src)?, width),
            width,
            outer,
        )
    }
}

/// The CUDA concat: each input copied into its slot of a fresh output ([`copy_into_slot`]),
/// at the sum of the earlier inputs' lengths.
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
    let out = super::cuda_uninit(dev, first.dtype(), shape)?;
    let mut start = 0;
    for t in tensors {
        copy_into_slot(OP, dev, &out, t, d, start)?;
        start += t.shape()[d];
    }
    Ok(out)
}

/// Narrow's backward on a GPU: zeros of the input's `shape` (a fresh, zero-filled device
/// buffer) with the gradient `g` copied into `start..` along `d` ([`copy_into_slot`]). The
/// gradient keeps its dtype (f32 or bf16).
#[cfg(feature = "cuda")]
pub(crate) fn pad_cuda(
    dev: &std::sync::Arc<crate::cuda::CudaDevice>,
    g: &Tensor,
    shape: &[usize],
    d: usize,
    start: usize,
) -> Result<Tensor> {
    const OP: &str = "narrow backward";
    super::tname(OP, g.dtype())?;
    let out = super::cuda_zeros(dev, g.dtype(), shape)?;
    copy_into_slot(OP, dev, &out, g, d, start)?;
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
