//! CUDA C++ to PTX with NVRTC, the run-time compiler. Needs only libnvrtc (found with dlopen:
//! the system's, or the pip wheel's through `LD_LIBRARY_PATH`), no GPU and no driver, so CI
//! compiles every kernel on machines without a GPU.

use super::arch::Arch;
use crate::{Error, Result};

/// Whether libnvrtc can be loaded. cudarc panics on its first NVRTC call when it cannot, so
/// every call into NVRTC checks this first.
pub fn nvrtc_available() -> bool {
    // SAFETY: is_culib_present only tries to dlopen the library under its usual names and
    // drops the handle; it calls no function from it.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

fn require_nvrtc(op: &'static str) -> Result<()> {
    if nvrtc_available() {
        Ok(())
    } else {
        Err(Error::cuda(
            op,
            "no NVRTC library found (libnvrtc.so.13): install the CUDA toolkit, or the pip \
             wheel nvidia-cuda-nvrtc==13.0.* and put its nvidia/cu13/lib on LD_LIBRARY_PATH \
             (tools/check-kernels does this)",
        ))
    }
}

/// The NVRTC version, (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    require_nvrtc("nvrtc version")?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); nvrtcVersion writes two ints through the
    // valid pointers it is given.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::cuda(
            "nvrtc version",
            format!("nvrtcVersion: {status:?}"),
        ));
    }
    Ok((major, minor))
}

/// The NVRTC options every kernel is compiled with, for `arch`. They are part of the PTX cache
/// key, so changing them recompiles.
pub fn compile_options(arch: Arch) -> Vec<String> {
    vec![
        arch.nvrtc_option(),
        "--std=c++17".into(),
        // Source line info in the PTX costs nothing at run time and lets profilers map
        // instructions back to kernels/*.cu.
        "--generate-line-info".into(),
    ]
}

/// Compiles CUDA C++ `source` to PTX text for `arch`. `name` names the program in error
/// messages (the file name, e.g. `gemm.cu`). Needs libnvrtc, not a GPU.
///
/// The source must be self-contained: no include paths are passed (see kernels/common.cuh).
/// A compile error returns NVRTC's log.
pub fn compile_ptx(source: &str, name: &str, arch: Arch) -> Result<String> {
    require_nvrtc("nvrtc compile")?;
    if source.contains('\0') {
        // cudarc's CString conversion would panic on an interior NUL.
        return Err(Error::cuda(
            "nvrtc compile",
            format!("{name}: source contains a NUL byte"),
        ));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options: compile_options(arch),
        name: Some(name.to_string()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| {
        let detail = match &e {
            cudarc::nvrtc::CompileError::CompileError { nvrtc, log, .. } => {
                format!("{nvrtc:?}\n{}", log.to_string_lossy())
            }
            other => format!("{other:?}"),
        };
        Error::cuda("nvrtc compile", format!("{name} for {arch}: {detail}"))
    })?;
    Ok(ptx.to_src())
}

/// The kernel entry points (`.entry` names) a PTX module defines, in order.
pub fn ptx_entry_points(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|line| {
            let rest = line.trim_start();
            let rest = rest
                .strip_prefix(".visible .entry ")
                .or_else(|| rest.strip_prefix(".entry "))?;
            let end = rest.find(|c: char| c == '(' || c.is_whitespace())?;
            Some(rest[..end].to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_are_read_from_ptx() {
        let ptx = "//\n.version 9.0\n.target sm_80\n.address_size 64\n\n\
                   .visible .entry binary_add_f32(\n\t.param .u64 p0\n)\n{\n\tret;\n}\n\
                   .func helper()\n{\n}\n\
                   .visible .entry gemm_bf16_nn (\n)\n{\n}\n";
        assert_eq!(ptx_entry_points(ptx), ["binary_add_f32", "gemm_bf16_nn"]);
        assert!(ptx_entry_points("").is_empty());
    }

    #[test]
    fn compile_without_nvrtc_is_an_error_not_a_panic() {
        let arch = Arch::parse("sm_80").unwrap();
        let r = compile_ptx("extern \"C\" __global__ void k() {}", "k.cu", arch);
        if nvrtc_available() {
            let ptx = r.unwrap();
            assert_eq!(ptx_entry_points(&ptx), ["k"]);
        } else {
            let msg = r.unwrap_err().to_string();
            assert!(msg.contains("no NVRTC library found"), "{msg}");
        }
    }

    #[test]
    fn options_select_the_virtual_arch() {
        let o = compile_options(Arch::parse("sm_90").unwrap());
        assert!(o.contains(&"--gpu-architecture=compute_90".to_string()));
    }
}
