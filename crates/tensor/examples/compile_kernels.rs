//! Compiles every kernels/*.cu file through the engine's own NVRTC path (the same code the CUDA
//! device uses at run time) for each `--arch`, and writes the PTX to `--out`:
//! `<out>/<file>.<arch>.ptx`. No GPU needed; libnvrtc must be loadable (tools/check-kernels
//! points LD_LIBRARY_PATH at the pip wheel's copy).
//!
//! ```text
//! cargo run --release -p rlhf-tensor --example compile_kernels -- --arch sm_80 --arch sm_90 --out DIR
//! ```
//!
//! With `--cache DIR`, each PTX is also stored in a PTX cache at DIR under the key the device
//! looks up at run time (`RLHF_PTX_CACHE=DIR`): tools/gpu-check fills one for sm_90 and carries
//! it to the GPU machine, which has no libnvrtc of its own to rely on.
//!
//! Prints one line per file and arch (entry points, PTX size, compile time) and exits non-zero
//! if any file fails to compile or compiles to a module without kernels.

use rlhf_tensor::cuda::{
    nvrtc_version, ptx_entry_points, Arch, KernelFile, PtxCache, KERNEL_FILES,
};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// One compile: the PTX or the error text, and the milliseconds it took.
type Outcome = (Result<String, String>, f64);

struct Args {
    archs: Vec<Arch>,
    out: PathBuf,
    cache: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut archs = Vec::new();
    let mut out = None;
    let mut cache = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--arch" => {
                let v = it.next().ok_or("--arch needs a value (e.g. sm_90)")?;
                archs.push(Arch::parse(&v).map_err(|e| e.to_string())?);
            }
            "--out" => out = Some(PathBuf::from(it.next().ok_or("--out needs a folder")?)),
            "--cache" => cache = Some(PathBuf::from(it.next().ok_or("--cache needs a folder")?)),
            "-h" | "--help" => return Err(
                "usage: compile_kernels --arch sm_80 [--arch sm_90 ...] --out DIR [--cache DIR]"
                    .into(),
            ),
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    if archs.is_empty() {
        return Err("give at least one --arch (e.g. --arch sm_80 --arch sm_90)".into());
    }
    let out = out.ok_or("--out DIR is required")?;
    Ok(Args { archs, out, cache })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("compile_kernels: {e}");
            return ExitCode::from(2);
        }
    };
    let (major, minor) = match nvrtc_version() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("compile_kernels: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        eprintln!("compile_kernels: {}: {e}", args.out.display());
        return ExitCode::FAILURE;
    }
    println!("NVRTC {major}.{minor}; PTX to {}", args.out.display());
    // Every (arch, file) pair is an independent NVRTC program: compile them on all cores (the
    // attention and GEMM files dominate), then report in a fixed order.
    let jobs: Vec<(Arch, KernelFile)> = args
        .archs
        .iter()
        .flat_map(|a| KERNEL_FILES.iter().map(move |k| (*a, *k)))
        .collect();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; jobs.len()]);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..workers.min(jobs.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((arch, kf)) = jobs.get(i) else { break };
                let start = Instant::now();
                let r = kf.compile(*arch).map_err(|e| e.to_string());
                let ms = start.elapsed().as_secs_f64() * 1e3;
                results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some((r, ms));
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut failures = 0;
    for ((arch, kf), result) in jobs.iter().zip(results) {
        let Some((result, ms)) = result else {
            eprintln!("FAIL {} {arch}: not compiled", kf.file_name());
            failures += 1;
            continue;
        };
        match result {
            Ok(ptx) => {
                let entries = ptx_entry_points(&ptx);
                let path = args.out.join(format!("{}.{arch}.ptx", kf.name));
                if entries.is_empty() {
                    eprintln!(
                        "FAIL {} {arch}: PTX has no kernel entry points",
                        kf.file_name()
                    );
                    failures += 1;
                } else if let Err(e) = std::fs::write(&path, &ptx) {
                    eprintln!("FAIL {}: {e}", path.display());
                    failures += 1;
                } else if let Some(Err(e)) = args
                    .cache
                    .as_ref()
                    .map(|dir| PtxCache::new(dir).store(&kf.cache_key(*arch), &ptx))
                {
                    eprintln!("FAIL cache store of {} {arch}: {e}", kf.file_name());
                    failures += 1;
                } else {
                    println!(
                        "ok   {:<22} {arch:<6} {:>3} kernels {:>8} bytes PTX {ms:>8.0} ms",
                        kf.file_name(),
                        entries.len(),
                        ptx.len()
                    );
                }
            }
            Err(e) => {
                eprintln!("FAIL {} {arch} ({ms:.0} ms):\n{e}", kf.file_name());
                failures += 1;
            }
        }
    }
    if failures > 0 {
        eprintln!("compile_kernels: {failures} failure(s)");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
