//! CPU kernels on plain slices, with SIMD picked at run time.
//!
//! Every kernel has a portable scalar path, which is the reference the SIMD paths are tested
//! against, and takes the instruction set explicitly through a `*_with(isa, ..)` variant so tests
//! can run every path on one machine. The engine calls the plain variants, which use [`isa()`]:
//! the best set this CPU has, unless `RLHF_CPU_ISA=scalar|avx2|avx512` or [`force_isa`] says
//! otherwise.

pub mod attention;
pub mod gemm;
pub mod peak;
pub mod pool;
pub mod vec;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// An instruction-set level for the CPU kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust; the reference path.
    Scalar,
    /// AVX2 with FMA (256-bit vectors).
    Avx2,
    /// AVX-512 Foundation (512-bit vectors).
    Avx512,
}

impl Isa {
    /// The best level this CPU supports.
    pub fn detect() -> Isa {
        if Isa::Avx512.is_available() {
            Isa::Avx512
        } else if Isa::Avx2.is_available() {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }

    /// Whether this CPU can run kernels of this level.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every level this CPU can run, scalar first; tests loop over these.
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.is_available())
            .collect()
    }

    /// Parses "scalar", "avx2" or "avx512".
    pub fn parse(s: &str) -> Option<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(Isa::Scalar),
            "avx2" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            _ => None,
        }
    }

    fn code(self) -> u8 {
        match self {
            Isa::Scalar => 1,
            Isa::Avx2 => 2,
            Isa::Avx512 => 3,
        }
    }

    fn from_code(c: u8) -> Option<Isa> {
        match c {
            1 => Some(Isa::Scalar),
            2 => Some(Isa::Avx2),
            3 => Some(Isa::Avx512),
            _ => None,
        }
    }
}

/// 0 = no override; otherwise an `Isa::code`.
static FORCED: AtomicU8 = AtomicU8::new(0);

/// The level the engine's kernels use: a [`force_isa`] override, else `RLHF_CPU_ISA`, else the
/// best available. A requested level this CPU lacks falls back to the best available.
pub fn isa() -> Isa {
    if let Some(forced) = Isa::from_code(FORCED.load(Ordering::Relaxed)) {
        return forced;
    }
    static FROM_ENV: OnceLock<Isa> = OnceLock::new();
    *FROM_ENV.get_or_init(|| {
        let best = Isa::detect();
        match std::env::var("RLHF_CPU_ISA")
            .ok()
            .as_deref()
            .map(Isa::parse)
        {
            Some(Some(wanted)) if wanted.is_available() => wanted,
            Some(Some(wanted)) => {
                eprintln!("RLHF_CPU_ISA={wanted:?} is not supported by this CPU; using {best:?}");
                best
            }
            Some(None) => {
                eprintln!("RLHF_CPU_ISA: expected scalar, avx2 or avx512; using {best:?}");
                best
            }
            None => best,
        }
    })
}

/// Forces every kernel onto `isa` (or back to the default with `None`). Returns an error string
/// when this CPU cannot run the requested level.
pub fn force_isa(isa: Option<Isa>) -> Result<(), String> {
    match isa {
        None => FORCED.store(0, Ordering::Relaxed),
        Some(i) if i.is_available() => FORCED.store(i.code(), Ordering::Relaxed),
        Some(i) => return Err(format!("{i:?} is not supported by this CPU")),
    }
    Ok(())
}
