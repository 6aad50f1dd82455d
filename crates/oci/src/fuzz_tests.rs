//! Property tests: every parser takes arbitrary input without panicking,
//! and what it accepts round-trips and obeys the grammar.

use proptest::prelude::*;

use crate::{Digest, Manifest, Reference, RepoName, Tag, UploadId};

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn parsers_never_panic(s in any::<String>()) {
        let _ = s.parse::<Digest>();
        let _ = s.parse::<RepoName>();
        let _ = s.parse::<Tag>();
        let _ = s.parse::<Reference>();
        let _ = s.parse::<UploadId>();
        let _ = Manifest::parse(s.as_bytes(), None);
    }

    #[test]
    fn manifest_parser_never_panics_on_bytes(b in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Manifest::parse(&b, Some(crate::media::OCI_INDEX));
    }

    #[test]
    fn accepted_names_are_path_safe(s in "[a-z0-9._/-]{1,40}") {
        if let Ok(n) = s.parse::<RepoName>() {
            prop_assert_eq!(n.as_str(), s.as_str());
            for c in n.as_str().split('/') {
                prop_assert!(!c.is_empty() && c != "." && c != "..");
                prop_assert!(!c.starts_with(['.', '_', '-']) && !c.ends_with(['.', '_', '-']));
            }
        }
    }

    #[test]
    fn accepted_digests_round_trip(s in "sha(256|512):[0-9a-f]{60,130}") {
        if let Ok(d) = s.parse::<Digest>() {
            prop_assert_eq!(d.as_str(), s.as_str());
            prop_assert_eq!(d.hex().len(), d.algorithm().hex_len());
        }
    }

    #[test]
    fn json_shaped_manifests_never_panic(
        media in prop_oneof![Just(crate::media::OCI_MANIFEST), Just(crate::media::OCI_INDEX), Just("x/y")],
        size in any::<i64>(),
        digest in "(sha256:[0-9a-f]{64}|[a-z0-9:]{0,10})",
        with_subject in any::<bool>(),
    ) {
        let desc = format!(r#"{{"mediaType":"a/b","digest":"{digest}","size":{size}}}"#);
        let subject = if with_subject { format!(r#","subject":{desc}"#) } else { String::new() };
        let m = format!(r#"{{"schemaVersion":2,"mediaType":"{media}","config":{desc},"layers":[{desc}],"manifests":[{desc}]{subject}}}"#);
        let _ = Manifest::parse(m.as_bytes(), None);
    }
}
