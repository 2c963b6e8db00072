//! One CUDA device: its context and stream, its architecture, and its loaded kernel modules.

use super::arch::Arch;
use super::cache::PtxCache;
use super::kernels::KernelFile;
use super::nvrtc;
use crate::{Error, Result};
use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};
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
    /// The stream-ordered allocator's pool (None where the device has none: cudarc then
    /// allocates synchronously).
    pool: Option<MemPool>,
    modules: Mutex<HashMap<&'static str, Loaded>>,
}

/// A loaded kernel file and the functions looked up in it so far: a launch's lookup is a map
/// probe, not a `cuModuleGetFunction` and a C string.
struct Loaded {
    module: Arc<CudaModule>,
    functions: HashMap<String, CudaFunction>,
}

/// The device's current memory pool, the one `cuMemAllocAsync` on the engine's stream draws
/// from.
#[derive(Clone, Copy)]
struct MemPool(sys::CUmemoryPool);

// SAFETY: a CUmemoryPool is a driver handle, valid in any thread of the process; the driver
// serialises the pool calls made through it.
unsafe impl Send for MemPool {}
unsafe impl Sync for MemPool {}

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
        // SAFETY: the engine launches every kernel, copy and allocation of a device on that
        // device's one stream (storage.rs), so stream order alone orders each read after the
        // write it depends on. cudarc's per-buffer events (two created per allocation, recorded
        // on every use) only synchronise several streams; with one they are pure overhead.
        // Called before the first allocation, as cudarc requires.
        unsafe { ctx.disable_event_tracking() };
        let pool = if ctx.has_async_alloc() {
            Some(keep_freed_memory(&ctx).map_err(driver_err(
                "cuda device",
                format!("device {ordinal}: configuring the memory pool"),
            ))?)
        } else {
            None
        };
        let stream = ctx.default_stream();
        Ok(CudaDevice {
            ordinal,
            name,
            arch,
            sm_count,
            ctx,
            stream,
            cache,
            pool,
            modules: Mutex::new(HashMap::new()),
        })
    }

    /// Free and total device memory in bytes (`cuMemGetInfo`). Memory the pool keeps for reuse
    /// counts as used, as PyTorch's reserved memory does.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.ctx
            .bind_to_thread()
            .map_err(driver_err("cuda memory info", "binding the context"))?;
        result::mem_get_info().map_err(driver_err("cuda memory info", "cuMemGetInfo"))
    }

    /// Gives the memory the pool holds but no buffer uses back to the driver, after the
    /// stream's pending work (which may still free buffers) is done. The allocator calls it
    /// once on running out of memory before it tries again: memory freed by the engine stays
    /// in the pool (see [`keep_freed_memory`]) and could otherwise be what is missing.
    pub fn release_cached_memory(&self) -> Result<()> {
        let Some(pool) = self.pool else {
            return Ok(());
        };
        self.stream.synchronize().map_err(driver_err(
            "cuda alloc",
            "synchronising before trimming the pool",
        ))?;
        // SAFETY: the pool is the device's current pool, valid while the context lives
        // (self.ctx keeps it alive).
        unsafe { result::mem_pool::trim_to(pool.0, 0) }
            .map_err(driver_err("cuda alloc", "cuMemPoolTrimTo"))
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
        Ok(self.loaded(&mut modules, kf)?.module.clone())
    }

    /// Kernel `entry` of file `file` (looked up in the module once, then from memory).
    pub fn function(&self, file: &str, entry: &str) -> Result<CudaFunction> {
        let kf = KernelFile::find(file)?;
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        let loaded = self.loaded(&mut modules, kf)?;
        if let Some(f) = loaded.functions.get(entry) {
            return Ok(f.clone());
        }
        let f = loaded.module.load_function(entry).map_err(driver_err(
            "cuda kernel",
            format!("{file}.cu has no kernel {entry:?}"),
        ))?;
        loaded.functions.insert(entry.to_string(), f.clone());
        Ok(f)
    }

    /// The entry of `modules` for `kf`, loading the file on first use.
    fn loaded<'m>(
        &self,
        modules: &'m mut HashMap<&'static str, Loaded>,
        kf: KernelFile,
    ) -> Result<&'m mut Loaded> {
        Ok(match modules.entry(kf.name) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(Loaded {
                module: self.load(kf)?,
                functions: HashMap::new(),
            }),
        })
    }

    /// Runs `call`, a driver call that may need device memory; when the driver runs out of
    /// memory, trims the pool (it may hold most of the card, see [`keep_freed_memory`]) and
    /// runs it once more. A failed trim leaves the first error to report.
    pub(crate) fn retry_after_trim<T>(
        &self,
        call: impl Fn() -> std::result::Result<T, DriverError>,
    ) -> std::result::Result<T, DriverError> {
        match call() {
            Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY => {
                if self.release_cached_memory().is_err() {
                    return Err(e);
                }
                call()
            }
            r => r,
        }
    }

    /// Loads PTX as a module (the driver JIT-compiles it for the card), through
    /// [`CudaDevice::retry_after_trim`].
    fn load_ptx(&self, ptx: &str) -> std::result::Result<Arc<CudaModule>, DriverError> {
        self.retry_after_trim(|| self.ctx.load_module(Ptx::from_src(ptx)))
    }

    fn load(&self, kf: KernelFile) -> Result<Arc<CudaModule>> {
        let ptx = kf.ptx(self.arch, self.cache.as_ref())?;
        match self.load_ptx(&ptx) {
            Ok(m) => Ok(m),
            // PTX from the cache may come from a newer NVRTC than this driver accepts (the
            // cache can be filled on another machine): compile here and try once more.
            Err(first) if nvrtc::nvrtc_available() => {
                let ptx = kf.compile(self.arch)?;
                let m = self.load_ptx(&ptx).map_err(driver_err(
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

/// Makes the device's memory pool keep the memory its buffers free instead of handing
/// it back to the driver at every synchronisation (the pool's default release threshold is 0),
/// so that a training step's allocations after the first are served from the pool, as a
/// caching allocator serves PyTorch's. [`CudaDevice::release_cached_memory`] trims it when an
/// allocation runs out of memory.
fn keep_freed_memory(ctx: &CudaContext) -> std::result::Result<MemPool, DriverError> {
    // SAFETY: ctx.cu_device() is a device handle from cuDeviceGet (the context was created on
    // it); the release threshold attribute takes a pointer to a u64, which `keep` is.
    unsafe {
        // The device's current pool, the one cuMemAllocAsync draws from (the default pool
        // unless something in the process set another).
        let pool = result::device::get_mem_pool(ctx.cu_device())?;
        let mut keep = u64::MAX;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut keep as *mut u64).cast(),
        )?;
        Ok(MemPool(pool))
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
