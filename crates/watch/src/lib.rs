//! `berth watch`: the deployment guard (design.md 2.9, issue 15).
//!
//! - [`spec`]: the deployment description (TOML), validated with file, line
//!   and key in every error;
//! - [`engine`]: the container backend trait and its Docker Engine client;
//! - [`swarm`]: Docker Swarm services, updated, watched and rolled back by
//!   berth;
//! - `kubernetes` (feature `kubernetes`): Deployments, watched through their
//!   ReplicaSets, Pods and Events, paused and rolled back with patches;
//! - [`rollout`]: deploy by digest beside the old version, gate, switch,
//!   verify, roll back;
//! - [`classify`]: failure classes from the Engine's errors and the
//!   containers' states, and the pull-failure diagnosis hook;
//! - [`health`]: one check of the guide's health JSON;
//! - [`store`]: durable history and service state (redb);
//! - [`notify`]: Alertmanager alerts and CloudEvents;
//! - [`report`]: status, history and the monthly review as text.

pub mod canary;
pub mod classify;
pub mod engine;
pub mod guard;
pub mod health;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod metrics;
pub mod notify;
pub mod prometheus;
pub mod recover;
pub mod report;
pub mod rollout;
pub mod spec;
pub mod store;
pub mod swarm;

pub use classify::{Cause, Diagnosis, Failure, FromEngineError, PullDiagnoser};
pub use engine::{Docker, Engine, EngineError};
pub use rollout::{Guard, WatchError};
pub use spec::{Spec, SpecError};
pub use store::{Deployment, Outcome, ServiceState, Store, StoreError};
