//! What one operation yields: bytes moved and HTTP requests made, or a
//! failure grouped by HTTP status and OCI error code.

use std::fmt::Display;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Done {
    /// Body bytes received (GET) or sent (push).
    pub bytes: u64,
    /// HTTP requests the operation made (a pull makes several).
    pub requests: u32,
}

impl Done {
    pub fn one(bytes: u64) -> Done {
        Done { bytes, requests: 1 }
    }

    pub fn add(self, other: Done) -> Done {
        Done {
            bytes: self.bytes + other.bytes,
            requests: self.requests + other.requests,
        }
    }
}

/// A failed operation. `status` is `None` when no HTTP response came back
/// (connect error, timeout, reset); `code` is the OCI error code of the body
/// or a short description.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Failure {
    pub status: Option<u16>,
    pub code: String,
}

impl Failure {
    pub fn status(status: u16, code: impl Into<String>) -> Failure {
        Failure {
            status: Some(status),
            code: code.into(),
        }
    }

    pub fn other(code: impl Into<String>) -> Failure {
        Failure {
            status: None,
            code: code.into(),
        }
    }

    pub fn transport(what: &str, e: impl Display) -> Failure {
        Failure::other(format!("{what}: {e}"))
    }
}

impl Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.status, self.code.is_empty()) {
            (Some(s), true) => write!(f, "HTTP {s}"),
            (Some(s), false) => write!(f, "HTTP {s} {}", self.code),
            (None, _) => write!(f, "{}", self.code),
        }
    }
}

pub type Outcome = Result<Done, Failure>;
