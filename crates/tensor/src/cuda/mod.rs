//! The CUDA backend's foundation: devices, the kernel registry, NVRTC and the PTX cache.
//!
//! The kernels are CUDA C++ in kernels/*.cu (one file per op family), embedded in the binary
//! and compiled at first use by NVRTC for the device's own compute capability (sm_80 and
//! newer); the PTX is cached on disk by source hash and architecture ([`cache`]). cudarc loads
//! libcuda and libnvrtc with dlopen, so this module builds, and every CPU test runs, on machines
//! without CUDA; asking for a GPU there returns [`Error::Cuda`](crate::Error::Cuda), never a
//! panic.
//!
//! [`storage`] holds tensors' GPU memory; each op's CUDA dispatch sits beside its CPU path in
//! [`crate::ops`] (docs/cuda.md lists which ops have one).

pub mod arch;
pub mod cache;
pub mod device;
pub mod gemm;
pub mod kernels;
pub mod nvrtc;
pub mod params;
pub mod profile;
pub mod storage;

pub use arch::Arch;
pub use cache::{PtxCache, PtxKey};
pub use device::{device_count, driver_available, CudaDevice};
pub use gemm::{
    gemm_kernel, gemm_tile_n, parse_default_gemm_kernel, with_gemm_kernel, with_gemm_tile_n,
    GemmKernel, GEMM_KERNEL_ENV, WGMMA_TILE_NS,
};
pub use kernels::{KernelFile, KERNEL_FILES};
pub use nvrtc::{compile_ptx, nvrtc_available, nvrtc_version, ptx_entry_points};
pub use params::{AttnParams, GemmParams, SimtParams, Strided, TmaMap};
pub use storage::{device, CudaBuffer, CudaStorage};
