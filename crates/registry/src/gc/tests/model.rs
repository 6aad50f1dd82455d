//! A model of the GC decision, checked against the real registry: random
//! sequences of pushes (layers shared between images and repositories),
//! loose uploads, untags, manifest deletes and GC runs. After every GC run,
//! the blob store holds exactly what the model says is referenced, the
//! report counts exactly what the model removed, and every image the model
//! still has pulls completely with verified digests.

use std::collections::{BTreeMap, BTreeSet};

use oci::{Digest, Reference};
use proptest::prelude::*;

use super::{env, manifest, now_opts, pull, push, repo, stored, tag, upload};
use crate::gc::GcOptions;

const REPOS: [&str; 3] = ["p/a", "p/b", "q/c"];
const LAYERS: [&[u8]; 4] = [b"layer-0", b"layer-1", b"layer-2", b"layer-3"];
const TAGS: [&str; 2] = ["v1", "latest"];

#[derive(Debug, Clone)]
enum Op {
    /// Push an image of config `cfg` and the layers in `mask` into a repo,
    /// by tag or by digest.
    Push {
        repo: usize,
        cfg: u8,
        mask: u8,
        tag: Option<usize>,
    },
    /// A layer pushed with no manifest yet (or ever).
    Loose {
        repo: usize,
        layer: usize,
    },
    Untag {
        repo: usize,
        tag: usize,
    },
    /// Delete the `nth` manifest of the repo (modulo how many it has).
    Delete {
        repo: usize,
        nth: usize,
    },
    Gc,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..3u8, 0..16u8, proptest::option::of(0..2usize))
            .prop_map(|(repo, cfg, mask, tag)| Op::Push { repo, cfg, mask, tag }),
        1 => (0..3usize, 0..4usize).prop_map(|(repo, layer)| Op::Loose { repo, layer }),
        2 => (0..3usize, 0..2usize).prop_map(|(repo, tag)| Op::Untag { repo, tag }),
        2 => (0..3usize, 0..8usize).prop_map(|(repo, nth)| Op::Delete { repo, nth }),
        2 => Just(Op::Gc),
    ]
}

/// What the registry should hold.
#[derive(Default)]
struct Model {
    /// (repo, manifest) -> the digests the manifest references.
    manifests: BTreeMap<(usize, Digest), Vec<Digest>>,
    tags: BTreeMap<(usize, usize), Digest>,
    /// Digests in the blob store: blobs and manifest bytes.
    stored: BTreeSet<Digest>,
    /// (repo, blob) links.
    links: BTreeSet<(usize, Digest)>,
}

impl Model {
    /// One GC run with no grace: untagged manifests of project `q` go when
    /// `prune_q`; then everything no manifest references goes, with its
    /// links. Returns (manifests removed, blobs removed).
    fn gc(&mut self, prune_q: bool) -> (u64, u64) {
        let mut removed = 0;
        if prune_q {
            let tagged: BTreeSet<(usize, Digest)> = self.tags.iter().map(|((r, _), d)| (*r, d.clone())).collect();
            let before = self.manifests.len();
            self.manifests
                .retain(|(r, d), _| !REPOS[*r].starts_with("q/") || tagged.contains(&(*r, d.clone())));
            removed = (before - self.manifests.len()) as u64;
        }
        let mut referenced = BTreeSet::new();
        for ((_, m), blobs) in &self.manifests {
            referenced.insert(m.clone());
            referenced.extend(blobs.iter().cloned());
        }
        let before = self.stored.len();
        self.stored.retain(|d| referenced.contains(d));
        self.links.retain(|(_, d)| referenced.contains(d));
        (removed, (before - self.stored.len()) as u64)
    }
}

fn cfg_bytes(cfg: u8) -> Vec<u8> {
    format!("config-{cfg}").into_bytes()
}

