//! The kernel registry: every kernels/*.cu file, embedded in the binary with `include_str!`, so
//! a built program carries its kernels and needs no source tree at run time.
//!
//! Each file is compiled as one NVRTC program: kernels/common.cuh (the shared prelude), a
//! `#line` directive, then the file. One program per op family keeps compile times short
//! (only the families a run uses are compiled) and names every entry point `extern "C"`.

use super::arch::Arch;
use super::cache::{PtxCache, PtxKey};
use super::nvrtc;
use crate::{Error, Result};

/// The prelude every kernel file is compiled with.
pub const PRELUDE: &str = include_str!("../../../../kernels/common.cuh");

/// One kernels/*.cu file.
#[derive(Clone, Copy, Debug)]
pub struct KernelFile {
    /// The file stem: `gemm` for kernels/gemm.cu.
    pub name: &'static str,
    /// The file's text, as embedded at build time.
    pub source: &'static str,
}

macro_rules! kernel_files {
    ($($name:literal),* $(,)?) => {
        /// Every kernel file, one per op family.
        pub const KERNEL_FILES: &[KernelFile] = &[
            $(KernelFile {
                name: $name,
                source: include_str!(concat!("../../../../kernels/", $name, ".cu")),
            }),*
        ];
    };
}

kernel_files!(
    "elementwise",
    "reduce",
    "softmax",
    "layer_norm",
    "embedding",
    "cross_entropy",
    "gather",
    "adamw",
    "gemm",
    "flash_attention",
);

impl KernelFile {
    /// The file by stem.
    pub fn find(name: &str) -> Result<KernelFile> {
        KERNEL_FILES
            .iter()
            .copied()
            .find(|k| k.name == name)
            .ok_or_else(|| {
                let known: Vec<_> = KERNEL_FILES.iter().map(|k| k.name).collect();
                Error::cuda(
                    "cuda kernels",
                    format!("no kernel file {name:?}; known: {known:?}"),
                )
            })
    }

    /// The file name, for messages (`gemm.cu`).
    pub fn file_name(&self) -> String {
        format!("{}.cu", self.name)
    }

    /// The program NVRTC compiles: prelude, then the file, with `#line` directives so that
    /// compiler messages name common.cuh or the .cu file and the line in it.
    pub fn full_source(&self) -> String {
        format!(
            "#line 1 \"common.cuh\"\n{PRELUDE}\n#line 1 \"{}\"\n{}",
            self.file_name(),
            self.source
        )
    }

    /// The PTX cache key for `arch`.
    pub fn cache_key(&self, arch: Arch) -> PtxKey {
        PtxKey::new(
            self.name,
            arch,
            &self.full_source(),
            &nvrtc::compile_options(arch),
        )
    }

    /// Compiles the file to PTX for `arch` (NVRTC needed, no GPU).
    pub fn compile(&self, arch: Arch) -> Result<String> {
        nvrtc::compile_ptx(&self.full_source(), &self.file_name(), arch)
    }

    /// PTX for `arch`: from `cache` when it holds this exact source, else compiled and stored.
    /// A failed store is not an error (a read-only cache only means compiling again next time).
    pub fn ptx(&self, arch: Arch, cache: Option<&PtxCache>) -> Result<String> {
        let key = self.cache_key(arch);
        if let Some(ptx) = cache.and_then(|c| c.load(&key)) {
            return Ok(ptx);
        }
        let ptx = self.compile(arch)?;
        if let Some(c) = cache {
            let _ = c.store(&key, &ptx);
        }
        Ok(ptx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_is_embedded_with_a_header_and_kernels() {
        assert_eq!(KERNEL_FILES.len(), 10);
        for k in KERNEL_FILES {
            // Each file starts with a comment header naming itself and stating its layouts
            // and launch configuration.
            assert!(
                k.source.starts_with(&format!("// {}.cu:", k.name)),
                "{} lacks its header",
                k.name
            );
            assert!(k.source.contains("Launch"), "{}: no launch notes", k.name);
            assert!(
                k.source.contains("extern \"C\" __global__"),
                "{}: no kernels",
                k.name
            );
            // Self-contained: NVRTC gets no include paths.
            assert!(
                !k.source.contains("#include"),
                "{} includes a header",
                k.name
            );
        }
        assert!(!PRELUDE.contains("#include"));
    }

    #[test]
    fn find_and_source_layout() {
        let g = KernelFile::find("gemm").unwrap();
        let src = g.full_source();
        assert!(src.starts_with("#line 1 \"common.cuh\"\n"));
        assert!(src.contains(PRELUDE));
        assert!(src.contains("\n#line 1 \"gemm.cu\"\n"));
        let e = KernelFile::find("conv").unwrap_err().to_string();
        assert!(e.contains("no kernel file \"conv\""), "{e}");
    }

    #[test]
    fn cache_keys_differ_by_file_and_arch() {
        let (a, b) = (Arch::parse("sm_80").unwrap(), Arch::parse("sm_90").unwrap());
        let g = KernelFile::find("gemm").unwrap();
        let s = KernelFile::find("softmax").unwrap();
        assert_ne!(g.cache_key(a), g.cache_key(b));
        assert_ne!(g.cache_key(a).hash, s.cache_key(a).hash);
        assert_eq!(g.cache_key(a), g.cache_key(a));
    }

    #[test]
    fn ptx_comes_from_the_cache_when_it_holds_the_exact_source() {
        // Without NVRTC the only way to get PTX is the cache, so this exercises the lookup
        // path on any machine: a stored entry is returned as is.
        let dir = tempfile::tempdir().unwrap();
        let cache = PtxCache::new(dir.path());
        let arch = Arch::parse("sm_80").unwrap();
        let g = KernelFile::find("gemm").unwrap();
        cache.store(&g.cache_key(arch), "// stored\n").unwrap();
        assert_eq!(g.ptx(arch, Some(&cache)).unwrap(), "// stored\n");
        if !nvrtc::nvrtc_available() {
            let e = g
                .ptx(Arch::parse("sm_90").unwrap(), Some(&cache))
                .unwrap_err();
            assert!(e.to_string().contains("no NVRTC library found"), "{e}");
        }
    }
}
