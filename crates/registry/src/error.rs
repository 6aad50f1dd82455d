//! The service's error: an OCI error code plus a message for the client.
//! Backend failures become `UNKNOWN` with a generic message; the detail goes
//! to the log, never to the client.

use oci::{DigestError, ErrorCode, ManifestError, NameError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct RegistryError {
    pub code: ErrorCode,
    pub message: String,
    /// The digest, name or similar the error is about, for the error detail.
    pub detail: Option<String>,
}

impl RegistryError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RegistryError {
            code,
            message: message.into(),
            detail: None,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// A failure of ours: the error and its sources go to the log, the
    /// client gets a generic message.
    pub fn internal(context: &str, err: impl std::error::Error) -> Self {
        tracing::error!(error = %metadata::error_chain(&err), "{context}");
        RegistryError::new(
            ErrorCode::Internal,
            format!("internal error while {context}; the server log has the details"),
        )
    }
}

impl From<NameError> for RegistryError {
    fn from(e: NameError) -> Self {
        let code = match &e {
            NameError::Name(_) => ErrorCode::NameInvalid,
            NameError::Tag(_) => ErrorCode::TagInvalid,
            NameError::Upload(_) => ErrorCode::BlobUploadUnknown,
            NameError::Digest(DigestError::Unsupported(_)) => ErrorCode::Unsupported,
            NameError::Digest(DigestError::Invalid(_) | DigestError::InvalidAlgorithm(_)) => ErrorCode::DigestInvalid,
        };
        RegistryError::new(code, e.to_string())
    }
}

impl From<DigestError> for RegistryError {
    fn from(e: DigestError) -> Self {
        NameError::Digest(e).into()
    }
}

impl From<ManifestError> for RegistryError {
    fn from(e: ManifestError) -> Self {
        RegistryError::new(ErrorCode::ManifestInvalid, e.to_string())
    }
}

impl From<storage::StorageError> for RegistryError {
    fn from(e: storage::StorageError) -> Self {
        match e {
            storage::StorageError::Input(e) => RegistryError::body(&e),
            e => RegistryError::internal("accessing blob storage", e),
        }
    }
}

impl RegistryError {
    /// A request body that could not be read: a malformed chunked encoding,
    /// a body cut short, or one that stopped arriving (the idle timeout).
    /// The client's doing, so a 4xx that says what happened, logged as such
    /// rather than as a failure of ours.
    pub fn body(e: &std::io::Error) -> Self {
        let why = metadata::error_chain(e);
        if e.kind() == std::io::ErrorKind::TimedOut {
            tracing::warn!(reason = %why, "a request body stopped arriving");
            RegistryError::new(
                ErrorCode::BodyTimeout,
                format!("the request body stopped arriving ({why}); an upload keeps what arrived: GET its location for the offset and send the rest from there"),
            )
        } else {
            tracing::info!(reason = %why, "a request body could not be read");
            RegistryError::new(
                ErrorCode::BlobUploadInvalid,
                format!("the request body could not be read ({why}); an upload keeps what arrived: GET its location for the offset and send the rest from there"),
            )
        }
    }
}

impl From<metadata::MetaError> for RegistryError {
    fn from(e: metadata::MetaError) -> Self {
        match e {
            // GC claimed the bytes as they were written (see `gc`): nothing
            // was recorded, and writing them again succeeds.
            metadata::MetaError::Conflict(metadata::Conflict::Fenced(d)) => RegistryError::new(
                ErrorCode::Unavailable,
                format!(
                    "{d} was being removed by garbage collection as it was written; nothing was stored, push it again"
                ),
            )
            .with_detail(d.to_string()),
            metadata::MetaError::Retryable(e) => {
                tracing::warn!(error = %metadata::error_chain(e.as_ref()), "the metadata store is unavailable");
                RegistryError::new(
                    ErrorCode::Unavailable,
                    "the metadata store is unavailable; nothing was changed, try again",
                )
            }
            e => RegistryError::internal("accessing the metadata store", e),
        }
    }
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use metadata::MetaError;

    #[test]
    fn metadata_failures_reach_clients_without_the_backend_text() {
        let backend = || Box::new(std::io::Error::other("disk on fire under /var/lib/secret"));
        let e = MetaError::Backend(backend());
        assert!(metadata::error_chain(&e).ends_with("disk on fire under /var/lib/secret"));
        let r: RegistryError = e.into();
        assert_eq!(r.code, ErrorCode::Internal);
        assert!(
            !r.message.contains("fire") && !r.message.contains("secret"),
            "{}",
            r.message
        );
        let r: RegistryError = MetaError::Retryable(backend()).into();
        assert_eq!(r.code, ErrorCode::Unavailable);
        assert!(!r.message.contains("fire"), "{}", r.message);
        assert!(r.message.contains("try again"), "{}", r.message);
    }
}
