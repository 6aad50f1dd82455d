//! Access control, without HTTP: who is calling (`login`, `verify`), what
//! they may do (`policy`), the tokens that carry it (`token`), the accounts
//! (`admin`), and the record of it all (`audit`).
//!
//! Invariants:
//! - a decision is made from the identity store at the time of the request
//!   or from a token signed by this registry's key, never from anything the
//!   client asserts unsigned;
//! - passwords and robot secrets are stored only as argon2id hashes;
//! - a token never grants more than the policy allowed when it was issued.

pub mod admin;
pub mod audit;
pub mod limiter;
pub mod password;
pub mod policy;
pub mod scope;
pub mod service;
pub mod token;

pub use policy::{Action, Principal};
pub use service::{Auth, AuthConfig, AuthError};

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
