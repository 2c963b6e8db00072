//! Which GEMM kernel `matmul` launches on a GPU.
//!
//! kernels/gemm.cu has four families: `gemm_tma_*` (Hopper warpgroup MMA fed by the TMA unit
//! from a producer warpgroup) and `gemm_wgmma_*` (the same MMAs fed by cp.async from every
//! thread), both compiled only for sm_90a; `gemm_bf16_*` (mma.sync tensor cores, sm_80 and
//! newer) and `gemm_simt_*` (plain FMA, any strides and dtypes). By default matmul takes the
//! one designed to be fastest that accepts the operands.
//! Benchmarks and tests pin a family with [`with_gemm_kernel`] to measure or check each against
//! the others on the same card; the choice is per thread (matmul launches from the calling
//! thread), so tests running in parallel do not see each other's choice. A thread that pins
//! nothing uses the process default, `RLHF_GEMM_KERNEL` (`auto` when unset): a way to route
//! every product of a run around a family that misbehaves on some card, with no rebuild.

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

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
    /// The family pinned on this thread (None: the process default).
    static CHOICE: Cell<Option<GemmKernel>> = const { Cell::new(None) };
    static TILE_N: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The environment variable naming the process's default GEMM family (`auto`, `tma`, `wgmma`,
/// `mma` or `simt`), read once, at the first product.
pub const GEMM_KERNEL_ENV: &str = "RLHF_GEMM_KERNEL";

/// The family `value` (the contents of [`GEMM_KERNEL_ENV`]; unset or empty: auto) names.
pub fn parse_default_gemm_kernel(value: Option<&str>) -> Result<GemmKernel> {
    default_from(value).map_err(|e| Error::cuda("gemm kernel", e))
}

fn default_from(value: Option<&str>) -> std::result::Result<GemmKernel, String> {
    match value.map(str::trim) {
        None | Some("") => Ok(GemmKernel::Auto),
        Some(v) => v.parse().map_err(|_| {
            format!("{GEMM_KERNEL_ENV}={v:?}: expected auto, tma, wgmma, mma or simt")
        }),
    }
}

fn process_default() -> Result<GemmKernel> {
    static DEFAULT: OnceLock<std::result::Result<GemmKernel, String>> = OnceLock::new();
    DEFAULT
        .get_or_init(|| default_from(std::env::var(GEMM_KERNEL_ENV).ok().as_deref()))
        .clone()
        .map_err(|e| Error::cuda("gemm kernel", e))
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

/// The GEMM kernel family matmul uses on this thread: the one pinned by [`with_gemm_kernel`],
/// else the process default ([`GEMM_KERNEL_ENV`]); an unknown name there is an error.
pub fn gemm_kernel() -> Result<GemmKernel> {
    match CHOICE.with(|c| c.get()) {
        Some(k) => Ok(k),
        None => process_default(),
    }
}

/// Runs `f` with matmul pinned to `kernel` on this thread, then restores the previous choice
/// (also when `f` panics).
pub fn with_gemm_kernel<R>(kernel: GemmKernel, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<GemmKernel>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CHOICE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CHOICE.with(|c| c.replace(Some(kernel))));
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
        // The unpinned choice is the process default (RLHF_GEMM_KERNEL, unset in tests).
        let default = gemm_kernel().unwrap();
        with_gemm_kernel(GemmKernel::Simt, || {
            assert_eq!(gemm_kernel().unwrap(), GemmKernel::Simt);
            with_gemm_kernel(GemmKernel::Mma, || {
                assert_eq!(gemm_kernel().unwrap(), GemmKernel::Mma)
            });
            assert_eq!(gemm_kernel().unwrap(), GemmKernel::Simt);
            // Another thread starts from the default.
            std::thread::spawn(move || assert_eq!(gemm_kernel().unwrap(), default))
                .join()
                .unwrap();
        });
        assert_eq!(gemm_kernel().unwrap(), default);
        let caught = std::panic::catch_unwind(|| {
            with_gemm_kernel(GemmKernel::Simt, || panic!("inside"));
        });
        assert!(caught.is_err());
        assert_eq!(gemm_kernel().unwrap(), default);
    }

    #[test]
    fn the_process_default_comes_from_the_environment_value() {
        assert_eq!(parse_default_gemm_kernel(None).unwrap(), GemmKernel::Auto);
        assert_eq!(
            parse_default_gemm_kernel(Some(" ")).unwrap(),
            GemmKernel::Auto
        );
        assert_eq!(
            parse_default_gemm_kernel(Some("wgmma")).unwrap(),
            GemmKernel::Wgmma
        );
        let e = parse_default_gemm_kernel(Some("cublas"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("RLHF_GEMM_KERNEL=\"cublas\""), "{e}");
        assert!(e.contains("expected auto, tma, wgmma, mma or simt"), "{e}");
    }
}
