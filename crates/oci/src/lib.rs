//! Pure OCI types and validation. No I/O, no async, no HTTP.
//!
//! Everything that crosses a trust boundary (a repository name, a tag, a
//! digest, a manifest) is parsed here into a type that can only hold a valid
//! value, so the layers above never see unvalidated input.

pub mod challenge;
pub mod digest;
pub mod error;
pub mod hash;
pub mod manifest;
pub mod media;
pub mod name;

pub use digest::{Algorithm, Digest, DigestError};
pub use error::ErrorCode;
pub use hash::{Hasher, StateError};
pub use manifest::{Descriptor, Manifest, ManifestError};
pub use name::{NameError, Reference, RepoName, Tag, UploadId};

#[cfg(test)]
mod fuzz_tests;
