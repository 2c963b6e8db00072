//! Which GEMM kernel `matmul` launches on a GPU.
//!
//! kernels/gemm.cu has four families: `gemm_tma_*` (Hopper warpgroup MMA fed by the TMA unit
//! from a producer warpgroup) and `gemm_wgmma_*` (the same MMAs fed by cp.async from every
//! thread), both compiled only for sm_90a; `gemm_bf16_*` (mma.sync tensor cores, sm_80 and
//! newer) and `gemm_simt_*` (plain FMA, any strides and dtypes). By default matmul takes the
//! one designed to be fastest that accepts the operands.
//! Benchmarks and tests pin a family with [`with_gemm_kernel`] to measure or check each against
//! the others on the same card; the choice is per thread (matmul launches from the calling
//! thread), so tests running in parallel do not see each other's choice.

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// A GEMM kernel family (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GemmKernel {
    /// For bf16 operands that meet the tensor-core alignment rules: on sm_90a devices the TMA
    /// kernel (the cp.async wgmma kernel where the driver cannot describe an operand as a
    /// tensor map), else mma.sync; SIMT otherwise.
    #[default]
    Auto,
    /// The TMA-fed wgmma kernel for the operands the tensor cores take; an error on a device
    /// without wgmma (anything but compute capability 9.0) or for operands the driver cannot
    /// describe as tensor maps, so a benchmark or test that asks for it never silently
    /// measures another kernel.
    Tma,
    /// The cp.async-fed wgmma kernel for the operands the tensor cores take; an error on a
    /// device without wgmma.
    Wgmma,
    /// Never wgmma: mma.sync for operands it accepts, else SIMT.
    Mma,
    /// Always the SIMT kernels.
    Simt,
}

impl GemmKernel {
    pub const ALL: [GemmKernel; 5] = [
        GemmKernel::Auto,
        GemmKernel::Tma,
        GemmKernel::Wgmma,
        GemmKernel::Mma,
        GemmKernel::Simt,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GemmKernel::Auto => "auto",
            GemmKernel::Tma => "tma",
            GemmKernel::Wgmma => "wgmma",
            GemmKernel::Mma => "mma",
            GemmKernel::Simt => "simt",
        }
    }
}

impl fmt::Display for GemmKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for GemmKernel {
    type Err = Error;
    fn from_str(s: &str) -> Result<GemmKernel> {
        GemmKernel::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                Error::cuda(
                    "gemm kernel",
                    format!("unknown GEMM kernel {s:?}: expected auto, tma, wgmma, mma or simt"),
                )
            })
    }
}

thread_local! {
    static CHOICE: Cell<GemmKernel> = const { Cell::new(GemmKernel::Auto) };
    static TILE_N: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The block-tile widths of the wgmma kernels (`gemm_{tma,wgmma}_*_n128` / `_n256`).
pub const WGMMA_TILE_NS: [usize; 2] = [128, 256];

/// The wgmma kernels' block-tile width matmul uses on this thread: None picks per product
/// (256 columns, or 128 when 256-wide tiles would fill fewer than two waves of the card).
pub fn gemm_tile_n() -> Option<usize> {
    TILE_N.with(|c| c.get())
}

/// Runs `f` with the wgmma kernels' block-tile width pinned to `tile_n` (128 or 256; None:
/// per product) on this thread, then restores the previous choice. Another width is an error
/// at the first matmul that would use it.
pub fn with_gemm_tile_n<R>(tile_n: Option<usize>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<usize>);
    impl Drop for Restore {
        fn drop(&mut self) {
            TILE_N.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(TILE_N.with(|c| c.replace(tile_n)));
    f()
}

/// The GEMM kernel family matmul uses on this thread.
pub fn gemm_kernel() -> GemmKernel {
    CHOICE.with(|c| c.get())
}

/// Runs `f` with matmul pinned to `kernel` on this thread, then restores the previous choice
/// (also when `f` panics).
pub fn with_gemm_kernel<R>(kernel: GemmKernel, f: impl FnOnce() -> R) -> R {
    struct Restore(GemmKernel);
    impl Drop for Restore {
        fn drop(&mut self) {
            CHOICE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CHOICE.with(|c| c.replace(kernel)));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_errors() {
        for k in GemmKernel::ALL {
            assert_eq!(k.name().parse::<GemmKernel>().unwrap(), k);
        }
        let e = "cublas".parse::<GemmKernel>().unwrap_err().to_string();
        assert!(e.contains("unknown GEMM kernel \"cublas\""), "{e}");
    }

    #[test]
    fn the_tile_width_is_scoped() {
        assert_eq!(gemm_tile_n(), None);
        with_gemm_tile_n(Some(128), || {
            assert_eq!(gemm_tile_n(), Some(128));
            with_gemm_tile_n(None, || assert_eq!(gemm_tile_n(), None));
            assert_eq!(gemm_tile_n(), Some(128));
        });
        assert_eq!(gemm_tile_n(), None);
    }

    #[test]
    fn the_choice_is_scoped_and_per_thread() {
        assert_eq!(gemm_kernel(), GemmKernel::Auto);
        with_gemm_kernel(GemmKernel::Simt, || {
            assert_eq!(gemm_kernel(), GemmKernel::Simt);
            with_gemm_kernel(GemmKernel::Mma, || {
                assert_eq!(gemm_kernel(), GemmKernel::Mma)
            });
            assert_eq!(gemm_kernel(), GemmKernel::Simt);
            // Another thread starts from the default.
            std::thread::spawn(|| assert_eq!(gemm_kernel(), GemmKernel::Auto))
                .join()
                .unwrap();
        });
        assert_eq!(gemm_kernel(), GemmKernel::Auto);
        let caught = std::panic::catch_unwind(|| {
            with_gemm_kernel(GemmKernel::Simt, || panic!("inside"));
        });
        assert!(caught.is_err());
        assert_eq!(gemm_kernel(), GemmKernel::Auto);
    }
}
