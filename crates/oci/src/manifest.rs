//! Manifest parsing and validation: OCI image manifest and index, Docker
//! schema2 manifest and manifest list, and artifacts (`artifactType`,
//! `subject`). Parsing yields the references the registry must check.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::media;

/// Largest manifest accepted, as the spec recommends (4 MiB).
pub const MAX_MANIFEST_SIZE: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    #[error("manifest is invalid: {0}")]
    Invalid(String),
    #[error("manifest media type {0:?} is not supported: push an OCI image manifest or index, or a Docker schema2 manifest or manifest list")]
    UnsupportedMediaType(String),
}

/// A content descriptor, as it appears in manifests and referrers lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    #[serde(with = "digest_serde")]
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
}

mod digest_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::digest::Digest;

    pub fn serialize<S: Serializer>(d: &Digest, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(d.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The fields of any supported manifest kind. Unknown fields are ignored, as
/// the spec requires; the original bytes are what the registry stores.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
    annotations: Option<BTreeMap<String, String>>,
}

/// A validated manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub media_type: String,
    pub artifact_type: Option<String>,
    pub config: Option<Descriptor>,
    pub layers: Vec<Descriptor>,
    pub manifests: Vec<Descriptor>,
    pub subject: Option<Descriptor>,
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Manifest {
    /// Parses and validates `bytes`. `content_type` is the request's
    /// `Content-Type`, used when the manifest has no `mediaType` field; when
    /// both are present they must agree.
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest, ManifestError> {
        let raw: RawManifest = serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
        // Content-Type parameters (e.g. "; charset=utf-8") are not part of the type.
        let content_type = content_type
            .map(|c| c.split(';').next().unwrap_or("").trim())
            .filter(|c| !c.is_empty());
        let media_type = match (&raw.media_type, content_type) {
            (Some(m), Some(c)) if m != c && media::is_manifest(c) => {
                return Err(ManifestError::Invalid(format!(
                    "mediaType {m:?} does not match Content-Type {c:?}"
                )))
            }
            (Some(m), _) => m.clone(),
            (None, Some(c)) if media::is_manifest(c) => c.to_string(),
            // No usable type: infer it from the shape, as OCI allows.
            (None, _) if raw.manifests.is_some() => media::OCI_INDEX.to_string(),
            (None, _) if raw.config.is_some() => media::OCI_MANIFEST.to_string(),
            (None, c) => return Err(ManifestError::UnsupportedMediaType(c.unwrap_or("(none)").to_string())),
        };
        if !media::is_manifest(&media_type) {
            return Err(ManifestError::UnsupportedMediaType(media_type));
        }
        if raw.schema_version != Some(2) {
            return Err(ManifestError::Invalid("schemaVersion must be 2".into()));
        }
        let is_index = media::is_index(&media_type);
        if is_index {
            if raw.config.is_some() || raw.layers.is_some() {
                return Err(ManifestError::Invalid("an index must not have config or layers".into()));
            }
            let Some(manifests) = &raw.manifests else {
                return Err(ManifestError::Invalid("an index needs a manifests array".into()));
            };
            if let Some(bad) = manifests
                .iter()
                .find(|d| !media::is_manifest(&d.media_type) && media_type == media::DOCKER_MANIFEST_LIST)
            {
                return Err(ManifestError::Invalid(format!(
                    "manifest list entry {} has media type {:?}",
                    bad.digest, bad.media_type
                )));
            }
        } else {
            if raw.manifests.is_some() {
                return Err(ManifestError::Invalid(
                    "an image manifest must not have a manifests array".into(),
                ));
            }
            if raw.config.is_none() {
                return Err(ManifestError::Invalid("an image manifest needs a config".into()));
            }
            if raw.layers.is_none() {
                return Err(ManifestError::Invalid("an image manifest needs a layers array".into()));
            }
        }
        if media_type.starts_with("application/vnd.docker.") && raw.subject.is_some() {
            return Err(ManifestError::Invalid(
                "Docker schema2 manifests cannot carry a subject".into(),
            ));
        }
        Ok(Manifest {
            media_type,
            artifact_type: raw.artifact_type,
            config: raw.config,
            layers: raw.layers.unwrap_or_default(),
            manifests: raw.manifests.unwrap_or_default(),
            subject: raw.subject,
            annotations: raw.annotations,
        })
    }

    pub fn is_index(&self) -> bool {
        media::is_index(&self.media_type)
    }

    /// Blobs the registry must hold for this manifest to be complete: the
    /// config and every distributable layer.
    pub fn required_blobs(&self) -> impl Iterator<Item = &Descriptor> {
        self.config.iter().chain(
            self.layers
                .iter()
                .filter(|l| !media::is_non_distributable(&l.media_type)),
        )
    }

    /// The artifact type reported in a referrers list: `artifactType`, or
    /// for an image manifest without one, the config's media type.
    pub fn effective_artifact_type(&self) -> Option<String> {
        self.artifact_type
            .clone()
            .or_else(|| self.config.as_ref().map(|c| c.media_type.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        Digest::sha256(&[n]).to_string()
    }

    #[test]
    fn image_manifest() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":3}},
                      {{"mediaType":"application/vnd.oci.image.layer.nondistributable.v1.tar+gzip","digest":"{}","size":4}}]}}"#,
            media::OCI_MANIFEST,
            d(1),
            d(2),
            d(3)
        );
        let parsed = Manifest::parse(m.as_bytes(), None).unwrap();
        assert_eq!(parsed.required_blobs().count(), 2);
        assert_eq!(
            parsed.effective_artifact_type().as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
    }

    #[test]
    fn index_and_content_type() {
        let m = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{}","digest":"{}","size":5,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            media::OCI_MANIFEST,
            d(1)
        );
        let parsed = Manifest::parse(m.as_bytes(), Some(media::OCI_INDEX)).unwrap();
        assert!(parsed.is_index());
        assert_eq!(parsed.manifests.len(), 1);
        // A declared type that contradicts the header is refused.
        let with_type = m.replacen('{', &format!(r#"{{"mediaType":"{}","#, media::OCI_INDEX), 1);
        assert!(Manifest::parse(with_type.as_bytes(), Some(media::DOCKER_MANIFEST_LIST)).is_err());
    }

    #[test]
    fn rejects_bad_manifests() {
        for bad in [
            "",
            "[]",
            "{",
            r#"{"schemaVersion":1}"#,
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
            r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v1+prettyjws","config":{}}"#,
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"x","digest":"sha256:bad","size":1},"layers":[]}"#,
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"x","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":-1},"layers":[]}"#,
        ] {
            assert!(Manifest::parse(bad.as_bytes(), None).is_err(), "{bad}");
        }
    }

    /// Found by the manifest fuzzer: a descriptor's platform number must read
    /// back exactly after berth re-serialises it (referrers lists, metadata).
    /// Without serde_json's `float_roundtrip`, 1.0666666666666665e62 came back
    /// one unit in the last place lower.
    #[test]
    fn descriptor_numbers_round_trip_exactly() {
        for number in [
            "1.0666666666666665e+62",
            "0.1",
            "1e-300",
            "123456789012345678901234567890",
            "-0.0",
        ] {
            let json = format!(
                r#"{{"mediaType":"{}","digest":"{}","size":1,"platform":{{"size":{number}}}}}"#,
                media::OCI_MANIFEST,
                d(1)
            );
            let first: Descriptor = serde_json::from_str(&json).unwrap();
            let parsed = first.platform.as_ref().unwrap()["size"].as_f64().unwrap();
            assert_eq!(parsed.to_bits(), number.parse::<f64>().unwrap().to_bits(), "{number}");
            let again: Descriptor = serde_json::from_slice(&serde_json::to_vec(&first).unwrap()).unwrap();
            assert_eq!(again, first, "{number}");
        }
    }
}
