//! The runtime for background maintenance inside `berth serve`: scheduled
//! retention and garbage collection, and cache eviction.
//!
//! Why a runtime of its own: maintenance is CPU and disk work that no
//! client waits for, so it must never make a pull wait. Its threads (one
//! worker, and the blocking pool that lists and deletes files) run under
//! `SCHED_IDLE` with the lowest best-effort I/O priority: the kernel
//! preempts them the moment a serving thread wakes up. Nice 19 was not
//! enough: a woken thread still waited for a nice-19 thread to finish its
//! time slice (about a millisecond), which showed in the pulls' p99 (+57 %
//! while GC ran, against +10 % allowed).
//!
//! The metadata store's transactions do not run here: the store runs them
//! on the serving runtime (`RedbMetadata::on_runtime`), so a sweep never
//! holds the single writer, which pushes wait for, at idle priority.

use tokio::runtime::{Builder, Runtime};

/// Builds the maintenance runtime. Keep the returned runtime alive for as
/// long as its tasks should run; spawn on its `handle()`.
pub fn runtime() -> std::io::Result<Runtime> {
    Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(4)
        .thread_name("berth-maint")
        .on_thread_start(lower_priority)
        .enable_all()
        .build()
}

/// Lowers the calling thread's CPU and I/O priority. Best effort: where the
/// calls are refused, maintenance runs at normal priority and still
/// throttles itself (`--gc-batch`, `--gc-pause-ms`).
#[cfg(target_os = "linux")]
fn lower_priority() {
    const IOPRIO_WHO_PROCESS: libc::c_int = 1;
    const IOPRIO_CLASS_BE: libc::c_int = 2;
    const IOPRIO_CLASS_SHIFT: libc::c_int = 13;
    const LOWEST_BE_LEVEL: libc::c_int = 7;
    // SAFETY: both calls only change the scheduling attributes of the
    // calling thread (Linux keeps the policy and I/O priority per thread).
    unsafe {
        let tid = libc::gettid();
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower the maintenance thread's CPU priority");
        }
        let prio = (IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | LOWEST_BE_LEVEL;
        if libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, tid, prio) != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower the maintenance thread's I/O priority");
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn maintenance_threads_run_at_idle_priority() {
        let before = policy();
        let rt = super::runtime().unwrap();
        // A worker thread and a blocking-pool thread both start lowered.
        let worker = rt.block_on(async { tokio::spawn(async { policy() }).await.unwrap() });
        let blocking = rt.block_on(async { tokio::task::spawn_blocking(policy).await.unwrap() });
        assert_eq!((worker, blocking), (libc::SCHED_IDLE, libc::SCHED_IDLE));
        // The calling thread is not touched.
        assert_eq!(policy(), before);
    }

    #[cfg(target_os = "linux")]
    fn policy() -> i32 {
        // SAFETY: reads the calling thread's scheduling policy.
        unsafe { libc::sched_getscheduler(libc::gettid()) }
    }
}