fn run(ops: Vec<Op>, prune_q: bool) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let e = env().await;
        let mut model = Model::default();
        let opts = GcOptions {
            untagged_projects: if prune_q { vec!["q".into()] } else { vec![] },
            ..now_opts()
        };
        for op in ops {
            match op {
                Op::Push {
                    repo: r,
                    cfg,
                    mask,
                    tag: t,
                } => {
                    let layers: Vec<&[u8]> = (0..4).filter(|i| mask & (1 << i) != 0).map(|i| LAYERS[i]).collect();
                    let cfg = cfg_bytes(cfg);
                    let m = push(&e.reg, &repo(REPOS[r]), &cfg, &layers, t.map(|t| TAGS[t])).await;
                    prop_assert_eq!(&m, &Digest::sha256(&manifest(&cfg, &layers)));
                    let mut refs: Vec<Digest> = layers.iter().map(|l| Digest::sha256(l)).collect();
                    refs.push(Digest::sha256(&cfg));
                    for d in &refs {
                        model.stored.insert(d.clone());
                        model.links.insert((r, d.clone()));
                    }
                    model.stored.insert(m.clone());
                    model.manifests.insert((r, m.clone()), refs);
                    if let Some(t) = t {
                        model.tags.insert((r, t), m);
                    }
                }
                Op::Loose { repo: r, layer } => {
                    let d = upload(&e.reg, &repo(REPOS[r]), LAYERS[layer]).await;
                    model.stored.insert(d.clone());
                    model.links.insert((r, d));
                }
                Op::Untag { repo: r, tag: t } => {
                    let res = e
                        .reg
                        .manifest_delete(&repo(REPOS[r]), &Reference::Tag(tag(TAGS[t])))
                        .await;
                    prop_assert_eq!(res.is_ok(), model.tags.remove(&(r, t)).is_some());
                }
                Op::Delete { repo: r, nth } => {
                    let mine: Vec<Digest> = model
                        .manifests
                        .keys()
                        .filter(|(x, _)| *x == r)
                        .map(|(_, d)| d.clone())
                        .collect();
                    if mine.is_empty() {
                        continue;
                    }
                    let m = mine[nth % mine.len()].clone();
                    e.reg
                        .manifest_delete(&repo(REPOS[r]), &Reference::Digest(m.clone()))
                        .await
                        .unwrap();
                    model.manifests.remove(&(r, m.clone()));
                    model.tags.retain(|(tr, _), d| *tr != r || *d != m);
                }
                Op::Gc => {
                    let report = e.reg.gc(&opts).await.unwrap();
                    let (manifests, blobs) = model.gc(prune_q);
                    prop_assert_eq!((report.manifests, report.blobs), (manifests, blobs), "{}", report);
                    prop_assert_eq!(&stored(&e.blobs).await, &model.stored);
                }
            }
        }
        // Whatever the sequence, every image the model has pulls, every tag
        // resolves, and links are exactly the model's.
        for (r, m) in model.manifests.keys() {
            if let Err(err) = pull(&e.reg, &repo(REPOS[*r]), m).await {
                return Err(TestCaseError::fail(err));
            }
        }
        for ((r, t), m) in &model.tags {
            let got = e
                .reg
                .manifest_get(&repo(REPOS[*r]), &Reference::Tag(tag(TAGS[*t])), false)
                .await;
            prop_assert_eq!(&got.map(|b| b.digest).ok(), &Some(m.clone()));
        }
        let all: BTreeSet<Digest> = model
            .stored
            .iter()
            .cloned()
            .chain(LAYERS.iter().map(|l| Digest::sha256(l)))
            .collect();
        for (r, name) in REPOS.iter().enumerate() {
            for d in &all {
                let linked = e.reg.blob_size(&repo(name), d).await.is_ok();
                // Manifest bytes are not blobs of the repository.
                let is_manifest = model.manifests.keys().any(|(_, m)| m == d);
                if !is_manifest {
                    prop_assert_eq!(linked, model.links.contains(&(r, d.clone())), "link {} {}", name, d);
                }
            }
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn gc_matches_the_model(ops in proptest::collection::vec(op(), 1..24), prune_q in any::<bool>()) {
        run(ops, prune_q)?;
    }
}
