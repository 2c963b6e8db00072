//! GPU architectures (compute capabilities) the kernels are compiled for.

use crate::{Error, Result};
use std::fmt;

/// A compute capability, sm_80 or newer: the kernels use bf16 `mma.sync`, `ldmatrix` and
/// `cp.async`, which Ampere introduced.
///
/// NVRTC compiles for the *virtual* architecture (`compute_XY`): the PTX it emits is JIT-compiled
/// by the driver for the card it runs on, and `ptxas -arch=sm_XY` turns the same PTX into machine
/// code for the resource report in `tools/check-kernels`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Arch {
    major: u32,
    minor: u32,
    /// The architecture-specific variant (`sm_90a`): needed for wgmma and setmaxnreg, and PTX
    /// compiled for it loads only on exactly that major.minor.
    specific: bool,
}

impl Arch {
    /// The oldest architecture the kernels support.
    pub const MIN: Arch = Arch {
        major: 8,
        minor: 0,
        specific: false,
    };

    /// A compute capability `major.minor`; an error below 8.0.
    pub fn new(major: u32, minor: u32) -> Result<Arch> {
        let arch = Arch {
            major,
            minor,
            specific: false,
        };
        if arch < Arch::MIN {
            return Err(Error::cuda(
                "cuda arch",
                format!(
                    "compute capability {major}.{minor} is too old: the kernels need sm_80 or \
                     newer (bf16 mma.sync, ldmatrix, cp.async)"
                ),
            ));
        }
        Ok(arch)
    }

    /// The target the engine compiles for on a device of compute capability `major.minor`: the
    /// architecture-specific sm_90a on 9.0 (H100, H200), so that the wgmma kernels exist, else
    /// the generic target. An error below 8.0.
    pub fn native(major: u32, minor: u32) -> Result<Arch> {
        let mut arch = Arch::new(major, minor)?;
        arch.specific = (major, minor) == (9, 0);
        Ok(arch)
    }

    /// Whether kernels compiled for this target have Hopper's warpgroup MMA (wgmma): sm_90a
    /// only (Blackwell's architecture-specific targets drop it).
    pub fn has_wgmma(self) -> bool {
        self.specific && (self.major, self.minor) == (9, 0)
    }

    /// Parses `sm_80`, `sm_90`, `sm_90a`, `compute_86` (the same architecture either way).
    pub fn parse(s: &str) -> Result<Arch> {
        let bad = || {
            Error::cuda(
                "cuda arch",
                format!("cannot parse {s:?}: expected sm_XY, sm_XYa or compute_XY (e.g. sm_90)"),
            )
        };
        let digits = s
            .strip_prefix("sm_")
            .or_else(|| s.strip_prefix("compute_"))
            .ok_or_else(bad)?;
        let (digits, specific) = match digits.strip_suffix('a') {
            Some(d) => (d, true),
            None => (digits, false),
        };
        if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let (major, minor) = digits.split_at(digits.len() - 1);
        let mut arch = Arch::new(
            major.parse().map_err(|_| bad())?,
            minor.parse().map_err(|_| bad())?,
        )?;
        arch.specific = specific;
        Ok(arch)
    }

    /// (major, minor).
    pub fn capability(self) -> (u32, u32) {
        (self.major, self.minor)
    }

    /// Whether this is an architecture-specific target such as sm_90a.
    pub fn is_specific(self) -> bool {
        self.specific
    }

    /// The NVRTC option selecting this architecture's virtual target.
    pub fn nvrtc_option(self) -> String {
        format!("--gpu-architecture=compute_{}", self.suffix())
    }

    /// The name ptxas takes for `-arch` (`sm_90`).
    pub fn sm_name(self) -> String {
        format!("sm_{}", self.suffix())
    }

    fn suffix(self) -> String {
        let a = if self.specific { "a" } else { "" };
        format!("{}{}{a}", self.major, self.minor)
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.sm_name())
    }
}

#[cfg(test)]
mod tests {
    use super::Arch;

    #[test]
    fn parses_names_and_rejects_old_or_malformed() {
        let a = Arch::parse("sm_90").unwrap();
        assert_eq!(a.capability(), (9, 0));
        assert_eq!(a.nvrtc_option(), "--gpu-architecture=compute_90");
        assert_eq!(a.to_string(), "sm_90");
        assert_eq!(Arch::parse("compute_86").unwrap().capability(), (8, 6));
        let s = Arch::parse("sm_90a").unwrap();
        assert!(s.is_specific());
        assert_eq!(s.nvrtc_option(), "--gpu-architecture=compute_90a");
        assert!(s.has_wgmma());
        assert_eq!(Arch::native(9, 0).unwrap(), s);
        assert!(!Arch::parse("sm_90").unwrap().has_wgmma());
        assert!(!Arch::native(8, 0).unwrap().has_wgmma());
        assert!(!Arch::native(8, 0).unwrap().is_specific());
        assert!(!Arch::native(10, 0).unwrap().has_wgmma());
        assert!(Arch::native(7, 5).is_err());
        assert_eq!(Arch::parse("sm_120").unwrap().capability(), (12, 0));
        let old = Arch::parse("sm_75").unwrap_err().to_string();
        assert!(old.contains("7.5 is too old"), "{old}");
        for bad in ["", "sm_", "sm_8", "sm_8x", "gfx90a", "sm_90b", "90"] {
            let e = Arch::parse(bad).unwrap_err().to_string();
            assert!(e.contains("cannot parse"), "{bad}: {e}");
        }
    }
}
