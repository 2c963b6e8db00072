//! rlhf-tensor: the engine every other crate stands on.
//!
//! A [`Tensor`] is a layout (shape, strides, offset) over reference-counted storage; views never
//! copy. CPU compute is f32 through SIMD kernels picked at run time ([`cpu`]); bf16 and f16 are
//! storage types. Reverse-mode autograd records a graph only when an input tracks gradients and
//! no-grad mode is off. Checkpoints use the safetensors format ([`safetensors`]).

pub mod autograd;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod gradcheck;
pub mod layout;
pub mod ops;
pub mod optim;
pub mod rng;
pub mod safetensors;
pub mod storage;
pub mod tensor;

pub use autograd::{no_grad, NoGradGuard, Parameter};
pub use cpu::attention::AttentionDropout;
pub use dtype::DType;
pub use error::{Error, Result};
pub use layout::Layout;
pub use rng::Rng;
pub use storage::Storage;
pub use tensor::{Device, Tensor};
