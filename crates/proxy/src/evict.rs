//! Eviction of one upstream's cache, as a pure function of a metadata
//! snapshot and the last-pull times: what expired (not pulled within the
//! TTL), and, while the cache is above its high watermark, what was pulled
//! least recently, down to the low watermark. The plan only removes cache
//! repositories' manifests and blob links; GC then frees the bytes that
//! nothing else references, so content a local repository shares is never
//! lost.

use std::collections::{BTreeMap, HashMap, HashSet};

use metadata::GcSnapshot;
use oci::Digest;

/// What one pass removes from one upstream's repositories.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// (repository, manifest digest)
    pub manifests: Vec<(String, Digest)>,
    /// (repository, blob digest) links to remove.
    pub links: Vec<(String, Digest)>,
    pub ttl_objects: u64,
    pub ttl_bytes: u64,
    pub size_objects: u64,
    pub size_bytes: u64,
    /// What the cache holds before and after the plan.
    pub bytes_before: u64,
    pub bytes_after: u64,
}

pub struct Limits {
    pub now: u64,
    pub ttl_secs: u64,
    pub max_bytes: u64,
    pub high: f64,
    pub low: f64,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
enum Kind {
    Manifest,
    Link,
}

/// One cached object: a manifest, or a blob link of a cache repository.
struct Obj<'a> {
    kind: Kind,
    repo: &'a str,
    digest: &'a Digest,
    last: u64,
    /// For a manifest: the blobs it references.
    blobs: Vec<&'a str>,
}

