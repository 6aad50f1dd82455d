//! Where the blobs live (`--storage`, `BERTH_STORAGE`, the config file's
//! `storage`): the data directory (the default), or an S3 bucket,
//! `s3://BUCKET[/PREFIX][?endpoint=URL&region=REGION]`, and the credentials
//! for it (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` /
//! `AWS_SESSION_TOKEN`, or a credentials file given with
//! `--storage-credentials`). Parsed and checked here, without the `s3`
//! feature too, so a malformed URL is refused at start with the flag named
//! and a build without S3 says how to get it.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::Args;

/// The flag, for messages.
const FLAG: &str = "--storage";

/// `--storage` and `--storage-credentials` for the offline commands that
/// open the blobs (`gc`, `retention`, `fsck`, `du`), as for `berth serve`.
#[derive(Args, Debug, Clone, Default)]
pub struct StorageArgs {
    /// Where the blobs are: `fs` (the data directory, the default) or an S3
    /// bucket, `s3://BUCKET[/PREFIX][?endpoint=URL&region=REGION]`, as for
    /// `berth serve`.
    #[arg(long, env = "BERTH_STORAGE", value_name = "URL")]
    pub storage: Option<String>,
    /// An AWS credentials file for the bucket, as for `berth serve`.
    /// [default: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY]
    #[arg(long, env = "BERTH_STORAGE_CREDENTIALS", value_name = "FILE")]
    pub storage_credentials: Option<PathBuf>,
}

impl StorageArgs {
    pub fn location(&self) -> Result<StorageLocation, String> {
        self.storage.as_deref().unwrap_or("").parse()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StorageLocation {
    /// `blobs/` and `uploads/` in the data directory.
    #[default]
    DataDir,
    S3(S3Location),
}

/// An S3 bucket, from `s3://...`. It holds no secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Without leading or trailing `/`; empty for the bucket's root.
    pub prefix: String,
    /// `http(s)://host[:port]` of an S3-compatible server; `None` for AWS.
    pub endpoint: Option<String>,
    pub region: String,
}

impl std::fmt::Display for S3Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}", self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        match &self.endpoint {
            Some(e) => write!(f, " at {e}"),
            None => write!(f, " (AWS, {})", self.region),
        }
    }
}

const USAGE: &str = "write s3://BUCKET[/PREFIX][?endpoint=http://HOST:PORT&region=REGION], or fs for the data \
                     directory";

fn bad(what: String) -> String {
    format!("{FLAG}: {what}; {USAGE}")
}

/// S3's rules for bucket names: 3 to 63 lowercase letters, digits, dots
/// and hyphens, starting and ending with a letter or digit.
fn check_bucket(b: &str) -> Result<(), String> {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok = (3..=63).contains(&b.len())
        && b.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && edge(b.chars().next())
        && edge(b.chars().last());
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "{b:?} is not a bucket name (3 to 63 lowercase letters, digits, '.' and '-')"
        )))
    }
}

/// Key prefixes are path segments of letters, digits, '.', '_' and '-'.
fn check_prefix(p: &str) -> Result<(), String> {
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    if p.is_empty() || p.split('/').all(segment_ok) {
        Ok(())
    } else {
        Err(bad(format!(
            "the key prefix {p:?} is not path segments of letters, digits, '.', '_' and '-'"
        )))
    }
}

/// `http(s)://host[:port]`, nothing else: no user, path or query.
fn check_endpoint(e: &str) -> Result<String, String> {
    let e = e.trim_end_matches('/');
    let rest = e
        .strip_prefix("http://")
        .or_else(|| e.strip_prefix("https://"))
        .ok_or_else(|| bad(format!("endpoint {e:?} must start with http:// or https://")))?;
    if rest.contains('@') {
        return Err(bad(
            "the endpoint must not hold credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or pass \
             --storage-credentials FILE"
                .into(),
        ));
    }
    if rest.is_empty() || rest.contains(['/', '?', '#']) {
        return Err(bad(format!(
            "endpoint {e:?} must be just http(s)://HOST[:PORT] (no user, path or query)"
        )));
    }
    Ok(e.to_string())
}

impl FromStr for StorageLocation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() || s == "fs" {
            return Ok(StorageLocation::DataDir);
        }
        let Some(rest) = s.strip_prefix("s3://") else {
            let scheme = s.split_once("://").map_or(s, |(scheme, _)| scheme);
            return Err(bad(format!("{scheme:?} is neither fs nor an s3:// URL")));
        };
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.contains('@') {
            return Err(bad(
                "credentials do not go in the URL: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or pass \
                 --storage-credentials FILE"
                    .into(),
            ));
        }
        check_bucket(bucket)?;
        let prefix = prefix.trim_matches('/');
        check_prefix(prefix)?;
        let (mut endpoint, mut region) = (None, None);
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match &*k {
                "endpoint" => &mut endpoint,
                "region" => &mut region,
                other => {
                    return Err(bad(format!(
                        "unknown parameter {other:?} (there are endpoint and region)"
                    )))
                }
            };
            if slot.replace(v.into_owned()).is_some() {
                return Err(bad(format!("{k} is given twice")));
            }
        }
        let endpoint = endpoint.map(|e| check_endpoint(&e)).transpose()?;
        let region = region.unwrap_or_else(|| "us-east-1".into());
        if region.is_empty() || !region.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(bad(format!("{region:?} is not a region name")));
        }
        Ok(StorageLocation::S3(S3Location {
            bucket: bucket.into(),
            prefix: prefix.into(),
            endpoint,
            region,
        }))
    }
}

/// Access key, secret and session token.
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

