//! rlhf-tensor: the engine every other crate stands on.
//!
//! A [`Tensor`] is a layout (shape, strides, offset) over reference-counted storage; views never
//! copy. CPU compute is f32 through SIMD kernels picked at run time ([`cpu`]); bf16 and f16 are
//! storage types. Reverse-mode autograd records a graph only when an input tracks gradients and
//! no-grad mode is off. Checkpoints use the safetensors format ([`safetensors`]).

pub mod cpu;
pub mod dtype;
pub mod error;
pub mod safetensors;

pub use dtype::DType;
pub use error::{Error, Result};
