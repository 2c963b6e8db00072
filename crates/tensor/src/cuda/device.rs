//! One CUDA device: its context and stream, its architecture, and its loaded kernel modules.

use super::arch::Arch;
use super::cache::PtxCache;
use super::kernels::KernelFile;
use super::nvrtc;
use crate::{Error, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Whether the CUDA driver library (libcuda.so) can be loaded. cudarc panics on its first
/// driver call when it cannot, so [`CudaDevice::new`] checks this before any call.
pub fn driver_available() -> bool {
    // SAFETY: is_culib_present only tries to dlopen the library under its usual names and
    // drops the handle; it calls no function from it.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

fn require_driver(op: &'static str) -> Result<()> {
    if driver_available() {
        Ok(())
    } else {
        Err(Error::cuda(
            op,
            "no CUDA driver library found (libcuda.so): this machine has no NVIDIA driver; \
             use the CPU device",
        ))
    }
}

pub(crate) fn driver_err(
    op: &'static str,
    what: impl std::fmt::Display,
) -> impl FnOnce(DriverError) -> Error {
    let what = what.to_string();
    move |e| Error::cuda(op, format!("{what}: {e:?}"))
}

/// How many CUDA devices the driver sees (an error when there is no driver).
pub fn device_count() -> Result<usize> {
    require_driver("cuda device count")?;
    let n =
        CudaContext::device_count().map_err(driver_err("cuda device count", "cuDeviceGetCount"))?;
    Ok(n.max(0) as usize)
}

/// A CUDA device ready to run the engine's kernels.
///
/// Kernel files are compiled (or read from the PTX cache) and loaded on first use, once per
/// device; later lookups hit the in-memory module table.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    arch: Arch,
    sm_count: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    cache: Option<PtxCache>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("arch", &self.arch)
            .finish()
    }
}

impl CudaDevice {
    /// Opens device `ordinal` with the default PTX cache. Errors, never panics, when there is
    /// no driver library, no such device, or the device is older than sm_80.
    pub fn new(ordinal: usize) -> Result<CudaDevice> {
        CudaDevice::with_cache(ordinal, PtxCache::at_default())
    }

    /// Opens device `ordinal` with an explicit PTX cache (None: compile every time).
    pub fn with_cache(ordinal: usize, cache: Option<PtxCache>) -> Result<CudaDevice> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(Error::cuda(
                "cuda device",
                format!("no CUDA device {ordinal}: the driver sees {count}"),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_err(
            "cuda device",
            format!("creating a context on device {ordinal}"),
        ))?;
        let name = ctx
            .name()
            .map_err(driver_err("cuda device", "cuDeviceGetName"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver_err("cuda device", "compute capability"))?;
        let arch = Arch::native(major.max(0) as u32, minor.max(0) as u32)
            .map_err(|e| Error::cuda("cuda device", format!("device {ordinal} ({name}): {e}")))?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(driver_err("cuda device", "multiprocessor count"))?
            .max(1) as usize;
        let stream = ctx.default_stream();
        Ok(CudaDevice {
            ordinal,
            name,
            arch,
            sm_count,
            ctx,
            stream,
            cache,
            modules: Mutex::new(HashMap::new()),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's marketing name (`NVIDIA H100 80GB HBM3`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The architecture kernels are compiled for: the device's own compute capability, in its
    /// architecture-specific form on 9.0 (sm_90a, see [`Arch::native`]).
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// Streaming multiprocessors (132 on an H100 SXM): how many blocks fill one wave.
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream the engine launches on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The loaded module of kernel file `file` (`"gemm"`), compiling or reading the PTX cache
    /// on first use.
    pub fn module(&self, file: &str) -> Result<Arc<CudaModule>> {
        let kf = KernelFile::find(file)?;
        // A poisoned lock only means another thread panicked mid-insert; the map itself is
        // still a valid cache of loaded modules.
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = modules.get(kf.name) {
            return Ok(m.clone());
        }
        let module = self.load(kf)?;
        modules.insert(kf.name, module.clone());
        Ok(module)
    }

    /// Kernel `entry` of file `file`.
    pub fn function(&self, file: &str, entry: &str) -> Result<CudaFunction> {
        self.module(file)?.load_function(entry).map_err(driver_err(
            "cuda kernel",
            format!("{file}.cu has no kernel {entry:?}"),
        ))
    }

    fn load(&self, kf: KernelFile) -> Result<Arc<CudaModule>> {
        let ptx = kf.ptx(self.arch, self.cache.as_ref())?;
        match self.ctx.load_module(Ptx::from_src(ptx)) {
            Ok(m) => Ok(m),
            // PTX from the cache may come from a newer NVRTC than this driver accepts (the
            // cache can be filled on another machine): compile here and try once more.
            Err(first) if nvrtc::nvrtc_available() => {
                let ptx = kf.compile(self.arch)?;
                let m = self
                    .ctx
                    .load_module(Ptx::from_src(ptx.clone()))
                    .map_err(driver_err(
                        "cuda module",
                        format!(
                            "loading {} for {} (first try: {first:?})",
                            kf.file_name(),
                            self.arch
                        ),
                    ))?;
                if let Some(c) = &self.cache {
                    let _ = c.store(&kf.cache_key(self.arch), &ptx);
                }
                Ok(m)
            }
            Err(e) => Err(driver_err(
                "cuda module",
                format!("loading {} for {}", kf.file_name(), self.arch),
            )(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        // On a machine with a GPU this opens it; everywhere else it must fail cleanly.
        match CudaDevice::new(0) {
            Ok(dev) => assert!(dev.arch() >= Arch::MIN),
            Err(e) => {
                let msg = e.to_string();
                if !driver_available() {
                    assert!(msg.contains("no CUDA driver library found"), "{msg}");
                    assert!(device_count().is_err());
                }
            }
        }
    }

    #[test]
    fn out_of_range_ordinal_is_an_error() {
        let msg = CudaDevice::new(1 << 20).unwrap_err().to_string();
        assert!(
            msg.contains("no CUDA device 1048576") || msg.contains("no CUDA driver library"),
            "{msg}"
        );
    }
}
