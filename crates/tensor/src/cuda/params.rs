//! Kernel parameter structs, passed by value to the kernels that take them. Each is
//! `#[repr(C)]` with the fields of its CUDA twin in the same order. The tests here pin sizes and
//! offsets; `static_assert`s in kernels/*.cu pin the same sizes on the device side (checked
//! whenever the kernels compile, in CI by tools/check-kernels; NVRTC has no `offsetof`), so a
//! field added or removed on one side alone fails a build.

use crate::{Error, Result};
use cudarc::driver::DeviceRepr;

/// Dims a [`Strided`] layout can describe (RLHF_MAX_DIMS in kernels/common.cuh).
pub const MAX_DIMS: usize = 8;

/// Shape and element strides of an operand, as kernels/common.cuh's `Strided`. Dims past
/// `rank` are ignored; a broadcast dim has stride 0; rank 0 means flat indexing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Strided {
    pub rank: i32,
    pub shape: [i64; MAX_DIMS],
    pub stride: [i64; MAX_DIMS],
}

// SAFETY: a plain #[repr(C)] struct of integers, laid out as the CUDA struct it mirrors (sizes
// and offsets asserted on both sides); no pointers, no padding the device reads.
unsafe impl DeviceRepr for Strided {}

impl Strided {
    /// Flat indexing: element i at offset i (contiguous operands).
    pub fn flat() -> Strided {
        Strided {
            rank: 0,
            shape: [1; MAX_DIMS],
            stride: [0; MAX_DIMS],
        }
    }

    /// A layout of `shape` with element `strides` (same length, at most [`MAX_DIMS`]).
    pub fn new(shape: &[usize], strides: &[usize]) -> Result<Strided> {
        if shape.len() != strides.len() || shape.len() > MAX_DIMS {
            return Err(Error::cuda(
                "cuda strided layout",
                format!(
                    "shape {shape:?} with strides {strides:?}: need equal lengths of at most \
                     {MAX_DIMS} (merge contiguous dims first)"
                ),
            ));
        }
        let mut s = Strided::flat();
        s.rank = shape.len() as i32;
        for (d, (&n, &st)) in shape.iter().zip(strides).enumerate() {
            s.shape[d] = n as i64;
            s.stride[d] = st as i64;
        }
        Ok(s)
    }
}

/// gemm_bf16_* parameters (kernels/gemm.cu `GemmParams`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmParams {
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub lda: i64,
    pub ldb: i64,
    pub ldc: i64,
    pub stride_a: i64,
    pub stride_b: i64,
    pub stride_c: i64,
    pub alpha: f32,
    pub beta: f32,
}

// SAFETY: #[repr(C)] integers and floats mirroring the CUDA struct (layout asserted both sides).
unsafe impl DeviceRepr for GemmParams {}

/// A TMA tensor map (CUtensorMap, kernels/common.cuh `TmaMap`): 128 opaque bytes, 64-byte
/// aligned, encoded by the driver (`cuTensorMapEncodeTiled`) and passed to a kernel by value.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TmaMap {
    pub opaque: [u64; 16],
}

// SAFETY: plain bytes the driver wrote, the layout of CUtensorMap (asserted in the tests).
unsafe impl DeviceRepr for TmaMap {}

/// gemm_simt_* parameters (kernels/gemm.cu `SimtParams`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SimtParams {
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub sam: i64,
    pub sak: i64,
    pub sbk: i64,
    pub sbn: i64,
    pub ldc: i64,
    pub stride_a: i64,
    pub stride_b: i64,
    pub stride_c: i64,
    pub alpha: f32,
    pub beta: f32,
}

// SAFETY: #[repr(C)] integers and floats mirroring the CUDA struct (layout asserted both sides).
unsafe impl DeviceRepr for SimtParams {}

