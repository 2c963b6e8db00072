//! Kernel time by entry point: where a GPU step spends its time.
//!
//! Between [`start`] and [`stop`], every kernel the engine launches (all of them go through
//! `ops::launch`) is bracketed by two timing events on its stream; [`stop`] waits for them and
//! returns, per entry point, the number of launches and the summed time between each launch's
//! two events (the kernel's run on the device, as the events see it). The sum over entries
//! against the wall time of the same work shows what launch gaps and host work cost.
//!
//! Profiling adds two event records to every launch and, every [`RESOLVE_EVERY`] launches, a
//! wait for the oldest events, so a profiled step runs slower than an unprofiled one: profile
//! a separate step, not the timed ones (`rlhf bench train-step --profile` does so).
//! Process-wide: launches from every thread and device are counted while it is on.

use crate::{Error, Result};
use cudarc::driver::CudaEvent;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Launches whose events are waited for and summed at once, bounding the events held.
pub const RESOLVE_EVERY: usize = 1024;

/// One entry point's share of the profiled work.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    /// The kernel's entry point (`binary_add_bf16`, `gemm_bf16_wgmma_tma`, ...).
    pub entry: String,
    /// Launches while profiling was on.
    pub calls: u64,
    /// Summed milliseconds between each launch's start and end events.
    pub ms: f64,
}

struct State {
    pending: Vec<(String, CudaEvent, CudaEvent)>,
    totals: BTreeMap<String, (u64, f64)>,
}

static ON: AtomicBool = AtomicBool::new(false);
static STATE: Mutex<State> = Mutex::new(State {
    pending: Vec::new(),
    totals: BTreeMap::new(),
});

fn state() -> std::sync::MutexGuard<'static, State> {
    // A panic while holding the lock leaves plain data (event lists, sums): still usable.
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether launches are being profiled now.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Starts profiling, from empty totals.
pub fn start() {
    let mut s = state();
    s.pending.clear();
    s.totals.clear();
    ON.store(true, Ordering::Relaxed);
}

/// Stops profiling and returns each entry point's launches and time, the most time first
/// (ties by name). Waits for the device to finish the profiled launches.
pub fn stop() -> Result<Vec<KernelTime>> {
    ON.store(false, Ordering::Relaxed);
    let mut s = state();
    resolve(&mut s)?;
    let mut out: Vec<KernelTime> = std::mem::take(&mut s.totals)
        .into_iter()
        .map(|(entry, (calls, ms))| KernelTime { entry, calls, ms })
        .collect();
    out.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.entry.cmp(&b.entry)));
    Ok(out)
}

/// Records one launch's (start, end) events under `entry` (called by `ops::launch`).
pub(crate) fn record(entry: &str, events: (CudaEvent, CudaEvent)) -> Result<()> {
    let mut s = state();
    s.pending.push((entry.to_string(), events.0, events.1));
    if s.pending.len() >= RESOLVE_EVERY {
        resolve(&mut s)?;
    }
    Ok(())
}

/// Waits for every pending launch's events and adds their times to the totals.
fn resolve(s: &mut State) -> Result<()> {
    for (entry, a, b) in std::mem::take(&mut s.pending) {
        let ms = a
            .elapsed_ms(&b)
            .map_err(|e| Error::cuda("profile", format!("timing {entry}: {e:?}")))?;
        let t = s.totals.entry(entry).or_insert((0, 0.0));
        t.0 += 1;
        t.1 += f64::from(ms);
    }
    Ok(())
}
