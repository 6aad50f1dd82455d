//! The load loop. Closed loop: each connection sends its next operation as
//! soon as the last one finished, and latency is the operation's own time.
//! Constant rate (`--rate`): operation i is due at start + i/rate, whichever
//! connection takes it, and latency is counted from that due time, so time
//! spent waiting for a free connection (a stalled server) is in the
//! percentiles instead of silently lowering the rate (coordinated omission).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::conn::Conn;
use crate::ops;
use crate::options::Load;
use crate::outcome::Failure;
use crate::plan::Plan;
use crate::rng::Rng;
use crate::stats::Stats;
use crate::target::Target;

pub struct Measured {
    pub stats: Stats,
    /// From the end of warm-up to the last measured completion.
    pub elapsed: Duration,
}

struct Shared {
    start: Instant,
    measure_from: Instant,
    end: Instant,
    interval: Option<Duration>,
    tickets: AtomicU64,
    max: Option<u64>,
    issued: AtomicU64,
    done: AtomicU64,
    stop: AtomicBool,
    timeout: Duration,
}

pub async fn run(target: Arc<Target>, plan: Arc<Plan>, load: &Load, progress: bool) -> Measured {
    let start = Instant::now();
    let measure_from = start + load.warmup;
    let shared = Arc::new(Shared {
        start,
        measure_from,
        end: measure_from + load.duration,
        interval: load.rate.map(|r| Duration::from_secs_f64(1.0 / r)),
        tickets: AtomicU64::new(0),
        max: load.requests,
        issued: AtomicU64::new(0),
        done: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        timeout: load.timeout,
    });
    let bar = progress.then(|| spawn_progress(shared.clone(), load));
    let workers: Vec<_> = (0..load.connections as u64)
        .map(|id| tokio::spawn(worker(id, target.clone(), plan.clone(), shared.clone())))
        .collect();
    let mut stats = Stats::default();
    for w in workers {
        match w.await {
            Ok(s) => stats.merge(s),
            // A panicking worker is a bug; count it rather than lose the run.
            Err(e) => {
                stats.failed += 1;
                *stats
                    .errors
                    .entry(Failure::other(format!("worker crashed: {e}")))
                    .or_default() += 1;
            }
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    if let Some((bar, task)) = bar {
        task.abort();
        bar.finish_and_clear();
    }
    Measured {
        stats,
        elapsed: Instant::now().saturating_duration_since(measure_from),
    }
}

async fn worker(id: u64, target: Arc<Target>, plan: Arc<Plan>, sh: Arc<Shared>) -> Stats {
    let mut conn = Conn::new(target);
    let mut rng = Rng::new(plan.random_seed.wrapping_add(id.wrapping_mul(0x9E37_79B9)));
    let mut stats = Stats::default();
    loop {
        let due = match sh.interval {
            Some(every) => {
                let i = sh.tickets.fetch_add(1, Ordering::Relaxed);
                let due = sh.start + every.mul_f64(i as f64);
                if due >= sh.end {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                due
            }
            None => {
                let now = Instant::now();
                if now >= sh.end {
                    break;
                }
                now
            }
        };
        if sh.stop.load(Ordering::Relaxed) {
            break;
        }
        let measured = due >= sh.measure_from;
        if measured {
            if let Some(max) = sh.max {
                if sh.issued.fetch_add(1, Ordering::Relaxed) >= max {
                    sh.stop.store(true, Ordering::Relaxed);
                    break;
                }
            }
        }
        let scenario = plan.pick(&mut rng);
        let outcome = match tokio::time::timeout(sh.timeout, ops::run(&mut conn, &plan, scenario, &mut rng)).await {
            Ok(o) => o,
            Err(_) => Err(Failure::other("timeout")),
        };
        // A failure without a response may leave the connection mid-message.
        if matches!(&outcome, Err(f) if f.status.is_none()) {
            conn.reset();
        }
        if measured {
            stats.record(due.elapsed(), &outcome);
            sh.done.fetch_add(1, Ordering::Relaxed);
        }
    }
    stats
}

fn spawn_progress(sh: Arc<Shared>, load: &Load) -> (ProgressBar, tokio::task::JoinHandle<()>) {
    let total = load.warmup + load.duration;
    let bar = ProgressBar::with_draw_target(Some(total.as_millis() as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {elapsed:>3} / {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let b = bar.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let now = Instant::now();
            let done = sh.done.load(Ordering::Relaxed);
            let secs = now.saturating_duration_since(sh.measure_from).as_secs_f64();
            let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
            let phase = if now < sh.measure_from {
                "warming up"
            } else {
                "measuring"
            };
            b.set_position(now.saturating_duration_since(sh.start).as_millis() as u64);
            b.set_message(format!(
                "{} s, {phase}: {done} operations, {rate:.0}/s",
                total.as_secs()
            ));
        }
    });
    (bar, task)
}