/// flash_attn_* parameters (kernels/flash_attention.cu `AttnParams`): element strides over
/// batch, head and time of q, k, v, o (the forward output, or O in the backward) and dO.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnParams {
    pub b: i32,
    pub h: i32,
    pub tq: i32,
    pub tk: i32,
    pub q: [i64; 3],
    pub k: [i64; 3],
    pub v: [i64; 3],
    pub o: [i64; 3],
    pub dout: [i64; 3],
    pub scale: f32,
    /// Dropout on the probabilities: hash bits below this drop the element; 0 for none
    /// (crates/tensor/src/cpu/attention/dropout.rs gives the hash).
    pub drop_threshold: u32,
    pub drop_seed: u64,
    /// Head index (b·H + h) of the launch's first head: the dropout hash's head index is
    /// bh0 + blockIdx.y when batches are launched in chunks.
    pub bh0: i32,
    /// The survivors' factor 1/(1-p) (1 without dropout).
    pub drop_scale: f32,
}

// SAFETY: #[repr(C)] integers and floats mirroring the CUDA struct (layout asserted both sides).
unsafe impl DeviceRepr for AttnParams {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn layouts_match_the_cuda_static_asserts() {
        assert_eq!(size_of::<Strided>(), 136);
        assert_eq!(offset_of!(Strided, shape), 8);
        assert_eq!(offset_of!(Strided, stride), 72);

        assert_eq!(size_of::<TmaMap>(), 128);
        assert_eq!(std::mem::align_of::<TmaMap>(), 64);
        assert_eq!(
            size_of::<TmaMap>(),
            size_of::<cudarc::driver::sys::CUtensorMap>()
        );
        assert_eq!(size_of::<GemmParams>(), 72);
        assert_eq!(offset_of!(GemmParams, lda), 16);
        assert_eq!(offset_of!(GemmParams, stride_c), 56);
        assert_eq!(offset_of!(GemmParams, alpha), 64);

        assert_eq!(size_of::<SimtParams>(), 88);
        assert_eq!(offset_of!(SimtParams, sam), 16);
        assert_eq!(offset_of!(SimtParams, stride_c), 72);
        assert_eq!(offset_of!(SimtParams, alpha), 80);

        // flash_attention.cu: int B, H, Tq, Tk; then 15 i64 strides (q, k, v, o, do; each
        // batch, head, time) from byte 16; float scale at 136; the dropout threshold (u32) at
        // 140, its seed (u64) at 144, int bh0 at 152, float drop_scale at 156: 160 bytes.
        assert_eq!(size_of::<AttnParams>(), 160);
        assert_eq!(
            [
                offset_of!(AttnParams, b),
                offset_of!(AttnParams, h),
                offset_of!(AttnParams, tq),
                offset_of!(AttnParams, tk),
            ],
            [0, 4, 8, 12]
        );
        assert_eq!(
            [
                offset_of!(AttnParams, q),
                offset_of!(AttnParams, k),
                offset_of!(AttnParams, v),
                offset_of!(AttnParams, o),
                offset_of!(AttnParams, dout),
            ],
            [16, 40, 64, 88, 112]
        );
        // do_st, the last stride: dout[2].
        assert_eq!(offset_of!(AttnParams, dout) + 2 * 8, 128);
        assert_eq!(offset_of!(AttnParams, scale), 136);
        assert_eq!(
            [
                offset_of!(AttnParams, drop_threshold),
                offset_of!(AttnParams, drop_seed),
                offset_of!(AttnParams, bh0),
                offset_of!(AttnParams, drop_scale),
            ],
            [140, 144, 152, 156]
        );
    }

    #[test]
    fn strided_layouts() {
        let s = Strided::new(&[2, 3, 4], &[12, 0, 1]).unwrap();
        assert_eq!(s.rank, 3);
        assert_eq!(
            (&s.shape[..3], &s.stride[..3]),
            (&[2, 3, 4][..], &[12, 0, 1][..])
        );
        assert_eq!(Strided::flat().rank, 0);
        let e = Strided::new(&[1; 9], &[1; 9]).unwrap_err().to_string();
        assert!(e.contains("at most 8"), "{e}");
        assert!(Strided::new(&[2, 3], &[3]).is_err());
    }
}