/// The S3 credentials: from `file` (an AWS credentials file, profile
/// `$AWS_PROFILE` or `default`) when given, else from the environment.
pub fn credentials(file: Option<&Path>) -> Result<Credentials, String> {
    if let Some(path) = file {
        crate::secrets::warn_if_exposed(path, "the S3 credentials file");
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read the S3 credentials file {} (--storage-credentials): {e}",
                path.display()
            )
        })?;
        let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
        return parse_credentials_file(&text, &profile)
            .map_err(|e| format!("S3 credentials file {} (--storage-credentials): {e}", path.display()));
    }
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(Credentials {
            access_key_id,
            secret_access_key,
            session_token: var("AWS_SESSION_TOKEN"),
        }),
        (Some(_), None) => Err("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not; set both".into()),
        (None, Some(_)) => Err("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not; set both".into()),
        (None, None) => Err(
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or pass \
                             --storage-credentials FILE (an AWS credentials file)"
                .into(),
        ),
    }
}

/// The `[profile]` section of an AWS credentials file (INI: `key = value`
/// lines, `#` and `;` comments).
fn parse_credentials_file(text: &str, profile: &str) -> Result<Credentials, String> {
    let mut section: Option<&str> = None;
    let (mut id, mut secret, mut token) = (None, None, None);
    let mut found = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.trim());
            found |= section == Some(profile);
            continue;
        }
        if section != Some(profile) {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else { continue };
        let v = v.trim().to_string();
        match k.trim() {
            "aws_access_key_id" => id = Some(v),
            "aws_secret_access_key" => secret = Some(v),
            "aws_session_token" => token = Some(v),
            _ => {}
        }
    }
    if !found {
        return Err(format!(
            "it has no [{profile}] profile (set AWS_PROFILE to choose another)"
        ));
    }
    match (id, secret) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(Credentials {
            access_key_id,
            secret_access_key,
            session_token: token,
        }),
        _ => Err(format!(
            "its [{profile}] profile needs aws_access_key_id and aws_secret_access_key"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(s: &str) -> S3Location {
        match s.parse::<StorageLocation>() {
            Ok(StorageLocation::S3(l)) => l,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn storage_urls_parse() {
        assert_eq!("".parse::<StorageLocation>().unwrap(), StorageLocation::DataDir);
        assert_eq!("fs".parse::<StorageLocation>().unwrap(), StorageLocation::DataDir);
        assert_eq!(
            s3("s3://registry"),
            S3Location {
                bucket: "registry".into(),
                prefix: String::new(),
                endpoint: None,
                region: "us-east-1".into()
            }
        );
        let l = s3("s3://my.bucket-1/team/berth/?endpoint=http://127.0.0.1:9000/&region=eu-west-3");
        assert_eq!(l.bucket, "my.bucket-1");
        assert_eq!(l.prefix, "team/berth");
        assert_eq!(l.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(l.region, "eu-west-3");
        assert_eq!(l.to_string(), "s3://my.bucket-1/team/berth at http://127.0.0.1:9000");
        // Percent-encoded query values work too.
        let l = s3("s3://registry?endpoint=https%3A%2F%2Fs3.example.com");
        assert_eq!(l.endpoint.as_deref(), Some("https://s3.example.com"));
    }

    #[test]
    fn malformed_storage_urls_name_the_flag_and_what_is_wrong() {
        for (url, says) in [
            ("s4://registry", "\"s4\" is neither fs nor an s3:// URL"),
            ("/var/lib/berth", "is neither fs"),
            ("s3://", "is not a bucket name"),
            ("s3://Registry", "is not a bucket name"),
            ("s3://ab", "is not a bucket name"),
            ("s3://registry/a//b", "key prefix"),
            ("s3://registry/../b", "key prefix"),
            (
                "s3://registry?endpoint=127.0.0.1:9000",
                "must start with http:// or https://",
            ),
            (
                "s3://registry?endpoint=http://127.0.0.1:9000/path",
                "no user, path or query",
            ),
            (
                "s3://registry?endpoint=http://k:s@127.0.0.1:9000",
                "must not hold credentials",
            ),
            ("s3://registry?endpoint=http://a&endpoint=http://b", "given twice"),
            ("s3://registry?bucket=x", "unknown parameter \"bucket\""),
            ("s3://registry?region=eu_west", "is not a region name"),
            ("s3://AKID:secret@registry", "credentials do not go in the URL"),
        ] {
            let e = url.parse::<StorageLocation>().unwrap_err();
            assert!(e.starts_with("--storage: ") && e.contains(says), "{url}: {e}");
            assert!(e.contains("s3://BUCKET[/PREFIX]"), "{url}: {e}");
            assert!(!e.contains("secret@") && !e.contains("k:s@"), "{url}: {e}");
        }
    }

    #[test]
    fn credentials_files_are_read_by_profile() {
        let text = "# berth\n[default]\naws_access_key_id = AK\naws_secret_access_key=SK\n\n[ci]\n\
                    aws_access_key_id = AK2\naws_secret_access_key = SK2\naws_session_token = T2\n";
        let c = parse_credentials_file(text, "default").unwrap();
        assert_eq!((c.access_key_id.as_str(), c.secret_access_key.as_str()), ("AK", "SK"));
        assert_eq!(c.session_token, None);
        let c = parse_credentials_file(text, "ci").unwrap();
        assert_eq!(c.session_token.as_deref(), Some("T2"));
        let Err(e) = parse_credentials_file(text, "prod") else {
            panic!()
        };
        assert!(e.contains("no [prod] profile"), "{e}");
        let Err(e) = parse_credentials_file("[default]\naws_access_key_id = AK\n", "default") else {
            panic!()
        };
        assert!(e.contains("needs aws_access_key_id and aws_secret_access_key"), "{e}");
        assert!(!e.contains("AK\n"));
    }
}
