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

    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "{context}");
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
            NameError::Digest(DigestError::Invalid(_)) => ErrorCode::DigestInvalid,
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
        RegistryError::internal("accessing blob storage", e)
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
            e => RegistryError::internal("accessing the metadata store", e),
        }
    }
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;
