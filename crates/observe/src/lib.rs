//! What berth knows about itself: Prometheus metrics, background health
//! checks, readiness, and the disk and process figures behind them. No HTTP
//! here: `api` serves `/metrics`, `/healthz`, `/livez` and `/readyz` from
//! these values.

pub mod disk;
pub mod health;
pub mod metrics;
mod process;
pub mod proxy_metrics;
pub mod size;
pub mod time;
pub mod trace;

pub use health::{Checks, Health, HealthConfig, NotReady};
pub use metrics::{FailureReason, Method, Metrics, RouteKind};
pub use trace::TraceContext;