/// `access`: last pulls seen by this process, by (repository, digest);
/// objects it has not seen fall back to recorded tag pulls and then to when
/// they were stored. `in_use`: digests being served or filled right now,
/// never evicted.
pub fn plan<'a>(
    snap: &'a GcSnapshot,
    project: &str,
    access: &HashMap<(String, Digest), u64>,
    in_use: &HashSet<Digest>,
    lim: &Limits,
) -> Plan {
    let prefix = format!("{project}/");
    let mine = |repo: &str| repo.starts_with(&prefix);
    let sizes: HashMap<&Digest, u64> = snap.blobs.iter().map(|(d, s)| (d, *s)).collect();
    let touched: HashMap<&Digest, u64> = snap.touched.iter().map(|(d, t)| (d, t.time)).collect();
    // Last recorded tag pull of each manifest.
    let tag_of: HashMap<(&str, &str), &Digest> = snap
        .tags
        .iter()
        .map(|(r, t, d)| ((r.as_str(), t.as_str()), d))
        .collect();
    let mut pulled: HashMap<(&str, &Digest), u64> = HashMap::new();
    for (r, t, time) in &snap.pulls {
        if let Some(d) = tag_of.get(&(r.as_str(), t.as_str())) {
            let e = pulled.entry((r.as_str(), *d)).or_default();
            *e = (*e).max(*time);
        }
    }
    let last_of = |repo: &str, d: &Digest, stored: u64| {
        access
            .get(&(repo.to_string(), d.clone()))
            .copied()
            .or_else(|| pulled.get(&(repo, d)).copied())
            .unwrap_or(stored)
    };
    let mut objs: Vec<Obj<'a>> = Vec::new();
    for m in snap.manifests.iter().filter(|m| mine(&m.repo)) {
        objs.push(Obj {
            kind: Kind::Manifest,
            repo: &m.repo,
            digest: &m.digest,
            last: last_of(&m.repo, &m.digest, m.record.created),
            blobs: m.record.blobs.iter().map(String::as_str).collect(),
        });
    }
    for (r, d) in snap.links.iter().filter(|(r, _)| mine(r)) {
        objs.push(Obj {
            kind: Kind::Link,
            repo: r,
            digest: d,
            last: last_of(r, d, touched.get(d).copied().unwrap_or(0)),
            blobs: vec![],
        });
    }
    // Bytes: each manifest and each linked blob once per upstream.
    let manifest_size: HashMap<&Digest, u64> = snap
        .manifests
        .iter()
        .filter(|m| mine(&m.repo))
        .map(|m| (&m.digest, m.record.size))
        .collect();
    let mut holders: HashMap<(Kind, &Digest), usize> = HashMap::new();
    for o in &objs {
        *holders.entry((o.kind, o.digest)).or_default() += 1;
    }
    let size_of = |k: Kind, d: &Digest| match k {
        Kind::Manifest => manifest_size.get(d).copied().unwrap_or(0),
        Kind::Link => sizes.get(d).copied().unwrap_or(0),
    };
    let mut bytes: u64 = holders.keys().map(|(k, d)| size_of(*k, d)).sum();
    let mut out = Plan {
        bytes_before: bytes,
        ..Plan::default()
    };
    let mut gone: HashSet<usize> = HashSet::new();
    // Links a remaining manifest of the same repository references stay
    // with it: a manifest and its layers go together.
    let held_links = |gone: &HashSet<usize>| -> HashSet<(&str, &str)> {
        objs.iter()
            .enumerate()
            .filter(|(i, o)| o.kind == Kind::Manifest && !gone.contains(i))
            .flat_map(|(_, o)| o.blobs.iter().map(move |b| (o.repo, *b)))
            .collect()
    };
    // Removes object `i` (and, for a manifest, its links no other manifest
    // of the repository holds); returns (objects, bytes) freed.
    let remove = |i: usize, gone: &mut HashSet<usize>, holders: &mut HashMap<(Kind, &'a Digest), usize>| {
        let mut freed = (0u64, 0u64);
        let mut take = vec![i];
        if objs[i].kind == Kind::Manifest {
            gone.insert(i);
            let held = held_links(gone);
            for (j, o) in objs.iter().enumerate() {
                if o.kind == Kind::Link
                    && o.repo == objs[i].repo
                    && objs[i].blobs.contains(&o.digest.as_str())
                    && !held.contains(&(o.repo, o.digest.as_str()))
                    && !gone.contains(&j)
                    && !in_use.contains(o.digest)
                {
                    take.push(j);
                }
            }
        }
        for j in take {
            gone.insert(j);
            freed.0 += 1;
            let o = &objs[j];
            let n = holders.entry((o.kind, o.digest)).or_default();
            *n -= 1;
            if *n == 0 {
                freed.1 += size_of(o.kind, o.digest);
            }
        }
        freed
    };
    // 1. Expired. A link a remaining manifest holds expires with it.
    let cutoff = lim.now.saturating_sub(lim.ttl_secs);
    let mut expired: Vec<usize> = (0..objs.len())
        .filter(|&i| objs[i].last < cutoff && !in_use.contains(objs[i].digest))
        .collect();
    expired.sort_by_key(|&i| objs[i].kind);
    for i in expired {
        if gone.contains(&i) {
            continue;
        }
        if objs[i].kind == Kind::Link && held_links(&gone).contains(&(objs[i].repo, objs[i].digest.as_str())) {
            continue;
        }
        let (n, b) = remove(i, &mut gone, &mut holders);
        out.ttl_objects += n;
        out.ttl_bytes += b;
        bytes -= b;
    }
    // 2. Over the high watermark: least recently pulled first, manifests
    // (with their layers) before stray links, down to the low watermark.
    let high = (lim.max_bytes as f64 * lim.high / 100.0) as u64;
    let low = (lim.max_bytes as f64 * lim.low / 100.0) as u64;
    if bytes > high {
        let mut order: Vec<usize> = (0..objs.len())
            .filter(|i| !gone.contains(i) && !in_use.contains(objs[*i].digest))
            .collect();
        order.sort_by_key(|&i| (objs[i].kind, objs[i].last));
        for i in order {
            if bytes <= low {
                break;
            }
            if gone.contains(&i) {
                continue;
            }
            if objs[i].kind == Kind::Link && held_links(&gone).contains(&(objs[i].repo, objs[i].digest.as_str())) {
                continue;
            }
            let (n, b) = remove(i, &mut gone, &mut holders);
            out.size_objects += n;
            out.size_bytes += b;
            bytes -= b;
        }
    }
    out.bytes_after = bytes;
    let mut sorted: BTreeMap<(Kind, &str, &Digest), ()> = BTreeMap::new();
    for i in gone {
        sorted.insert((objs[i].kind, objs[i].repo, objs[i].digest), ());
    }
    for (k, r, d) in sorted.into_keys() {
        match k {
            Kind::Manifest => out.manifests.push((r.to_string(), d.clone())),
            Kind::Link => out.links.push((r.to_string(), d.clone())),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use metadata::{GcManifest, ManifestRecord, Touch};

    fn d(n: u8) -> Digest {
        Digest::sha256(&[n])
    }

    fn manifest(repo: &str, n: u8, blobs: &[u8], created: u64) -> GcManifest {
        GcManifest {
            repo: repo.into(),
            digest: d(n),
            record: ManifestRecord {
                media_type: oci::media::OCI_MANIFEST.into(),
                size: 10,
                artifact_type: None,
                subject: None,
                annotations: None,
                blobs: blobs.iter().map(|b| d(*b).to_string()).collect(),
                children: vec![],
                created,
                cached_from: Some("hub".into()),
            },
        }
    }

    /// Two cached images in hub/a (manifest 1 with blobs 10, 11; manifest 2
    /// with blobs 11, 12), one local image sharing blob 10, all stored at
    /// time 100.
    fn snap() -> GcSnapshot {
        GcSnapshot {
            blobs: vec![(d(10), 1000), (d(11), 1000), (d(12), 1000)],
            links: vec![
                ("hub/a".into(), d(10)),
                ("hub/a".into(), d(11)),
                ("hub/a".into(), d(12)),
                ("local/x".into(), d(10)),
            ],
            manifests: vec![
                manifest("hub/a", 1, &[10, 11], 100),
                manifest("hub/a", 2, &[11, 12], 100),
                manifest("local/x", 3, &[10], 100),
            ],
            touched: [10, 11, 12]
                .iter()
                .map(|n| (d(*n), Touch { time: 100, seq: 1 }))
                .collect(),
            ..GcSnapshot::default()
        }
    }

    fn limits(now: u64, ttl: u64, max: u64) -> Limits {
        Limits {
            now,
            ttl_secs: ttl,
            max_bytes: max,
            high: 90.0,
            low: 80.0,
        }
    }

    #[test]
    fn nothing_to_do_within_ttl_and_size() {
        let p = plan(
            &snap(),
            "hub",
            &HashMap::new(),
            &HashSet::new(),
            &limits(150, 100, 1 << 20),
        );
        assert!(p.manifests.is_empty() && p.links.is_empty());
        assert_eq!(p.bytes_before, 3020);
        assert_eq!(p.bytes_after, 3020);
    }

    #[test]
    fn ttl_counts_from_the_last_pull_and_keeps_shared_layers() {
        // Manifest 2 was pulled at 190; manifest 1 not since it was stored.
        let access = HashMap::from([
            (("hub/a".to_string(), d(2)), 190),
            (("hub/a".to_string(), d(11)), 190),
            (("hub/a".to_string(), d(12)), 190),
        ]);
        let p = plan(&snap(), "hub", &access, &HashSet::new(), &limits(250, 100, 1 << 20));
        assert_eq!(p.manifests, vec![("hub/a".to_string(), d(1))]);
        // Blob 11 stays with manifest 2; blob 10 goes from the cache (GC
        // keeps its bytes: the local image references them).
        assert_eq!(p.links, vec![("hub/a".to_string(), d(10))]);
        assert_eq!(p.ttl_objects, 2);
        assert_eq!(p.bytes_after, 3020 - 10 - 1000);
        assert!(!p.manifests.iter().any(|(r, _)| r == "local/x"));
    }

    #[test]
    fn size_cap_evicts_least_recently_pulled_down_to_the_low_watermark() {
        let access = HashMap::from([(("hub/a".to_string(), d(1)), 120), (("hub/a".to_string(), d(2)), 110)]);
        // Cap 3000: 3020 is above 90 % (2700); must get to 80 % (2400).
        let p = plan(&snap(), "hub", &access, &HashSet::new(), &limits(130, 1000, 3000));
        assert_eq!(p.manifests, vec![("hub/a".to_string(), d(2))]);
        assert_eq!(p.links, vec![("hub/a".to_string(), d(12))]);
        assert_eq!(p.size_bytes, 1010);
        assert_eq!(p.bytes_after, 2010);
    }

    #[test]
    fn content_in_use_is_never_evicted() {
        let in_use = HashSet::from([d(1), d(2)]);
        let p = plan(&snap(), "hub", &HashMap::new(), &in_use, &limits(10_000, 100, 100));
        assert!(p.manifests.is_empty());
        // Links held by manifests that stay, stay.
        assert!(p.links.is_empty(), "{:?}", p.links);
    }
}
