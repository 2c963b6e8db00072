//! Ops, one module per family. Each module holds the public methods on [`Tensor`], the forward
//! computation (calling the SIMD kernels in [`crate::cpu`]), the backward rule recorded with
//! [`Tensor::record`] right beside it, and its tests.
//!
//! The primitive set is small; the rest (var, logsumexp, masked_fill, dropout, the composed
//! attention reference) is built from primitives and gets its gradient for free.

pub mod attention;
pub mod binary;
pub mod concat;
pub mod cross_entropy;
pub mod dropout;
pub mod embedding;
pub mod gather;
pub mod layer_norm;
pub mod matmul;
pub mod reduce;
pub mod softmax;
pub mod unary;

use crate::{Result, Tensor};

/// Applies a slice kernel to the f32 elements of `x`, producing an untracked contiguous tensor.
pub(crate) fn map_f32(x: &Tensor, kernel: impl Fn(&[f32], &mut [f32])) -> Result<Tensor> {
    let src = x.f32_data()?;
    let mut out = vec![0.0f32; src.len()];
    kernel(&src, &mut out);
    Ok(Tensor::f32_owned(out, x.shape()))
}

/// Applies a two-input slice kernel to same-shape tensors.
pub(crate) fn zip_f32(
    a: &Tensor,
    b: &Tensor,
    kernel: impl Fn(&[f32], &[f32], &mut [f32]),
) -> Result<Tensor> {
    debug_assert_eq!(a.shape(), b.shape());
    let (sa, sb) = (a.f32_data()?, b.f32_data()?);
    let mut out = vec![0.0f32; sa.len()];
    kernel(&sa, &sb, &mut out);
    Ok(Tensor::f32_owned(out, a.shape()))
}
