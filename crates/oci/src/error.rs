//! The error codes of the OCI Distribution Spec, with the HTTP status each
//! maps to. The HTTP layer turns these into the spec's JSON error body.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    /// Not in the spec's table, but used by every registry for a bad tag.
    TagInvalid,
    /// A `Range` or `Content-Range` that does not fit (status 416).
    RangeInvalid,
    /// Content too large, e.g. a manifest above the size limit (status 413).
    SizeTooLarge,
    /// A request body that stopped arriving for longer than the client
    /// timeout (status 408). The spec has no code for it: `BLOB_UPLOAD_INVALID`.
    BodyTimeout,
    /// A path that is no registry endpoint, or an unknown admin object (404).
    NotFound,
    /// Admin API: the object already exists (409).
    Conflict,
    /// Admin API: a malformed request (400).
    Invalid,
    /// A server-side failure; the message never leaks internals.
    Internal,
    /// The server cannot serve right now (storage unavailable).
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::TagInvalid => "TAG_INVALID",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::SizeTooLarge => "SIZE_INVALID",
            ErrorCode::BodyTimeout => "BLOB_UPLOAD_INVALID",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::Invalid => "INVALID",
            ErrorCode::Internal => "UNKNOWN",
            ErrorCode::Unavailable => "UNAVAILABLE",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BlobUnknown
            | ErrorCode::BlobUploadUnknown
            | ErrorCode::ManifestUnknown
            | ErrorCode::NameUnknown
            | ErrorCode::NotFound => 404,
            ErrorCode::BlobUploadInvalid
            | ErrorCode::DigestInvalid
            | ErrorCode::ManifestBlobUnknown
            | ErrorCode::ManifestInvalid
            | ErrorCode::NameInvalid
            | ErrorCode::SizeInvalid
            | ErrorCode::TagInvalid
            | ErrorCode::Invalid => 400,
            ErrorCode::Conflict => 409,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Denied => 403,
            ErrorCode::Unsupported => 405,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::RangeInvalid => 416,
            ErrorCode::SizeTooLarge => 413,
            ErrorCode::BodyTimeout => 408,
            ErrorCode::Internal => 500,
            ErrorCode::Unavailable => 503,
        }
    }
}
