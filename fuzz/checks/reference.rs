// `RepoName`, `Tag`, `Reference` and `UploadId` parsing: arbitrary text
// never panics, and what is accepted obeys the grammar. In particular an
// accepted repository name never has an empty, `.` or `..` component, so it
// can never walk a path.
//
// `include!`d by fuzz/fuzz_targets/reference.rs and crates/api/tests/fuzz_seeds.rs,
// so no inner attributes here.

use oci::{Digest, Reference, RepoName, Tag, UploadId};

fn alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

pub fn check(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let s = s.as_ref();

    if let Ok(n) = s.parse::<RepoName>() {
        assert_eq!(n.as_str(), s);
        assert_eq!(n.to_string(), s);
        assert!(!s.is_empty() && s.len() <= oci::name::MAX_NAME_LEN, "length of {s:?}");
        for c in s.split('/') {
            assert!(!c.is_empty() && c != "." && c != "..", "component {c:?} of {s:?}");
            let b = c.as_bytes();
            assert!(alnum(b[0]) && alnum(b[b.len() - 1]), "component {c:?} of {s:?} must start and end alphanumeric");
            assert!(b.iter().all(|&x| alnum(x) || matches!(x, b'.' | b'_' | b'-')), "component {c:?} of {s:?}");
            assert!(!c.contains("..") && !c.contains("___"), "component {c:?} of {s:?}");
        }
        assert_eq!(n.project(), s.split('/').next().unwrap());
        assert_eq!(n.to_string().parse::<RepoName>().as_ref(), Ok(&n));
    }

    let tag = s.parse::<Tag>();
    if let Ok(t) = &tag {
        assert_eq!(t.as_str(), s);
        assert!((1..=128).contains(&s.len()), "length of tag {s:?}");
        assert!(s != "." && s != ".." && !s.starts_with(['.', '-']), "tag {s:?}");
        assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')), "tag {s:?}");
    }

    match s.parse::<Reference>() {
        Ok(r) => {
            assert_eq!(r.to_string(), s);
            match &r {
                Reference::Tag(t) => {
                    assert!(!s.contains(':'));
                    assert_eq!(tag.as_ref(), Ok(t));
                }
                Reference::Digest(d) => assert_eq!(s.parse::<Digest>().as_ref(), Ok(d)),
            }
        }
        Err(_) => {
            if s.contains(':') {
                assert!(s.parse::<Digest>().is_err(), "{s:?} is a digest but not a reference");
            } else {
                assert!(tag.is_err(), "{s:?} is a tag but not a reference");
            }
        }
    }

    if let Ok(id) = s.parse::<UploadId>() {
        assert_eq!(id.as_str(), s);
        assert_eq!(id.to_string(), s);
        assert!((1..=64).contains(&s.len()), "length of upload id {s:?}");
        assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'), "upload id {s:?}");
    }
}
