#!/usr/bin/env bash
# Real-client integration tests for an OCI distribution registry (berth).
#
#   tests/clients/run.sh [--registry HOST:PORT] [TEST...]
#
# Without --registry, berth is started from $BERTH_BIN (default $ROOT/target/debug/berth)
# on a free loopback port with a fresh data dir, and stopped on exit.
#
# Tests: docker skopeo buildah_podman containerd oras dxf auth lifecycle retention proxy proxy_htpasswd
# (default: all). auth, retention, proxy and proxy_htpasswd start their own berth (from $BERTH_BIN; the
# proxy tests also an upstream docker-registry), so they are skipped with --registry.
#
# Environment:
#   BERTH_BIN          berth binary (default $ROOT/target/debug/berth)
#   BERTH_TEST_VENV    python venv with oras + python-dxf (default $ROOT/target/test-venv)
#   KEEP_TMP=1         keep the per-run temp dir (logs, client state)
#   TEST_TIMEOUT       per-test timeout in seconds (default 240)
#   ALLOW_NO_REFERRERS=1  let the oras test pass when the registry has no referrers API
#                      (for reference registries such as distribution 2.8; never for berth)
#   AUTH_BERTH_LOG     log filter of the auth test's second berth (default info)
#
# Dependencies: scripts/install-test-deps.sh
#
# Each test runs in its own bash process (this file sourced with BERTH_CLIENTS_LIB=1),
# with `set -eEuo pipefail`, its output captured to $TMP/logs/<test>.log.

ALL_TESTS=(docker skopeo buildah_podman containerd oras dxf auth lifecycle retention proxy proxy_htpasswd)

# ---------------------------------------------------------------------------
# helpers shared by the tests (available in the per-test child process)
# ---------------------------------------------------------------------------

step() { printf '\n==> %s\n' "$*" >&2; }
x() { printf '+ %s\n' "$*" >&2; "$@"; }
# First failure reason of a test, shown on its FAIL line.
reason() { [[ -s $TEST_DIR/.reason ]] || printf '%s\n' "$*" | head -n 1 >"$TEST_DIR/.reason"; }
fail() { printf 'ASSERTION FAILED: %s\n' "$*" >&2; reason "$*"; exit 1; }
skip() { printf '%s\n' "$*" >"$TEST_DIR/.skip"; printf 'SKIP: %s\n' "$*" >&2; exit 77; }

assert_eq() { # expected actual description
    if [[ $1 != "$2" ]]; then
        printf 'ASSERTION FAILED: %s\n  expected: %s\n  actual:   %s\n' "$3" "$1" "$2" >&2
        reason "$3: expected '$1', got '$2'"
        exit 1
    fi
    printf 'ok: %s (%s)\n' "$3" "$2" >&2
}
assert_contains() { # haystack needle description
    if [[ $1 != *"$2"* ]]; then
        printf 'ASSERTION FAILED: %s\n  expected to contain: %s\n  actual: %s\n' "$3" "$2" "$1" >&2
        reason "$3: '$2' not found"
        exit 1
    fi
    printf 'ok: %s\n' "$3" >&2
}
assert_fails() { # description cmd...
    local what=$1; shift
    printf '+ (expect failure) %s\n' "$*" >&2
    if "$@" >&2; then fail "$what: command unexpectedly succeeded: $*"; fi
    printf 'ok: %s\n' "$what" >&2
}

sha256_file() { printf 'sha256:%s' "$(sha256sum "$1" | cut -d' ' -f1)"; }
sha256_stdin() { printf 'sha256:%s' "$(sha256sum | cut -d' ' -f1)"; }
rand_hex() { od -An -N"${1:-4}" -tx1 /dev/urandom | tr -d ' \n'; }
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

MT_OCI_MANIFEST=application/vnd.oci.image.manifest.v1+json
MT_OCI_INDEX=application/vnd.oci.image.index.v1+json
MT_DOCKER_MANIFEST=application/vnd.docker.distribution.manifest.v2+json
MT_DOCKER_LIST=application/vnd.docker.distribution.manifest.list.v2+json
ACCEPT_ALL="$MT_OCI_MANIFEST, $MT_OCI_INDEX, $MT_DOCKER_MANIFEST, $MT_DOCKER_LIST"

# curl against the registry under test (plain HTTP).
rcurl() { curl -sS --max-time 30 "$@"; }

# Raw manifest bytes of NAME:REF, fetched with plain HTTP into FILE.
get_manifest() { # name ref file
    rcurl -f -H "Accept: $ACCEPT_ALL" -o "$3" "http://$REG/v2/$1/manifests/$2"
}
manifest_digest() { # name ref -> digest of the served bytes
    local f
    f=$(mktemp)
    get_manifest "$1" "$2" "$f"
    sha256_file "$f"
    rm -f "$f"
}
tag_list() { # name -> sorted tags, space separated ("" for no tags or 404 NAME_UNKNOWN)
    local out code
    out=$(mktemp)
    code=$(rcurl -o "$out" -w '%{http_code}' "http://$REG/v2/$1/tags/list")
    case $code in
        200) jq -r '.tags // [] | sort | join(" ")' "$out" ;;
        404) ;;
        *) echo "GET /v2/$1/tags/list answered $code: $(head -c 300 "$out")" >&2; rm -f "$out"; return 1 ;;
    esac
    rm -f "$out"
}

# Run a command with /var/lib bind-mounted to a per-run directory in a private mount
# namespace, so that containers/image's blob-info cache (/var/lib/containers/cache for
# root, no flag or env var to move it) lives in the temp dir instead of the host.
ns_wrap() {
    if [[ ${HAVE_NS_WRAP:-0} == 1 ]]; then
        # shellcheck disable=SC2016
        unshare -m --propagation private -- sh -c 'mount --bind "$0" /var/lib && exec "$@"' "$VARLIB" "$@"
    else
        "$@"
    fi
}
sko() { printf '+ skopeo %s\n' "$*" >&2; ns_wrap skopeo --policy "$TMP/policy.json" "$@"; }

# Build an OCI image layout with umoci (offline): tags "amd64" (2 layers), "arm64"
# (1 layer) and "multi" (hand-written index of both).
make_oci_layout() { # layout-dir label
    local L=$1 label=$2 arch src
    x umoci init --layout "$L" >&2
    for arch in amd64 arm64; do
        src=$TEST_DIR/rootfs-$label-$arch
        mkdir -p "$src/a" "$src/b"
        printf 'berth %s %s %s\n' "$label" "$arch" "$(rand_hex 8)" >"$src/a/hello.txt"
        # Over 1 MiB compressed: pulls of this layer go through the mapped,
        # sendfile path of a plain-HTTP blob GET.
        head -c 3000000 /dev/urandom >"$src/b/random.bin"
        x umoci new --image "$L:$arch" >&2
        x umoci insert --image "$L:$arch" "$src/a" /app >&2
        if [[ $arch == amd64 ]]; then
            x umoci insert --image "$L:$arch" "$src/b" /data >&2
        fi
        x umoci config --image "$L:$arch" --architecture "$arch" --os linux \
            --config.cmd /app/hello.txt >&2
    done
    local idx=$TEST_DIR/index-$label.json dgst size
    jq -c --arg mt "$MT_OCI_INDEX" '{schemaVersion: 2, mediaType: $mt, manifests: [
            .manifests[] | select(.annotations["org.opencontainers.image.ref.name"] as $t
                                  | $t == "amd64" or $t == "arm64")
            | {mediaType, digest, size,
               platform: {architecture: .annotations["org.opencontainers.image.ref.name"], os: "linux"}}
          ] | sort_by(.platform.architecture)}' "$L/index.json" >"$idx"
    [[ $(jq '.manifests | length' "$idx") == 2 ]] || fail "index should reference 2 manifests"
    dgst=$(sha256_file "$idx")
    size=$(stat -c %s "$idx")
    cp "$idx" "$L/blobs/sha256/${dgst#sha256:}"
    jq --arg mt "$MT_OCI_INDEX" --arg d "$dgst" --argjson s "$size" \
        '.manifests += [{mediaType: $mt, digest: $d, size: $s,
                          annotations: {"org.opencontainers.image.ref.name": "multi"}}]' \
        "$L/index.json" >"$L/index.json.new"
    mv "$L/index.json.new" "$L/index.json"
    printf 'layout %s: %s\n' "$L" "$(jq -c '[.manifests[] | {t: .annotations["org.opencontainers.image.ref.name"], d: .digest}]' "$L/index.json")" >&2
}
layout_digest() { # layout-dir tag
    jq -r --arg t "$2" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' "$1/index.json"
}

# ---------------------------------------------------------------------------
# docker (Docker Engine)
# ---------------------------------------------------------------------------
test_docker() {
    if ! docker info >/dev/null 2>&1; then
        skip "docker info fails (no Docker Engine reachable)"
    fi
    local single=$REG/$NS/docker/single:v1 multi=$REG/$NS/docker/multi:v1 ctx
    DOCKER_CREATED=()
    DOCKER_IMAGES=("$single" "$multi")
    # shellcheck disable=SC2317
    docker_cleanup() {
        local rc=$? c ids pass
        for c in "${DOCKER_CREATED[@]}"; do docker rm -f "$c" >/dev/null 2>&1 || true; done
        docker rmi -f "${DOCKER_IMAGES[@]}" >/dev/null 2>&1 || true
        # Leftovers of an interrupted build (every layer carries the run label). The daemon
        # may still commit a build step after the CLI died, so look twice after a failure.
        for pass in 1 2; do
            ids=$(docker images -aq --filter "label=org.berth.test.run=$NS" 2>/dev/null | sort -u)
            # shellcheck disable=SC2086
            [[ -z $ids ]] || docker rmi -f $ids >/dev/null 2>&1 || true
            ((rc != 0 && pass == 1)) || break
            sleep 2
        done
    }
    trap docker_cleanup EXIT

    step "build images FROM scratch"
    ctx=$TEST_DIR/single
    mkdir -p "$ctx"
    printf 'single %s\n' "$(rand_hex 8)" >"$ctx/hello.txt"
    printf 'FROM scratch\nLABEL org.berth.test.run=%s\nCOPY hello.txt /hello.txt\nLABEL org.berth.test=single\n' "$NS" >"$ctx/Dockerfile"
    DOCKER_BUILDKIT=0 x docker build -q -t "$single" "$ctx"

    ctx=$TEST_DIR/multi
    mkdir -p "$ctx"
    local i
    for i in 1 2 3 4; do head -c $((i * 50000)) /dev/urandom >"$ctx/f$i.bin"; done
    {
        echo 'FROM scratch'
        echo "LABEL org.berth.test.run=$NS"
        for i in 1 2 3 4; do echo "COPY f$i.bin /data/f$i.bin"; done
        echo 'LABEL org.berth.test=multi'
    } >"$ctx/Dockerfile"
    DOCKER_BUILDKIT=0 x docker build -q -t "$multi" "$ctx"

    local img digest nlayers
    declare -A ids digests
    for img in "$single" "$multi"; do
        step "push $img"
        ids[$img]=$(docker image inspect -f '{{.Id}}' "$img")
        x docker push "$img" | tee "$TEST_DIR/push.out"
        digest=$(grep -oE 'digest: sha256:[0-9a-f]{64}' "$TEST_DIR/push.out" | cut -d' ' -f2)
        [[ -n $digest ]] || fail "docker push printed no digest"
        digests[$img]=$digest
        local repo=${img#"$REG"/}
        repo=${repo%:v1}
        assert_eq "$digest" "$(manifest_digest "$repo" v1)" "registry serves manifest with the digest docker push reported"
        get_manifest "$repo" v1 "$TEST_DIR/m.json"
        assert_eq "$MT_DOCKER_MANIFEST" "$(jq -r .mediaType "$TEST_DIR/m.json")" "manifest mediaType"
        assert_eq "${ids[$img]}" "$(jq -r .config.digest "$TEST_DIR/m.json")" "config digest == local image id"
        nlayers=$(jq '.layers | length' "$TEST_DIR/m.json")
        if [[ $img == "$multi" ]]; then
            ((nlayers >= 3)) || fail "multi-layer image has only $nlayers layers"
        fi
        assert_eq "$(docker image inspect -f '{{len .RootFS.Layers}}' "$img")" "$nlayers" "layer count"
        assert_eq "v1" "$(tag_list "$repo")" "tag list of $repo"
    done

    step "remove local images and pull them back"
    x docker rmi "$single" "$multi"
    for img in "$single" "$multi"; do
        assert_fails "image $img removed locally" docker image inspect "$img"
        x docker pull "$img"
        assert_eq "${ids[$img]}" "$(docker image inspect -f '{{.Id}}' "$img")" "image id after pull"
        assert_contains "$(docker image inspect -f '{{json .RepoDigests}}' "$img")" \
            "${img%:v1}@${digests[$img]}" "RepoDigests contains pushed digest"
    done

    step "check file contents of the pulled images"
    local c
    c=$(docker create "$single" /nonexistent)
    DOCKER_CREATED+=("$c")
    docker cp "$c:/hello.txt" - | tar -xO >"$TEST_DIR/hello.out"
    cmp "$TEST_DIR/single/hello.txt" "$TEST_DIR/hello.out" || fail "hello.txt differs after pull"
    echo "ok: /hello.txt content matches" >&2
    c=$(docker create "$multi" /nonexistent)
    DOCKER_CREATED+=("$c")
    for i in 1 2 3 4; do
        docker cp "$c:/data/f$i.bin" - | tar -xO >"$TEST_DIR/f$i.out"
        cmp "$TEST_DIR/multi/f$i.bin" "$TEST_DIR/f$i.out" || fail "f$i.bin differs after pull"
    done
    echo "ok: /data/f{1..4}.bin contents match" >&2

    x docker rm "${DOCKER_CREATED[@]}" >&2
    DOCKER_CREATED=()

    step "pull by digest"
    DOCKER_IMAGES+=("${multi%:v1}@${digests[$multi]}")
    x docker rmi "$multi"
    x docker pull "${multi%:v1}@${digests[$multi]}"
    assert_eq "${ids[$multi]}" "$(docker image inspect -f '{{.Id}}' "${multi%:v1}@${digests[$multi]}")" "image id after pull by digest"
    x docker rmi "$single" "${multi%:v1}@${digests[$multi]}" >&2
    assert_fails "no test image left behind" docker image inspect "$single"
}

# ---------------------------------------------------------------------------
# skopeo (+ umoci)
# ---------------------------------------------------------------------------
test_skopeo() {
    local L=$TEST_DIR/layout base=$NS/skopeo
    local app=$REG/$base/app multi=$REG/$base/multi
    local tv=(--tls-verify=false)

    step "build OCI layout with umoci"
    make_oci_layout "$L" skopeo
    local d_amd64 d_arm64 d_multi
    d_amd64=$(layout_digest "$L" amd64)
    d_arm64=$(layout_digest "$L" arm64)
    d_multi=$(layout_digest "$L" multi)

    step "copy oci: -> docker:// (OCI manifest kept byte-identical)"
    sko copy --authfile "$REGISTRY_AUTH_FILE" --dest-tls-verify=false \
        --digestfile "$TEST_DIR/digest" "oci:$L:amd64" "docker://$app:v1"
    assert_eq "$d_amd64" "$(cat "$TEST_DIR/digest")" "skopeo --digestfile"
    sko inspect --raw "${tv[@]}" "docker://$app:v1" >"$TEST_DIR/raw.json"
    assert_eq "$d_amd64" "$(sha256_file "$TEST_DIR/raw.json")" "digest of inspect --raw == layout digest"
    # umoci writes manifests without the optional "mediaType" field, so the registry has to
    # derive the Content-Type from the content (or remember the one given on PUT).
    assert_eq "absent" "$(jq -r '.mediaType // "absent"' "$TEST_DIR/raw.json")" "umoci manifest has no mediaType field"
    rcurl -f -H "Accept: $ACCEPT_ALL" -D "$TEST_DIR/h" -o /dev/null "http://$REG/v2/$base/app/manifests/v1"
    assert_contains "$(tr -d '\r' <"$TEST_DIR/h" | grep -i '^content-type:')" "$MT_OCI_MANIFEST" "Content-Type of the OCI manifest"
    assert_eq 2 "$(jq '.layers | length' "$TEST_DIR/raw.json")" "layer count"

    step "copy docker:// -> oci: and compare"
    sko copy --authfile "$REGISTRY_AUTH_FILE" --src-tls-verify=false \
        "docker://$app:v1" "oci:$TEST_DIR/back:v1"
    assert_eq "$d_amd64" "$(layout_digest "$TEST_DIR/back" v1)" "round-tripped manifest digest"
    local blob
    for blob in $(jq -r '.config.digest, .layers[].digest' "$TEST_DIR/raw.json"); do
        cmp "$L/blobs/sha256/${blob#sha256:}" "$TEST_DIR/back/blobs/sha256/${blob#sha256:}" ||
            fail "blob $blob differs after round trip"
    done
    echo "ok: config and layer blobs identical after round trip" >&2

    step "skopeo inspect"
    sko inspect "${tv[@]}" "docker://$app:v1" >"$TEST_DIR/inspect.json"
    assert_eq "$d_amd64" "$(jq -r .Digest "$TEST_DIR/inspect.json")" "inspect .Digest"
    assert_eq "amd64 linux 2" "$(jq -r '"\(.Architecture) \(.Os) \(.Layers | length)"' "$TEST_DIR/inspect.json")" "inspect arch/os/layers"
    assert_eq "v1" "$(jq -r '.RepoTags | join(" ")' "$TEST_DIR/inspect.json")" "inspect .RepoTags"

    step "copy --format v2s2"
    sko copy --authfile "$REGISTRY_AUTH_FILE" --dest-tls-verify=false --format v2s2 \
        --digestfile "$TEST_DIR/digest-v2s2" "oci:$L:amd64" "docker://$app:v2s2"
    sko inspect --raw "${tv[@]}" "docker://$app:v2s2" >"$TEST_DIR/raw-v2s2.json"
    assert_eq "$MT_DOCKER_MANIFEST" "$(jq -r .mediaType "$TEST_DIR/raw-v2s2.json")" "v2s2 manifest mediaType"
    assert_eq "$(cat "$TEST_DIR/digest-v2s2")" "$(sha256_file "$TEST_DIR/raw-v2s2.json")" "v2s2 manifest digest"
    assert_eq "application/vnd.docker.image.rootfs.diff.tar.gzip" \
        "$(jq -r '[.layers[].mediaType] | unique | join(",")' "$TEST_DIR/raw-v2s2.json")" "v2s2 layer mediaType"
    # A plain GET with only the docker Accept header must return the same bytes.
    rcurl -f -H "Accept: $MT_DOCKER_MANIFEST" -D "$TEST_DIR/h" -o "$TEST_DIR/get-v2s2.json" \
        "http://$REG/v2/$base/app/manifests/v2s2"
    cmp "$TEST_DIR/raw-v2s2.json" "$TEST_DIR/get-v2s2.json" || fail "GET manifest differs from skopeo inspect --raw"
    assert_contains "$(tr -d '\r' <"$TEST_DIR/h" | grep -i '^content-type:')" "$MT_DOCKER_MANIFEST" "Content-Type of v2s2 manifest"

    step "copy --all of a two-arch OCI index"
    sko copy --authfile "$REGISTRY_AUTH_FILE" --dest-tls-verify=false --all \
        "oci:$L:multi" "docker://$multi:v1"
    sko inspect --raw "${tv[@]}" "docker://$multi:v1" >"$TEST_DIR/raw-index.json"
    assert_eq "$d_multi" "$(sha256_file "$TEST_DIR/raw-index.json")" "index digest"
    assert_eq "$MT_OCI_INDEX" "$(jq -r .mediaType "$TEST_DIR/raw-index.json")" "index mediaType"
    assert_eq 2 "$(jq '.manifests | length' "$TEST_DIR/raw-index.json")" "index has 2 manifests"
    assert_eq "amd64=$d_amd64 arm64=$d_arm64" \
        "$(jq -r '[.manifests[] | "\(.platform.architecture)=\(.digest)"] | sort | join(" ")' "$TEST_DIR/raw-index.json")" \
        "index platforms and digests"
    sko inspect --raw "${tv[@]}" "docker://$multi@$d_arm64" >"$TEST_DIR/raw-arm64.json"
    assert_eq "$d_arm64" "$(sha256_file "$TEST_DIR/raw-arm64.json")" "arm64 child manifest by digest"
    sko inspect "${tv[@]}" --override-arch arm64 --override-os linux "docker://$multi:v1" >"$TEST_DIR/inspect-arm64.json"
    # .Digest is the digest of the index here (skopeo reports the top-level manifest); the
    # platform resolution shows in Architecture and Layers.
    assert_eq "arm64 $d_multi $(jq -c '[.layers[].digest]' "$TEST_DIR/raw-arm64.json")" \
        "$(jq -c -r '"\(.Architecture) \(.Digest) \(.Layers)"' "$TEST_DIR/inspect-arm64.json")" "platform resolution (arm64)"

    step "list-tags"
    sko copy --authfile "$REGISTRY_AUTH_FILE" --src-tls-verify=false --dest-tls-verify=false \
        "docker://$app:v1" "docker://$app:latest"
    sko list-tags "${tv[@]}" "docker://$app" >"$TEST_DIR/tags.json"
    assert_eq "latest v1 v2s2" "$(jq -r '.Tags | sort | join(" ")' "$TEST_DIR/tags.json")" "list-tags of $base/app"
    sko list-tags "${tv[@]}" "docker://$multi" >"$TEST_DIR/tags-multi.json"
    assert_eq "v1" "$(jq -r '.Tags | sort | join(" ")' "$TEST_DIR/tags-multi.json")" "list-tags of $base/multi"

    step "sync --all docker -> docker (same registry, other path)"
    local dest=$REG/$NS/skopeo-synced
    sko sync --all --src docker --dest docker --src-tls-verify=false --dest-tls-verify=false \
        "$REG/$base/multi" "$dest"
    sko sync --all --src docker --dest docker --src-tls-verify=false --dest-tls-verify=false \
        "$REG/$base/app" "$dest"
    assert_eq "$d_multi" "$(manifest_digest "$NS/skopeo-synced/multi" v1)" "synced index digest"
    assert_eq "$d_arm64" "$(manifest_digest "$NS/skopeo-synced/multi" "$d_arm64")" "synced arm64 child"
    assert_eq "latest v1 v2s2" "$(tag_list "$NS/skopeo-synced/app")" "synced tags"
    assert_eq "$d_amd64" "$(manifest_digest "$NS/skopeo-synced/app" v1)" "synced app:v1 digest"
    assert_eq "$(cat "$TEST_DIR/digest-v2s2")" "$(manifest_digest "$NS/skopeo-synced/app" v2s2)" "synced app:v2s2 digest"

    step "delete"
    sko delete "${tv[@]}" "docker://$app:v2s2"
    assert_fails "inspect of deleted tag fails" sko inspect --raw "${tv[@]}" "docker://$app:v2s2"
    local code
    code=$(rcurl -o /dev/null -w '%{http_code}' -H "Accept: $ACCEPT_ALL" \
        "http://$REG/v2/$base/app/manifests/$(cat "$TEST_DIR/digest-v2s2")")
    assert_eq 404 "$code" "GET deleted manifest by digest"
    assert_eq "latest v1" "$(tag_list "$base/app")" "tags after delete"
    # skopeo delete removes the manifest by digest, so every tag pointing at it goes too.
    sko delete "${tv[@]}" "docker://$app:latest"
    assert_fails "inspect of v1 fails (same digest as latest)" sko inspect --raw "${tv[@]}" "docker://$app:v1"
    assert_eq "" "$(tag_list "$base/app")" "tags after deleting the shared manifest"
    assert_eq "$d_multi" "$(manifest_digest "$base/multi" v1)" "other repo unaffected"
}

# ---------------------------------------------------------------------------
# buildah + podman (vfs storage, all config in the temp dir)
# ---------------------------------------------------------------------------
containers_env() { # dir -> per-store config for buildah/podman
    local d=$1
    mkdir -p "$d/root" "$d/runroot" "$d/tmp"
    cat >"$d/storage.conf" <<EOF
[storage]
driver = "vfs"
runroot = "$d/runroot"
graphroot = "$d/root"
EOF
    cat >"$d/containers.conf" <<EOF
[engine]
tmp_dir = "$d/tmp"
events_logger = "file"
events_logfile_path = "$d/events.log"
cgroup_manager = "cgroupfs"
EOF
    export CONTAINERS_STORAGE_CONF=$d/storage.conf CONTAINERS_CONF=$d/containers.conf
}
bud() { printf '+ buildah %s\n' "$*" >&2; ns_wrap buildah "$@"; }
pod() { printf '+ podman %s\n' "$*" >&2; ns_wrap podman "$@"; }

test_buildah_podman() {
    export BUILDAH_ISOLATION=chroot
    local img=$REG/$NS/buildah/img:v1 c content
    content="buildah $(rand_hex 8)"
    printf '%s\n' "$content" >"$TEST_DIR/hello.txt"
    head -c 100000 /dev/urandom >"$TEST_DIR/blob.bin"

    step "buildah: build from scratch and push (store A)"
    containers_env "$TEST_DIR/storeA"
    c=$(bud from scratch)
    bud copy "$c" "$TEST_DIR/hello.txt" /hello.txt
    bud copy "$c" "$TEST_DIR/blob.bin" /data/blob.bin
    bud config --arch amd64 --os linux --cmd /hello.txt --label org.berth.test=buildah "$c"
    bud commit "$c" "$img" >&2
    bud push --tls-verify=false --digestfile "$TEST_DIR/digest" "$img"
    local digest
    digest=$(cat "$TEST_DIR/digest")
    [[ $digest == sha256:* ]] || fail "buildah push wrote no digest"
    assert_eq "$digest" "$(manifest_digest "$NS/buildah/img" v1)" "registry digest == buildah push digest"
    get_manifest "$NS/buildah/img" v1 "$TEST_DIR/m.json"
    assert_eq "$MT_OCI_MANIFEST" "$(jq -r .mediaType "$TEST_DIR/m.json")" "buildah pushes an OCI manifest"
    local config_digest
    config_digest=$(jq -r .config.digest "$TEST_DIR/m.json")

    step "podman: pull into a fresh store (store B)"
    containers_env "$TEST_DIR/storeB"
    pod pull --tls-verify=false "$img" >&2
    pod image inspect "$img" >"$TEST_DIR/inspect.json"
    assert_eq "$digest" "$(jq -r '.[0].Digest' "$TEST_DIR/inspect.json")" "podman image inspect .Digest"
    assert_eq "${config_digest#sha256:}" "$(jq -r '.[0].Id' "$TEST_DIR/inspect.json")" "podman image id == config digest"
    assert_eq "buildah" "$(jq -r '.[0].Labels["org.berth.test"]' "$TEST_DIR/inspect.json")" "label survives"
    assert_contains "$(jq -r '.[0].RepoDigests | join(" ")' "$TEST_DIR/inspect.json")" "$REG/$NS/buildah/img@$digest" "RepoDigests"

    step "check file contents (buildah mount in store B, no container run)"
    c=$(bud from "$img")
    # buildah mount needs to happen in the same mount namespace as the read.
    # shellcheck disable=SC2016
    ns_wrap sh -c 'm=$(buildah mount "$1") && cat "$m/hello.txt" >"$2" && cat "$m/data/blob.bin" >"$3" && buildah umount "$1" >/dev/null' \
        sh "$c" "$TEST_DIR/hello.out" "$TEST_DIR/blob.out"
    cmp "$TEST_DIR/hello.txt" "$TEST_DIR/hello.out" || fail "hello.txt differs after pull"
    cmp "$TEST_DIR/blob.bin" "$TEST_DIR/blob.out" || fail "blob.bin differs after pull"
    echo "ok: file contents match" >&2
    bud rm "$c" >&2

    step "podman push to a new repository, check with the registry"
    pod tag "$img" "$REG/$NS/podman/copy:v2"
    pod push --tls-verify=false --digestfile "$TEST_DIR/digest2" "$REG/$NS/podman/copy:v2"
    assert_eq "$(cat "$TEST_DIR/digest2")" "$(manifest_digest "$NS/podman/copy" v2)" "registry digest == podman push digest"
    get_manifest "$NS/podman/copy" v2 "$TEST_DIR/m2.json"
    assert_eq "$(jq -c '[.config.digest, .layers[].digest]' "$TEST_DIR/m.json")" \
        "$(jq -c '[.config.digest, .layers[].digest]' "$TEST_DIR/m2.json")" "same config and layers"
    assert_eq "v2" "$(tag_list "$NS/podman/copy")" "tags of podman/copy"
}

# ---------------------------------------------------------------------------
# containerd (private daemon, ctr)
# ---------------------------------------------------------------------------
# Private containerd daemon (CRI disabled, native snapshotter; root, state and socket under
# DIR); exports the ctr environment and sets CONTAINERD_PID. Set `trap containerd_stop EXIT`
# (or call containerd_stop from the test's own EXIT trap) before calling it.
CONTAINERD_PID=""
containerd_start() { # dir
    local d=$1
    mkdir -p "$d/root" "$d/state" "$d/opt"
    export CONTAINERD_ADDRESS=$d/c.sock CONTAINERD_NAMESPACE=berth-test CONTAINERD_SNAPSHOTTER=native
    cat >"$d/config.toml" <<EOF
version = 2
root = "$d/root"
state = "$d/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$d/c.sock"
[ttrpc]
  address = "$d/c.sock.ttrpc"
[debug]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$d/opt"
EOF
    step "start containerd"
    setsid containerd --config "$d/config.toml" >"$d/containerd.log" 2>&1 &
    CONTAINERD_PID=$!
    local pid=$CONTAINERD_PID
    echo "$pid" >>"$PIDS_FILE"
    local i ok=0
    for i in $(seq 100); do
        if ctr version >/dev/null 2>&1; then ok=1; break; fi
        kill -0 "$pid" 2>/dev/null || { tail -30 "$d/containerd.log" >&2; fail "containerd exited"; }
        sleep 0.2
    done
    ((ok)) || { tail -30 "$d/containerd.log" >&2; fail "containerd did not answer within 20 s"; }
    x ctr version >&2
}
# shellcheck disable=SC2317
containerd_stop() {
    [[ -n $CONTAINERD_PID ]] || return 0
    kill "$CONTAINERD_PID" 2>/dev/null || return 0
    local i
    for i in $(seq 50); do kill -0 "$CONTAINERD_PID" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$CONTAINERD_PID" 2>/dev/null || true
}

test_containerd() {
    trap containerd_stop EXIT
    containerd_start "$TEST_DIR/containerd"

    step "push fixtures with skopeo"
    local L=$TEST_DIR/layout base=$NS/containerd
    make_oci_layout "$L" containerd
    local d_amd64 d_arm64 d_multi
    d_amd64=$(layout_digest "$L" amd64)
    d_arm64=$(layout_digest "$L" arm64)
    d_multi=$(layout_digest "$L" multi)
    sko copy --dest-tls-verify=false "oci:$L:amd64" "docker://$REG/$base/app:v1"
    sko copy --dest-tls-verify=false --all "oci:$L:multi" "docker://$REG/$base/multi:v1"

    step "ctr images pull --plain-http (single image)"
    x ctr images pull --plain-http --platform linux/amd64 "$REG/$base/app:v1" >&2
    ctr images ls >"$TEST_DIR/ls.txt"
    cat "$TEST_DIR/ls.txt" >&2
    assert_eq "$d_amd64" "$(awk -v r="$REG/$base/app:v1" '$1 == r {print $3}' "$TEST_DIR/ls.txt")" "ctr image target digest"
    ctr content get "$d_amd64" >"$TEST_DIR/m.json"
    assert_eq "$d_amd64" "$(sha256_file "$TEST_DIR/m.json")" "manifest bytes in the content store"
    local blob
    for blob in $(jq -r '.config.digest, .layers[].digest' "$TEST_DIR/m.json"); do
        assert_eq "$blob" "$(ctr content get "$blob" | sha256_stdin)" "blob in content store"
        cmp <(ctr content get "$blob") "$L/blobs/sha256/${blob#sha256:}" || fail "blob $blob differs from the layout"
    done
    x ctr snapshots --snapshotter native ls >&2

    step "ctr images pull --all-platforms (two-arch index)"
    x ctr images pull --plain-http --all-platforms "$REG/$base/multi:v1" >&2
    ctr images ls >"$TEST_DIR/ls.txt"
    assert_eq "$d_multi" "$(awk -v r="$REG/$base/multi:v1" '$1 == r {print $3}' "$TEST_DIR/ls.txt")" "ctr index target digest"
    assert_eq "linux/amd64,linux/arm64" "$(awk -v r="$REG/$base/multi:v1" '$1 == r {print $6}' "$TEST_DIR/ls.txt")" "platforms"
    ctr content get "$d_arm64" >"$TEST_DIR/arm64.json"
    assert_eq "$d_arm64" "$(sha256_file "$TEST_DIR/arm64.json")" "arm64 manifest fetched"
    for blob in $(jq -r '.config.digest, .layers[].digest' "$TEST_DIR/arm64.json"); do
        assert_eq "$blob" "$(ctr content get "$blob" | sha256_stdin)" "arm64 blob in content store"
    done

    step "ctr images push --plain-http to new repositories"
    x ctr images push --plain-http --platform linux/amd64 "$REG/$base/pushed:v1" "$REG/$base/app:v1" >&2
    sko inspect --raw --tls-verify=false "docker://$REG/$base/pushed:v1" >"$TEST_DIR/pushed.json"
    assert_eq "$d_amd64" "$(sha256_file "$TEST_DIR/pushed.json")" "skopeo inspect --raw digest of ctr-pushed image"
    assert_eq "$d_amd64" "$(sko inspect --tls-verify=false "docker://$REG/$base/pushed:v1" | jq -r .Digest)" "skopeo inspect .Digest"
    x ctr images push --plain-http "$REG/$base/pushed-multi:v1" "$REG/$base/multi:v1" >&2
    sko inspect --raw --tls-verify=false "docker://$REG/$base/pushed-multi:v1" >"$TEST_DIR/pushed-multi.json"
    assert_eq "$d_multi" "$(sha256_file "$TEST_DIR/pushed-multi.json")" "ctr-pushed index digest"
    assert_eq "$d_arm64" "$(manifest_digest "$base/pushed-multi" "$d_arm64")" "ctr-pushed arm64 child"

    step "stop containerd"
    containerd_stop
    trap - EXIT
}

# ---------------------------------------------------------------------------
# oras (ORAS Python SDK): chunked upload, subject, referrers API
# ---------------------------------------------------------------------------
test_oras() {
    [[ -x $VENV/bin/python ]] || fail "venv $VENV missing: run scripts/install-test-deps.sh"
    local rc=0
    x "$VENV/bin/python" "$SCRIPT_DIR/oras_test.py" --registry "$REG" --repo "$NS/oras/artifact" \
        --workdir "$TEST_DIR/work" 2>&1 | tee "$TEST_DIR/oras.out" || rc=$?
    case $rc in
        0) ;;
        3) fail "registry does not implement the OCI 1.1 referrers API (GET /v2/<name>/referrers/<digest> -> 404); expected for distribution 2.8, a bug in berth" ;;
        *) fail "$(grep -m1 '^ASSERTION FAILED' "$TEST_DIR/oras.out" 2>/dev/null | sed 's/^ASSERTION FAILED: //' || echo "oras_test.py exited with $rc")" ;;
    esac
}

# ---------------------------------------------------------------------------
# dxf (python-dxf CLI)
# ---------------------------------------------------------------------------
test_dxf() {
    [[ -x $VENV/bin/dxf ]] || fail "venv $VENV has no dxf: run scripts/install-test-deps.sh"
    export DXF_HOST=$REG DXF_INSECURE=1 DXF_PROGRESS=0
    local r1=$NS/dxf/one r2=$NS/dxf/two f=$TEST_DIR/blob.bin dgst
    local dxf=$VENV/bin/dxf
    head -c 300000 /dev/urandom >"$f"

    step "push-blob"
    dgst=$(x "$dxf" push-blob "$r1" "$f" @v1)
    assert_eq "$(sha256_file "$f")" "$dgst" "push-blob digest"
    step "pull-blob"
    x "$dxf" pull-blob "$r1" "$dgst" >"$TEST_DIR/pulled.bin"
    cmp "$f" "$TEST_DIR/pulled.bin" || fail "pulled blob differs"
    echo "ok: pulled bytes identical" >&2
    x "$dxf" pull-blob "$r1" @v1 >"$TEST_DIR/pulled-alias.bin"
    cmp "$f" "$TEST_DIR/pulled-alias.bin" || fail "blob pulled via alias differs"
    assert_eq 300000 "$(x "$dxf" blob-size "$r1" "$dgst")" "blob-size"
    assert_eq "$dgst" "$(x "$dxf" get-alias "$r1" v1)" "get-alias v1"

    step "mount-blob into another repository"
    assert_eq "$dgst" "$(x "$dxf" mount-blob "$r2" "$r1" "$dgst")" "mount-blob digest"
    local code
    code=$(rcurl -o /dev/null -w '%{http_code}' -I "http://$REG/v2/$r2/blobs/$dgst")
    assert_eq 200 "$code" "HEAD mounted blob in $r2"
    x "$dxf" pull-blob "$r2" "$dgst" >"$TEST_DIR/mounted.bin"
    cmp "$f" "$TEST_DIR/mounted.bin" || fail "mounted blob differs"
    echo "ok: mounted blob bytes identical" >&2
    x "$dxf" set-alias "$r2" v2 "$dgst" >/dev/null
    assert_eq "v2" "$(x "$dxf" list-aliases "$r2" | sort | tr '\n' ' ' | sed 's/ $//')" "list-aliases of $r2"

    step "list-repos"
    x "$dxf" list-repos >"$TEST_DIR/repos.txt"
    grep -qxF "$r1" "$TEST_DIR/repos.txt" || fail "list-repos does not list $r1: $(tr '\n' ' ' <"$TEST_DIR/repos.txt")"
    grep -qxF "$r2" "$TEST_DIR/repos.txt" || fail "list-repos does not list $r2: $(tr '\n' ' ' <"$TEST_DIR/repos.txt")"
    echo "ok: list-repos lists $r1 and $r2 ($(wc -l <"$TEST_DIR/repos.txt") repos in total)" >&2
}

# ---------------------------------------------------------------------------
# auth: a second berth with --auth (token auth), driven by docker, skopeo, podman, ctr
# ---------------------------------------------------------------------------

# Run a command that is expected to fail; its combined output goes to the log and to
# $FAIL_OUT, for assertions on the message.
fails_with() { # description cmd...
    local what=$1; shift
    printf '+ (expect failure) %s\n' "$*" >&2
    if FAIL_OUT=$("$@" 2>&1); then
        printf '%s\n' "$FAIL_OUT" >&2
        fail "$what: command unexpectedly succeeded: $*"
    fi
    printf '%s\n' "$FAIL_OUT" >&2
    printf 'ok: %s (failed as expected)\n' "$what" >&2
}

# Admin API / registry calls as the system admin of the auth instance (basic auth).
# acurl_code METHOD PATH [JSON] -> HTTP status on stdout, body in $TEST_DIR/api.out
acurl_code() {
    local args=(-sS --max-time 30 -u "admin:$AUTH_ADMIN_PW" -X "$1" -o "$TEST_DIR/api.out" -w '%{http_code}')
    [[ $# -lt 3 ]] || args+=(-H 'Content-Type: application/json' --data "$3")
    printf '+ curl -X %s %s %s\n' "$1" "$2" "${3:-}" >&2
    curl "${args[@]}" "http://$AREG$2"
}
api() { # METHOD PATH [JSON]: must answer 2xx; prints the body
    local code
    code=$(acurl_code "$@")
    [[ $code == 2?? ]] || fail "$1 $2 answered $code: $(head -c 300 "$TEST_DIR/api.out")"
    cat "$TEST_DIR/api.out"
}
# Digest of the manifest bytes served for NAME:REF (read as admin).
auth_manifest_digest() { # name ref
    curl -sS -f --max-time 30 -u "admin:$AUTH_ADMIN_PW" -H "Accept: $ACCEPT_ALL" \
        -o "$TEST_DIR/served.json" "http://$AREG/v2/$1/manifests/$2"
    sha256_file "$TEST_DIR/served.json"
}
auth_tags() { # name -> sorted tags, space separated
    curl -sS -f --max-time 30 -u "admin:$AUTH_ADMIN_PW" "http://$AREG/v2/$1/tags/list" |
        jq -r '.tags // [] | sort | join(" ")'
}
ctr_target() { # ref -> target digest in containerd's image store
    ctr images ls | awk -v r="$1" '$1 == r {print $3}'
}

test_auth() {
    [[ ${OWN_BERTH:-0} == 1 ]] || skip "needs to start its own berth with --auth (not possible with --registry)"
    [[ -x ${BERTH_BIN:-} ]] || fail "BERTH_BIN not executable: '${BERTH_BIN:-}'"
    docker info >/dev/null 2>&1 || skip "docker info fails (no Docker Engine reachable)"

    local port
    port=$(free_port)
    export AREG=127.0.0.1:$port
    AUTH_ADMIN_PW="admin-$(rand_hex 8)"
    local dev_pw guest_pw
    dev_pw="dev1-$(rand_hex 8)"
    guest_pw="guest1-$(rand_hex 8)"
    AUTH_BERTH_PID=""
    AUTH_DOCKER_IMAGES=()
    # Client state of this test only.
    export DOCKER_CONFIG=$TEST_DIR/docker REGISTRY_AUTH_FILE=$TEST_DIR/containers-auth.json
    mkdir -p "$DOCKER_CONFIG"
    echo '{"auths":{}}' >"$DOCKER_CONFIG/config.json"
    echo '{"auths":{}}' >"$REGISTRY_AUTH_FILE"

    # shellcheck disable=SC2317
    auth_cleanup() {
        local rc=$? ids pass i
        containerd_stop
        ((${#AUTH_DOCKER_IMAGES[@]} == 0)) || docker rmi -f "${AUTH_DOCKER_IMAGES[@]}" >/dev/null 2>&1 || true
        for pass in 1 2; do
            ids=$(docker images -aq --filter "label=org.berth.test.run=$NS-auth" 2>/dev/null | sort -u)
            # shellcheck disable=SC2086
            [[ -z $ids ]] || docker rmi -f $ids >/dev/null 2>&1 || true
            ((rc != 0 && pass == 1)) || break
            sleep 2
        done
        if [[ -n $AUTH_BERTH_PID ]] && kill "$AUTH_BERTH_PID" 2>/dev/null; then
            for i in $(seq 50); do kill -0 "$AUTH_BERTH_PID" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$AUTH_BERTH_PID" 2>/dev/null || true
        fi
        if ((rc != 0)) && [[ -s $TEST_DIR/berth-auth.log ]]; then
            echo "--- last lines of the auth berth's log ($TEST_DIR/berth-auth.log):" >&2
            tail -n 15 "$TEST_DIR/berth-auth.log" >&2
        fi
    }
    trap auth_cleanup EXIT

    step "start a second berth with --auth on $AREG"
    mkdir -p "$TEST_DIR/berth-data"
    # Only the options given here: no BERTH_* settings (config file, external URL, token
    # service...) leak in from the caller's environment.
    local unset_env=() v
    for v in $(compgen -e); do [[ $v != BERTH_* ]] || unset_env+=(-u "$v"); done
    env "${unset_env[@]}" BERTH_INITIAL_ADMIN_PASSWORD="$AUTH_ADMIN_PW" BERTH_LOG="${AUTH_BERTH_LOG:-info}" \
        "$BERTH_BIN" serve --auth --listen "$AREG" --data-dir "$TEST_DIR/berth-data" \
        >"$TEST_DIR/berth-auth.log" 2>&1 &
    AUTH_BERTH_PID=$!
    echo "$AUTH_BERTH_PID" >>"$PIDS_FILE"
    local deadline=$((SECONDS + 20)) code=""
    while :; do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$AREG/v2/" || true)
        [[ $code != 401 ]] || break
        kill -0 "$AUTH_BERTH_PID" 2>/dev/null || fail "berth --auth exited during startup: $(tail -3 "$TEST_DIR/berth-auth.log" | tr '\n' ' ')"
        ((SECONDS < deadline)) || fail "berth --auth did not answer GET /v2/ with 401 within 20 s (last: '$code')"
        sleep 0.2
    done
    curl -sS --max-time 10 -D "$TEST_DIR/h" -o /dev/null "http://$AREG/v2/"
    assert_contains "$(tr -d '\r' <"$TEST_DIR/h" | grep -i '^www-authenticate:')" \
        "Bearer realm=\"http://$AREG/token\",service=\"berth\"" "anonymous GET /v2/ challenges with the token realm"

    step "setup via the admin API: users dev1, guest1; private project team"
    api POST /api/v1/users "{\"name\":\"dev1\",\"password\":\"$dev_pw\",\"system_admin\":false}" >&2
    api POST /api/v1/users "{\"name\":\"guest1\",\"password\":\"$guest_pw\",\"system_admin\":false}" >&2
    api POST /api/v1/projects '{"name":"team","public":false}' >&2
    api PUT /api/v1/projects/team/members/dev1 '{"role":"developer"}' >&2
    api PUT /api/v1/projects/team/members/guest1 '{"role":"guest"}' >&2
    assert_eq "dev1=developer guest1=guest" \
        "$(api GET /api/v1/projects/team/members | jq -r '[.[] | "\(.user)=\(.role)"] | sort | join(" ")')" "members of team"

    # ---- docker ----------------------------------------------------------
    local img=$AREG/team/docker/app:v1 img_guest=$AREG/team/docker/app:guest ctx id digest
    AUTH_DOCKER_IMAGES=("$img" "$img_guest")
    step "docker: build two images FROM scratch"
    for ctx in v1 guest; do
        mkdir -p "$TEST_DIR/ctx-$ctx"
        printf 'auth %s %s\n' "$ctx" "$(rand_hex 8)" >"$TEST_DIR/ctx-$ctx/hello.txt"
        printf 'FROM scratch\nLABEL org.berth.test.run=%s-auth\nCOPY hello.txt /hello.txt\n' "$NS" >"$TEST_DIR/ctx-$ctx/Dockerfile"
    done
    DOCKER_BUILDKIT=0 x docker build -q -t "$img" "$TEST_DIR/ctx-v1" >&2
    DOCKER_BUILDKIT=0 x docker build -q -t "$img_guest" "$TEST_DIR/ctx-guest" >&2
    id=$(docker image inspect -f '{{.Id}}' "$img")

    step "docker: anonymous push is refused"
    fails_with "anonymous docker push" docker push "$img"
    assert_contains "$FAIL_OUT" 'unauthorized: project "team" is private or does not exist: log in to push it' "anonymous push: message"

    step "docker login as dev1 (developer), push, rmi, pull"
    x docker login "$AREG" -u dev1 --password-stdin <<<"$dev_pw" >"$TEST_DIR/login.out" 2>&1 || {
        cat "$TEST_DIR/login.out" >&2; fail "docker login as dev1 failed: $(tail -1 "$TEST_DIR/login.out")"; }
    cat "$TEST_DIR/login.out" >&2
    assert_contains "$(cat "$TEST_DIR/login.out")" "Login Succeeded" "docker login dev1"
    assert_eq 1 "$(jq --arg r "$AREG" '.auths | has($r) | if . then 1 else 0 end' "$DOCKER_CONFIG/config.json")" \
        "docker config.json has an entry for $AREG"
    # docker login asks for an offline token; berth answers with a refresh_token, which docker
    # keeps as identitytoken and trades for access tokens (POST /token grant_type=refresh_token).
    [[ $(jq -r --arg r "$AREG" '.auths[$r].identitytoken // ""' "$DOCKER_CONFIG/config.json") == *.*.* ]] ||
        fail "docker login stored no identitytoken (refresh token) for $AREG"
    echo "ok: docker stored a refresh token (identitytoken)" >&2
    x docker push "$img" | tee "$TEST_DIR/push.out" >&2
    digest=$(grep -oE 'digest: sha256:[0-9a-f]{64}' "$TEST_DIR/push.out" | cut -d' ' -f2)
    [[ -n $digest ]] || fail "docker push printed no digest"
    assert_eq "$digest" "$(auth_manifest_digest team/docker/app v1)" "served manifest digest == docker push digest"
    assert_eq "$id" "$(jq -r .config.digest "$TEST_DIR/served.json")" "config digest == image id"
    x docker rmi "$img" >&2
    assert_fails "image removed locally" docker image inspect "$img"
    x docker pull "$img" >&2
    assert_eq "$id" "$(docker image inspect -f '{{.Id}}' "$img")" "image id after pull as dev1"
    assert_contains "$(docker image inspect -f '{{json .RepoDigests}}' "$img")" "$AREG/team/docker/app@$digest" "RepoDigests"
    x docker logout "$AREG" >&2
    assert_eq 0 "$(jq --arg r "$AREG" '.auths // {} | has($r) | if . then 1 else 0 end' "$DOCKER_CONFIG/config.json")" \
        "docker logout removed the credentials"

    step "docker: anonymous pull of the private project is refused"
    x docker rmi "$img" >&2
    fails_with "anonymous docker pull" docker pull "$img"
    assert_contains "$FAIL_OUT" 'unauthorized: project "team" is private or does not exist: log in to pull it' "anonymous pull: message names the private project"

    step "docker login as guest1 (guest): pull works, push is denied"
    x docker login "$AREG" -u guest1 --password-stdin <<<"$guest_pw" >"$TEST_DIR/login.out" 2>&1 || {
        cat "$TEST_DIR/login.out" >&2; fail "docker login as guest1 failed: $(tail -1 "$TEST_DIR/login.out")"; }
    assert_contains "$(cat "$TEST_DIR/login.out")" "Login Succeeded" "docker login guest1"
    x docker pull "$img" >&2
    assert_eq "$id" "$(docker image inspect -f '{{.Id}}' "$img")" "image id after pull as guest1"
    fails_with "docker push as guest" docker push "$img_guest"
    assert_contains "$FAIL_OUT" "denied" "guest push: denied"
    assert_contains "$FAIL_OUT" "role guest" "guest push: message names the role the user has"
    assert_contains "$FAIL_OUT" "push needs developer" "guest push: message names the role that is missing"
    assert_eq "v1" "$(auth_tags team/docker/app)" "no tag was created by the denied push"

    step "docker: wrong password"
    fails_with "docker login with a wrong password" docker login "$AREG" -u dev1 --password-stdin <<<"wrong-$dev_pw"
    assert_contains "$FAIL_OUT" "invalid username or password" "wrong password: message"
    x docker logout "$AREG" >&2
    x docker rmi "$img" "$img_guest" >&2

    # ---- skopeo ----------------------------------------------------------
    local L=$TEST_DIR/layout sk=$AREG/team/skopeo/app d_amd64 blob
    step "skopeo login (dev1), copy push and pull"
    make_oci_layout "$L" auth
    d_amd64=$(layout_digest "$L" amd64)
    fails_with "skopeo login with a wrong password" \
        sko login --tls-verify=false --authfile "$REGISTRY_AUTH_FILE" -u dev1 --password-stdin "$AREG" <<<"wrong-$dev_pw"
    assert_contains "$FAIL_OUT" "invalid username/password" "skopeo wrong password: message (skopeo words it itself)"
    sko login --tls-verify=false --authfile "$REGISTRY_AUTH_FILE" -u dev1 --password-stdin "$AREG" <<<"$dev_pw" >&2
    assert_eq dev1 "$(jq -r --arg r "$AREG" '.auths[$r].auth' "$REGISTRY_AUTH_FILE" | base64 -d | cut -d: -f1)" \
        "authfile holds dev1's credentials"
    sko copy --authfile "$REGISTRY_AUTH_FILE" --dest-tls-verify=false --digestfile "$TEST_DIR/sk-digest" \
        "oci:$L:amd64" "docker://$sk:v1" >&2
    assert_eq "$d_amd64" "$(cat "$TEST_DIR/sk-digest")" "skopeo push digest == layout digest"
    assert_eq "$d_amd64" "$(auth_manifest_digest team/skopeo/app v1)" "served manifest digest"
    sko copy --authfile "$REGISTRY_AUTH_FILE" --src-tls-verify=false "docker://$sk:v1" "oci:$TEST_DIR/back:v1" >&2
    assert_eq "$d_amd64" "$(layout_digest "$TEST_DIR/back" v1)" "skopeo pulled manifest digest"
    for blob in $(jq -r '.config.digest, .layers[].digest' "$TEST_DIR/served.json"); do
        cmp "$L/blobs/sha256/${blob#sha256:}" "$TEST_DIR/back/blobs/sha256/${blob#sha256:}" ||
            fail "blob $blob differs after the authenticated round trip"
    done
    echo "ok: config and layer blobs identical after the round trip" >&2
    fails_with "anonymous skopeo inspect of the private repo" sko inspect --raw --tls-verify=false --no-creds "docker://$sk:v1"
    assert_contains "$FAIL_OUT" 'unauthorized: project \"team\" is private or does not exist: log in to pull it' "anonymous inspect: message (quotes escaped by logrus)"
    sko logout --authfile "$REGISTRY_AUTH_FILE" "$AREG" >&2
    assert_eq "null" "$(jq -c --arg r "$AREG" '.auths[$r]' "$REGISTRY_AUTH_FILE")" "skopeo logout removed the credentials"

    # ---- podman ----------------------------------------------------------
    step "podman login (dev1), pull and push (vfs store)"
    containers_env "$TEST_DIR/store"
    pod login --tls-verify=false --authfile "$REGISTRY_AUTH_FILE" -u dev1 --password-stdin "$AREG" <<<"$dev_pw" >&2
    pod pull --tls-verify=false --authfile "$REGISTRY_AUTH_FILE" "$sk:v1" >&2
    pod image inspect "$sk:v1" >"$TEST_DIR/pod-inspect.json"
    assert_eq "$d_amd64" "$(jq -r '.[0].Digest' "$TEST_DIR/pod-inspect.json")" "podman pulled digest"
    assert_eq "$(jq -r '.config.digest | ltrimstr("sha256:")' "$TEST_DIR/served.json")" \
        "$(jq -r '.[0].Id' "$TEST_DIR/pod-inspect.json")" "podman image id == config digest"
    pod tag "$sk:v1" "$AREG/team/podman/app:v1"
    pod push --tls-verify=false --authfile "$REGISTRY_AUTH_FILE" --digestfile "$TEST_DIR/pod-digest" \
        "$AREG/team/podman/app:v1" >&2
    assert_eq "$(cat "$TEST_DIR/pod-digest")" "$(auth_manifest_digest team/podman/app v1)" "served digest == podman push digest"
    assert_eq "$(jq -c '[.config.digest, .layers[].digest]' "$L/blobs/sha256/${d_amd64#sha256:}")" \
        "$(jq -c '[.config.digest, .layers[].digest]' "$TEST_DIR/served.json")" "podman push: same config and layers"
    pod logout --authfile "$REGISTRY_AUTH_FILE" "$AREG" >&2
    fails_with "podman pull after logout" pod pull --tls-verify=false --authfile "$REGISTRY_AUTH_FILE" "$AREG/team/podman/app:v1"
    assert_contains "$FAIL_OUT" 'is private or does not exist: log in to pull it' "podman anonymous pull: message"

    # ---- containerd ------------------------------------------------------
    containerd_start "$TEST_DIR/containerd"
    step "ctr: pull and push with --user dev1"
    x ctr images pull --plain-http --user "dev1:$dev_pw" "$sk:v1" >&2
    assert_eq "$d_amd64" "$(ctr_target "$sk:v1")" "ctr pulled target digest"
    for blob in $(jq -r '.config.digest, .layers[].digest' "$L/blobs/sha256/${d_amd64#sha256:}"); do
        cmp <(ctr content get "$blob") "$L/blobs/sha256/${blob#sha256:}" || fail "blob $blob in containerd differs"
    done
    echo "ok: blobs in containerd's content store identical" >&2
    x ctr images push --plain-http --user "dev1:$dev_pw" "$AREG/team/ctr/pushed:v1" "$sk:v1" >&2
    sko inspect --raw --tls-verify=false --creds "dev1:$dev_pw" "docker://$AREG/team/ctr/pushed:v1" >"$TEST_DIR/ctr-pushed.json"
    assert_eq "$d_amd64" "$(sha256_file "$TEST_DIR/ctr-pushed.json")" "skopeo inspect --raw digest of the ctr-pushed image"
    step "ctr: anonymous pull, wrong password and guest push fail"
    fails_with "anonymous ctr pull of the private repo" ctr images pull --plain-http "$AREG/team/ctr/pushed:v1"
    assert_contains "$FAIL_OUT" "401 Unauthorized" "anonymous ctr pull: 401"
    fails_with "ctr pull with a wrong password" ctr images pull --plain-http --user "dev1:wrong-$dev_pw" "$AREG/team/ctr/pushed:v1"
    assert_contains "$FAIL_OUT" "failed to fetch oauth token: unexpected status: 401" "ctr wrong password: token request refused"
    fails_with "ctr push as guest" ctr images push --plain-http --user "guest1:$guest_pw" "$AREG/team/ctr/guest:v1" "$sk:v1"
    assert_contains "$FAIL_OUT" "403 Forbidden" "ctr guest push: 403"
    assert_fails "no manifest pushed by the guest" curl -sSf --max-time 10 -o /dev/null -u "admin:$AUTH_ADMIN_PW" \
        -H "Accept: $ACCEPT_ALL" "http://$AREG/v2/team/ctr/guest/manifests/v1"
    containerd_stop

    # ---- robot account ---------------------------------------------------
    step "robot account with team:pull"
    api POST /api/v1/robots '{"name":"ci","grants":["team:pull"],"expires_in":"1d"}' >"$TEST_DIR/robot.json"
    local rname rsecret
    rname=$(jq -r .robot.name "$TEST_DIR/robot.json")
    rsecret=$(jq -r .secret "$TEST_DIR/robot.json")
    assert_eq "robot\$ci" "$rname" "robot name"
    [[ -n $rsecret && $rsecret != null ]] || fail "robot creation returned no secret"
    sko copy --src-tls-verify=false --src-creds "$rname:$rsecret" "docker://$sk:v1" "oci:$TEST_DIR/robot:v1" >&2
    assert_eq "$d_amd64" "$(layout_digest "$TEST_DIR/robot" v1)" "robot pull digest"
    fails_with "robot push (pull-only grant)" sko copy --dest-tls-verify=false --dest-creds "$rname:$rsecret" \
        "oci:$L:amd64" "docker://$AREG/team/robot/pushed:v1"
    assert_contains "$FAIL_OUT" "denied" "robot push: denied"
    assert_contains "$FAIL_OUT" "no push permission" "robot push: message"
    step "revoke the robot: the same pull fails"
    api POST "/api/v1/robots/$(jq -rn --arg n "$rname" '$n | @uri')/revoke" >&2
    fails_with "pull with a revoked robot" sko copy --src-tls-verify=false --src-creds "$rname:$rsecret" \
        "docker://$sk:v1" "oci:$TEST_DIR/robot-revoked:v1"
    assert_contains "$FAIL_OUT" "invalid username or password" "revoked robot: message"

    step "stop the auth berth"
    trap - EXIT
    auth_cleanup
    if grep -n -E 'panicked|ERROR' "$TEST_DIR/berth-auth.log" >&2; then fail "the auth berth logged errors or panics"; fi
    echo "ok: no errors or panics in the auth berth's log" >&2
}

# ---------------------------------------------------------------------------
# harness
# ---------------------------------------------------------------------------

# ERR trap of the per-test child process: print the failed command and the call stack.
on_err() { # rc command
    local i where=""
    for ((i = 1; i < ${#FUNCNAME[@]}; i++)); do
        where+=" ${FUNCNAME[i]}:${BASH_LINENO[i - 1]}"
    done
    printf 'ERROR: command failed (exit %s): %s\n  at%s\n' "$1" "$2" "$where" >&2
    reason "command failed (exit $1): $2 (at${where% run_one*})"
}

# ---------------------------------------------------------------------------
# lifecycle: tag immutability as skopeo sees it (berth runs with --immutable-tags 'frozen-*')
# ---------------------------------------------------------------------------
test_lifecycle() {
    [[ ${BERTH_STARTED_HERE:-0} == 1 ]] || skip "needs the berth this script starts (with --immutable-tags)"
    local L=$TEST_DIR/layout base=$NS/lifecycle
    local app=$REG/$base/app tv=(--tls-verify=false)
    make_oci_layout "$L" lifecycle
    local d_amd64
    d_amd64=$(layout_digest "$L" amd64)

    step "push an immutable tag, then the same image again (allowed: clients retry)"
    sko copy --authfile "$REGISTRY_AUTH_FILE" --dest-tls-verify=false "oci:$L:amd64" "docker://$app:frozen-1"
    sko copy --authfile "$REGISTRY_AUTH_FILE" --dest-tls-verify=false "oci:$L:amd64" "docker://$app:frozen-1"

    step "push another image onto it: DENIED"
    if sko copy --authfile "$REGISTRY_AUTH_FILE" --dest-tls-verify=false "oci:$L:arm64" "docker://$app:frozen-1" \
        2>"$TEST_DIR/err"; then
        fail "overwriting an immutable tag succeeded"
    fi
    cat "$TEST_DIR/err" >&2
    assert_contains "$(cat "$TEST_DIR/err")" "tag $base/app:frozen-1 is immutable (rule frozen-*)" "skopeo shows berth's reason"

    step "delete it (skopeo deletes by digest): DENIED"
    if sko delete "${tv[@]}" "docker://$app:frozen-1" 2>"$TEST_DIR/err"; then
        fail "deleting an immutable tag succeeded"
    fi
    cat "$TEST_DIR/err" >&2
    assert_contains "$(cat "$TEST_DIR/err")" "deleted with its manifest" "skopeo shows berth's reason"
    assert_eq "$d_amd64" "$(manifest_digest "$base/app" frozen-1)" "the immutable tag still names the first image"

    step "a mutable tag still moves and deletes"
    sko copy --authfile "$REGISTRY_AUTH_FILE" --dest-tls-verify=false "oci:$L:arm64" "docker://$app:latest"
    sko delete "${tv[@]}" "docker://$app:latest"

    if ! docker info >/dev/null 2>&1; then
        echo "note: docker info fails; skipping the docker push of an immutable tag" >&2
        return 0
    fi
    step "docker push of another image onto an immutable tag: DENIED"
    local img=$REG/$base/docker:frozen-1 ctx n
    LIFECYCLE_IMG=$img   # the EXIT trap runs after this function's locals are gone
    # shellcheck disable=SC2317
    lifecycle_docker_cleanup() {
        docker rmi -f "$LIFECYCLE_IMG" "$LIFECYCLE_IMG-b" >/dev/null 2>&1 || true
        # The first image lost its tag to the second: find it by the run label.
        local ids
        ids=$(docker images -aq --filter "label=org.berth.test.run=$NS" 2>/dev/null | sort -u)
        # shellcheck disable=SC2086
        [[ -z $ids ]] || docker rmi -f $ids >/dev/null 2>&1 || true
    }
    trap lifecycle_docker_cleanup EXIT
    for n in a b; do
        ctx=$TEST_DIR/docker-$n
        mkdir -p "$ctx"
        printf '%s %s\n' "$n" "$(rand_hex 8)" >"$ctx/f.txt"
        printf 'FROM scratch\nLABEL org.berth.test.run=%s\nCOPY f.txt /f.txt\n' "$NS" >"$ctx/Dockerfile"
    done
    DOCKER_BUILDKIT=0 x docker build -q -t "$img" "$TEST_DIR/docker-a"
    x docker push "$img"
    DOCKER_BUILDKIT=0 x docker build -q -t "$img-b" "$TEST_DIR/docker-b"
    x docker tag "$img-b" "$img"
    if docker push "$img" >"$TEST_DIR/push.out" 2>&1; then
        fail "docker push onto an immutable tag succeeded"
    fi
    cat "$TEST_DIR/push.out" >&2
    assert_contains "$(cat "$TEST_DIR/push.out")" "is immutable (rule frozen-*)" "docker shows berth's reason"
}

# ---------------------------------------------------------------------------
# retention: a berth of its own with --retention, --gc-untagged and --immutable-tags, as skopeo sees it
# ---------------------------------------------------------------------------
RET_BERTH_PID=""
# Start $BERTH_BIN on $RREG with data dir $RDATA and the given options; log to $TEST_DIR/NAME.log.
ret_berth_start() { # name options...
    local name=$1; shift
    local unset_env=() v code="" deadline=$((SECONDS + 20))
    # Only the options given here: no BERTH_* settings leak in from the caller's environment.
    for v in $(compgen -e); do [[ $v != BERTH_* ]] || unset_env+=(-u "$v"); done
    printf '+ berth serve --listen %s --data-dir %s %s\n' "$RREG" "$RDATA" "$*" >&2
    env "${unset_env[@]}" BERTH_LOG=info BERTH_LOG_FORMAT=json \
        "$BERTH_BIN" serve --listen "$RREG" --data-dir "$RDATA" "$@" >"$TEST_DIR/$name.log" 2>&1 &
    RET_BERTH_PID=$!
    echo "$RET_BERTH_PID" >>"$PIDS_FILE"
    while :; do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$RREG/v2/" || true)
        [[ $code != 200 ]] || break
        kill -0 "$RET_BERTH_PID" 2>/dev/null || fail "berth exited during startup: $(tail -3 "$TEST_DIR/$name.log" | tr '\n' ' ')"
        ((SECONDS < deadline)) || fail "berth did not answer GET /v2/ with 200 within 20 s (last: '$code')"
        sleep 0.2
    done
}
# shellcheck disable=SC2317
ret_berth_stop() {
    [[ -n $RET_BERTH_PID ]] || return 0
    local i
    if kill "$RET_BERTH_PID" 2>/dev/null; then
        for i in $(seq 100); do kill -0 "$RET_BERTH_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$RET_BERTH_PID" 2>/dev/null || true
    fi
    RET_BERTH_PID=""
}
# One small single-layer image per tag in the OCI layout L, each with its own content.
make_tag_images() { # layout-dir tag...
    local L=$1 t src; shift
    x umoci init --layout "$L" >&2
    for t in "$@"; do
        src=$TEST_DIR/rootfs-$t
        mkdir -p "$src"
        printf 'berth retention %s %s\n' "$t" "$(rand_hex 8)" >"$src/tag.txt"
        x umoci new --image "$L:$t" >&2
        x umoci insert --image "$L:$t" "$src" /app >&2
        x umoci config --image "$L:$t" --architecture amd64 --os linux >&2
    done
}
# Wait (at most 30 s) until the log has N JSON lines with this message.
wait_log_lines() { # log message n
    local deadline=$((SECONDS + 30))
    until (($(jq -c --arg m "$2" 'select(.message == $m)' "$1" 2>/dev/null | wc -l) >= $3)); do
        ((SECONDS < deadline)) || fail "no $3 '$2' lines in $1 within 30 s"
        sleep 0.2
    done
}

test_retention() {
    [[ ${OWN_BERTH:-0} == 1 ]] || skip "needs to start its own berth with --retention (not possible with --registry)"
    [[ -x ${BERTH_BIN:-} ]] || fail "BERTH_BIN not executable: '${BERTH_BIN:-}'"
    local port
    port=$(free_port)
    export RREG=127.0.0.1:$port RDATA=$TEST_DIR/berth-data
    # Two projects: P is named in --gc-untagged, Q is not.
    local P=$NS Q=$NS-other
    local p_app=$P/retention/app q_app=$Q/retention/app tv=(--tls-verify=false)
    local rule_p="$P:keep-last=2:protect=v1" rule_q="$Q:keep-last=1"
    local L=$TEST_DIR/layout t i
    trap ret_berth_stop EXIT

    step "images: one per tag (umoci)"
    make_tag_images "$L" frozen-1 v1 v2 v3 v4 v5 q-v1 q-v2 q-v3
    declare -A dig layer
    for t in frozen-1 v1 v2 v3 v4 v5 q-v1 q-v2 q-v3; do
        dig[$t]=$(layout_digest "$L" "$t")
        layer[$t]=$(jq -r '.layers[0].digest' "$L/blobs/sha256/${dig[$t]#sha256:}")
    done

    step "start berth with --immutable-tags 'frozen-*' and no GC schedule"
    mkdir -p "$RDATA"
    ret_berth_start berth-push --immutable-tags 'frozen-*' --gc-interval 0

    step "push with skopeo, one second apart: berth keeps push times in whole seconds, and keep-last orders by them"
    # Oldest first: P gets frozen-1 v1 v2 v3 v4 v5, Q gets v1 v2 v3.
    local p_tags=(frozen-1 v1 v2 v3 v4 v5) q_tags=(v1 v2 v3)
    for i in "${!p_tags[@]}"; do
        ((i == 0)) || sleep 1.1
        t=${p_tags[i]}
        sko copy --dest-tls-verify=false --digestfile "$TEST_DIR/d" "oci:$L:$t" "docker://$RREG/$p_app:$t"
        assert_eq "${dig[$t]}" "$(cat "$TEST_DIR/d")" "pushed $p_app:$t"
        if ((i < ${#q_tags[@]})); then
            t=${q_tags[i]}
            sko copy --dest-tls-verify=false --digestfile "$TEST_DIR/d" "oci:$L:q-$t" "docker://$RREG/$q_app:$t"
            assert_eq "${dig[q-$t]}" "$(cat "$TEST_DIR/d")" "pushed $q_app:$t"
        fi
    done
    sko list-tags "${tv[@]}" "docker://$RREG/$p_app" >"$TEST_DIR/tags.json"
    assert_eq "frozen-1 v1 v2 v3 v4 v5" "$(jq -r '.Tags | sort | join(" ")' "$TEST_DIR/tags.json")" "list-tags of $p_app before retention"

    # What the rules mean here: in P keep the 2 newest (v5, v4) and v1 (protected); frozen-1 is
    # immutable, so it stays although it is the oldest; v2 and v3 go. In Q keep the newest (v3).
    step "stop berth; berth retention --dry-run lists exactly what the rules delete"
    ret_berth_stop
    x "$BERTH_BIN" retention --dry-run --data-dir "$RDATA" --immutable-tags 'frozen-*' \
        --rule "$rule_p" --rule "$rule_q" >"$TEST_DIR/plan.txt"
    cat "$TEST_DIR/plan.txt" >&2
    # In order of repository name ("$NS-other/..." sorts before "$NS/..."), then tag.
    assert_eq "would delete $Q/retention/app:v1|would delete $Q/retention/app:v2|would delete $P/retention/app:v2|would delete $P/retention/app:v3|would delete 4 tags" \
        "$(paste -sd'|' "$TEST_DIR/plan.txt")" "berth retention --dry-run"

    step "restart berth with --retention, --gc-untagged $P, a GC run every second, no grace"
    ret_berth_start berth-gc --immutable-tags 'frozen-*' --retention "$rule_p;$rule_q" \
        --gc-untagged "$P" --gc-interval 1 --gc-grace 0 --gc-pause-ms 0 --gc-duty 100
    local log=$TEST_DIR/berth-gc.log
    # Two runs, so the second shows that retention has nothing left to do.
    wait_log_lines "$log" "scheduled retention" 2
    wait_log_lines "$log" "retention deleted a tag" 4
    jq -c 'select(.message | startswith("scheduled") or startswith("retention"))' "$log" >&2
    assert_eq "4 0" "$(jq -r 'select(.message == "scheduled retention") | .tags_deleted' "$log" | head -2 | paste -sd' ')" \
        "tags deleted by the first and the second scheduled retention"
    assert_eq "$Q/retention/app:v1 $Q/retention/app:v2 $P/retention/app:v2 $P/retention/app:v3" \
        "$(jq -r 'select(.message == "retention deleted a tag") | "\(.repo):\(.tag)"' "$log" | LC_ALL=C sort | paste -sd' ')" \
        "tags the scheduled retention deleted"
    assert_eq 2 "$(jq -r 'select(.message | startswith("scheduled garbage collection")) | .untagged_manifests' "$log" | head -1)" \
        "untagged manifests the first GC run removed (P's v2 and v3; Q's stay)"

    step "skopeo list-tags: exactly the kept tags"
    sko list-tags "${tv[@]}" "docker://$RREG/$p_app" >"$TEST_DIR/tags.json"
    assert_eq "frozen-1 v1 v4 v5" "$(jq -r '.Tags | sort | join(" ")' "$TEST_DIR/tags.json")" "list-tags of $p_app"
    sko list-tags "${tv[@]}" "docker://$RREG/$q_app" >"$TEST_DIR/tags.json"
    assert_eq "v3" "$(jq -r '.Tags | sort | join(" ")' "$TEST_DIR/tags.json")" "list-tags of $q_app"

    step "deleted tags fail to pull with 'manifest unknown'"
    for t in "$p_app:v2" "$p_app:v3" "$q_app:v1" "$q_app:v2"; do
        fails_with "pull of deleted tag $t" sko copy --src-tls-verify=false "docker://$RREG/$t" "oci:$TEST_DIR/deleted:x"
        assert_contains "$FAIL_OUT" "manifest unknown" "pull of $t: manifest unknown"
    done

    step "kept tags still pull, with the digests pushed"
    for t in frozen-1 v1 v4 v5; do
        sko copy --src-tls-verify=false "docker://$RREG/$p_app:$t" "oci:$TEST_DIR/pulled:$t"
        assert_eq "${dig[$t]}" "$(layout_digest "$TEST_DIR/pulled" "$t")" "pulled $p_app:$t"
    done
    sko copy --src-tls-verify=false "docker://$RREG/$q_app:v3" "oci:$TEST_DIR/pulled:q-v3"
    assert_eq "${dig[q-v3]}" "$(layout_digest "$TEST_DIR/pulled" q-v3)" "pulled $q_app:v3"

    step "untagged images: removed in $P (--gc-untagged), still pullable by digest in $Q"
    for t in v2 v3; do
        fails_with "pull of $p_app@${dig[$t]} (was $t)" sko inspect --raw "${tv[@]}" "docker://$RREG/$p_app@${dig[$t]}"
        assert_contains "$FAIL_OUT" "manifest unknown" "untagged manifest of $P removed"
        assert_eq 404 "$(rcurl -o /dev/null -w '%{http_code}' -I "http://$RREG/v2/$p_app/blobs/${layer[$t]}")" \
            "layer of the removed image ($t) collected"
    done
    for t in v1 v2; do
        sko inspect --raw "${tv[@]}" "docker://$RREG/$q_app@${dig[q-$t]}" >"$TEST_DIR/raw.json"
        assert_eq "${dig[q-$t]}" "$(sha256_file "$TEST_DIR/raw.json")" "untagged manifest of $Q (was $t) kept"
        assert_eq 200 "$(rcurl -o /dev/null -w '%{http_code}' -I "http://$RREG/v2/$q_app/blobs/${layer[q-$t]}")" \
            "layer of the kept untagged image ($t)"
    done

    step "skopeo delete of the immutable tag: refused with berth's reason"
    fails_with "skopeo delete of $p_app:frozen-1" sko delete "${tv[@]}" "docker://$RREG/$p_app:frozen-1"
    # skopeo prints the error body as JSON inside logrus quoting: the quotes around the message
    # pin the whole text.
    assert_contains "$FAIL_OUT" \
        "\\\"code\\\":\\\"DENIED\\\",\\\"message\\\":\\\"tag $p_app:frozen-1 is immutable (rule frozen-*): it cannot be deleted with its manifest; an administrator must remove the rule (--immutable-tags) first\\\"" \
        "skopeo shows berth's exact reason"
    assert_contains "$FAIL_OUT" "(403 Forbidden)" "skopeo delete of an immutable tag: 403"
    assert_eq "${dig[frozen-1]}" "$(sko inspect --raw "${tv[@]}" "docker://$RREG/$p_app:frozen-1" | sha256_stdin)" \
        "frozen-1 still names the image first pushed"

    step "stop berth"
    ret_berth_stop
    trap - EXIT
    if grep -n 'panicked' "$TEST_DIR"/berth-*.log >&2; then fail "berth panicked"; fi
    local errors
    errors=$(jq -c 'select(.["log.level"] == "error")' "$TEST_DIR"/berth-*.log)
    [[ -z $errors ]] || fail "berth logged errors: $errors"
    echo "ok: no errors or panics in berth's logs" >&2
}

# ---------------------------------------------------------------------------
# proxy, proxy_htpasswd: berth as a pull-through cache of a Debian docker-registry
# upstream (without auth / with htpasswd basic auth), pulled through with skopeo,
# podman, ctr (containerd mirror via hosts.toml, ?ns=) and docker
# ---------------------------------------------------------------------------
PROXY_BERTH_PID=""
PROXY_UP_PID=""
PROXY_DOCKER_IMAGES=()

# shellcheck disable=SC2317
proxy_cleanup() {
    local rc=$? i
    containerd_stop
    ((${#PROXY_DOCKER_IMAGES[@]} == 0)) || docker rmi -f "${PROXY_DOCKER_IMAGES[@]}" >/dev/null 2>&1 || true
    proxy_berth_stop
    if [[ -n $PROXY_UP_PID ]] && kill "$PROXY_UP_PID" 2>/dev/null; then
        for i in $(seq 50); do kill -0 "$PROXY_UP_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$PROXY_UP_PID" 2>/dev/null || true
    fi
    if ((rc != 0)); then
        if [[ -s ${PBERTH_LOG:-} ]]; then
            echo "--- last lines of the proxy berth's log ($PBERTH_LOG):" >&2
            tail -n 15 "$PBERTH_LOG" >&2
        fi
        if [[ -s ${UP_LOG:-} ]]; then
            echo "--- last lines of the upstream's log ($UP_LOG):" >&2
            tail -n 10 "$UP_LOG" >&2
        fi
    fi
}

# Debian's docker-registry (distribution 2.8) on a free loopback port, with a config in the
# test dir (never /etc/docker/registry/config.yml, which turns on htpasswd). Sets UP, UP_LOG,
# UP_CREDS (user:password, or empty) and UP_CURL (curl options with the credentials).
proxy_upstream_start() { # auth: none|htpasswd
    local d=$TEST_DIR/upstream auth=""
    mkdir -p "$d/data"
    UP=127.0.0.1:$(free_port)
    UP_LOG=$d/registry.log
    UP_CREDS=""
    UP_CURL=()
    if [[ $1 == htpasswd ]]; then
        local pw
        pw="up-$(rand_hex 8)"
        UP_CREDS="puller:$pw"
        UP_CURL=(-u "$UP_CREDS")
        htpasswd -Bbn puller "$pw" >"$d/htpasswd"
        auth="auth: { htpasswd: { realm: berth-upstream, path: $d/htpasswd } }"
    fi
    cat >"$d/config.yml" <<YML
version: 0.1
log: { level: info, accesslog: { disabled: true } }
storage: { filesystem: { rootdirectory: $d/data }, delete: { enabled: true } }
http: { addr: $UP }
$auth
YML
    step "start the upstream docker-registry on $UP (auth: $1)"
    # distribution reads REGISTRY_* variables as config overrides: REGISTRY_AUTH_FILE (the
    # containers auth file of this harness) would become auth.file.
    local unset_env=() v
    for v in $(compgen -e); do [[ $v != REGISTRY_* ]] || unset_env+=(-u "$v"); done
    env "${unset_env[@]}" setsid docker-registry serve "$d/config.yml" >"$UP_LOG" 2>&1 &
    PROXY_UP_PID=$!
    echo "$PROXY_UP_PID" >>"$PIDS_FILE"
    local deadline=$((SECONDS + 20)) code=""
    while :; do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "${UP_CURL[@]}" "http://$UP/v2/" || true)
        [[ $code != 200 ]] || break
        kill -0 "$PROXY_UP_PID" 2>/dev/null || fail "docker-registry exited during startup: $(tail -3 "$UP_LOG" | tr '\n' ' ')"
        ((SECONDS < deadline)) || fail "docker-registry did not answer GET /v2/ with 200 within 20 s (last: '$code')"
        sleep 0.2
    done
    if [[ -n $UP_CREDS ]]; then
        assert_eq 401 "$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://$UP/v2/")" "the upstream refuses anonymous requests"
    fi
}

# Waits until the upstream has logged every request answered so far: a marker request,
# then (bounded) until its log line shows up. Prints the number of log lines.
up_sync() {
    local tok i
    tok="berth-sync-$(rand_hex 6)"
    curl -s -o /dev/null --max-time 5 "${UP_CURL[@]}" "http://$UP/v2/?$tok" || true
    for i in $(seq 100); do
        grep -q "$tok" "$UP_LOG" && break
        ((i < 100)) || fail "the upstream did not log the marker request within 10 s"
        sleep 0.1
    done
    wc -l <"$UP_LOG"
}
# Requests the upstream logged after line SINCE, one per line (marker requests left out):
# METHOD <tab> URI <tab> STATUS <tab> USER-AGENT. distribution logs "response completed" (or
# "... with error") per request, and only "error authorizing context" for a 401 challenge.
up_requests() { # since
    tail -n +"$(($1 + 1))" "$UP_LOG" | python3 -c '
import shlex, sys
for line in sys.stdin:
    challenge = "msg=\"error authorizing context" in line
    if "msg=\"response completed" not in line and not challenge:
        continue
    try:
        kv = dict(t.split("=", 1) for t in shlex.split(line) if "=" in t)
    except ValueError:
        print("unparsable upstream log line: " + line.strip(), file=sys.stderr)
        sys.exit(1)
    if "berth-sync-" in kv.get("http.request.uri", ""):
        continue
    status = "401" if challenge else kv.get("http.response.status", "")
    print("\t".join([kv.get("http.request.method", ""), kv.get("http.request.uri", ""), status,
                     kv.get("http.request.useragent", "")]))
'
}

# What the upstream was asked for since line SINCE (a pull of repository REPO through berth):
# only berth asked (the client did not go around it), each digest of WANT was fetched with a GET
# (each blob exactly once), and no digest of NOT (another platform's manifest, config and
# layers) was asked for at all.
check_upstream_fetches() { # label since repo "want digests" "not digests"
    local label=$1 since=$2 repo=$3 want=$4 not=$5 reqs d n kind
    up_sync >/dev/null
    reqs=$(up_requests "$since")
    printf 'upstream requests for %s:\n%s\n' "$label" "$reqs" | sed 's/^/    /' >&2
    [[ -n $reqs ]] || fail "$label: the upstream got no request at all (expected a cold pull through berth)"
    n=$(awk -F'\t' '$4 !~ /^berth\//' <<<"$reqs" | wc -l)
    assert_eq 0 "$n" "$label: every upstream request came from berth (user agent berth/...)"
    for d in $want; do
        n=$(awk -F'\t' -v m="/v2/$repo/manifests/$d" -v b="/v2/$repo/blobs/$d" \
            '$1 == "GET" && $3 == 200 && ($2 == m || $2 == b)' <<<"$reqs" | wc -l)
        kind=$(awk -F'\t' -v b="/v2/$repo/blobs/$d" '$2 == b {print "blob"; exit}' <<<"$reqs")
        if [[ $kind == blob ]]; then
            assert_eq 1 "$n" "$label: upstream GETs of blob $d"
        else
            ((n >= 1)) || fail "$label: $d was never fetched from the upstream (GET $repo manifests or blobs, 200)"
            echo "ok: $label: $d fetched from the upstream" >&2
        fi
    done
    for d in $not; do
        if grep -F -- "$d" <<<"$reqs" >&2; then
            fail "$label: the upstream was asked for $d, which belongs to a platform that was not pulled"
        fi
    done
    [[ -z $not ]] || echo "ok: $label: nothing of the other platform was asked of the upstream" >&2
}
# A warm pull: berth asked the upstream for no blob since line SINCE.
check_no_blob_fetches() { # label since
    local reqs
    up_sync >/dev/null
    reqs=$(up_requests "$2")
    printf 'upstream requests for %s:\n%s\n' "$1" "$reqs" | sed 's/^/    /' >&2
    if grep -F '/blobs/' <<<"$reqs" >&2; then fail "$1: blobs were fetched from the upstream again"; fi
    echo "ok: $1: no blob fetched from the upstream" >&2
}

proxy_berth_stop() {
    [[ -n $PROXY_BERTH_PID ]] || return 0
    local i
    if kill "$PROXY_BERTH_PID" 2>/dev/null; then
        for i in $(seq 50); do kill -0 "$PROXY_BERTH_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$PROXY_BERTH_PID" 2>/dev/null || true
    fi
    PROXY_BERTH_PID=""
}
# (Re)starts the caching berth on a fresh data dir, with upstream "hub" = the docker-registry
# (project hub). Sets PREG and PBERTH_LOG. PROXY_PASSWORD_FILE overrides the password.
proxy_berth_start() { # name
    proxy_berth_stop
    local name=$1 cfg=$TEST_DIR/berth-$1.toml
    PREG=127.0.0.1:$(free_port)
    PBERTH_LOG=$TEST_DIR/berth-$name.log
    mkdir -p "$TEST_DIR/berth-$name-data"
    cat >"$cfg" <<TOML
listen = "$PREG"
data_dir = "$TEST_DIR/berth-$name-data"
log = "info"
log_format = "json"

[[upstreams]]
name = "hub"
url = "http://$UP"
TOML
    if [[ -n ${PROXY_PASSWORD_FILE:-} ]]; then
        printf 'username = "%s"\npassword_file = "%s"\n' "${UP_CREDS%%:*}" "$PROXY_PASSWORD_FILE" >>"$cfg"
    elif [[ -n $UP_CREDS ]]; then
        printf 'username = "%s"\npassword = "%s"\n' "${UP_CREDS%%:*}" "${UP_CREDS#*:}" >>"$cfg"
    fi
    step "start the caching berth '$name' on $PREG ($cfg)"
    sed 's/^password = .*/password = "..."/' "$cfg" >&2
    local unset_env=() v
    for v in $(compgen -e); do [[ $v != BERTH_* ]] || unset_env+=(-u "$v"); done
    env "${unset_env[@]}" "$BERTH_BIN" serve --config "$cfg" >"$PBERTH_LOG" 2>&1 &
    PROXY_BERTH_PID=$!
    echo "$PROXY_BERTH_PID" >>"$PIDS_FILE"
    local deadline=$((SECONDS + 20)) code=""
    while :; do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$PREG/v2/" || true)
        [[ $code != 200 ]] || break
        kill -0 "$PROXY_BERTH_PID" 2>/dev/null || fail "berth exited during startup: $(tail -3 "$PBERTH_LOG" | tr '\n' ' ')"
        ((SECONDS < deadline)) || fail "berth did not answer GET /v2/ with 200 within 20 s (last: '$code')"
        sleep 0.2
    done
}

# Digests of a manifest's config and layers (as stored in the direct pull's layout).
proxy_blobs() { # manifest-digest
    jq -r '.config.digest, .layers[].digest' "$TEST_DIR/direct/blobs/sha256/${1#sha256:}" | tr '\n' ' '
}
proxy_diff_ids() { # manifest-digest -> the config's rootfs.diff_ids as compact JSON
    local cfg
    cfg=$(jq -r .config.digest "$TEST_DIR/direct/blobs/sha256/${1#sha256:}")
    jq -c .rootfs.diff_ids "$TEST_DIR/direct/blobs/sha256/${cfg#sha256:}"
}
proxy_metric() { # name labels -> value (0 if absent)
    curl -sS --max-time 10 "http://$PREG/metrics" |
        awk -v k="$1{$2}" 'index($0, k " ") == 1 {v = $2} END {print v + 0}'
}

proxy_suite() { # auth: none|htpasswd
    [[ ${OWN_BERTH:-0} == 1 ]] || skip "needs to start its own berth with an upstream (not possible with --registry)"
    [[ -x ${BERTH_BIN:-} ]] || fail "BERTH_BIN not executable: '${BERTH_BIN:-}'"
    command -v docker-registry >/dev/null || fail "docker-registry missing: run scripts/install-test-deps.sh"
    [[ $1 != htpasswd ]] || command -v htpasswd >/dev/null || fail "htpasswd missing (apache2-utils): run scripts/install-test-deps.sh"
    trap proxy_cleanup EXIT
    proxy_upstream_start "$1"
    local src_creds=() dst_creds=()
    if [[ -n $UP_CREDS ]]; then src_creds=(--src-creds "$UP_CREDS"); dst_creds=(--dest-creds "$UP_CREDS"); fi

    step "seed the upstream: lib/app:v1 (amd64, 2 layers) and lib/multi:v1 (amd64 + arm64 index)"
    local L=$TEST_DIR/layout
    make_oci_layout "$L" proxy
    sko copy --dest-tls-verify=false "${dst_creds[@]}" "oci:$L:amd64" "docker://$UP/lib/app:v1"
    sko copy --dest-tls-verify=false "${dst_creds[@]}" --all "oci:$L:multi" "docker://$UP/lib/multi:v1"

    step "direct pull from the upstream (the reference)"
    sko copy --src-tls-verify=false "${src_creds[@]}" "docker://$UP/lib/app:v1" "oci:$TEST_DIR/direct:app"
    sko copy --src-tls-verify=false "${src_creds[@]}" --all "docker://$UP/lib/multi:v1" "oci:$TEST_DIR/direct:multi"
    local d_app d_multi d_amd64 d_arm64
    d_app=$(layout_digest "$TEST_DIR/direct" app)
    d_multi=$(layout_digest "$TEST_DIR/direct" multi)
    assert_eq "$(layout_digest "$L" amd64)" "$d_app" "direct pull: app manifest digest == seeded"
    assert_eq "$(layout_digest "$L" multi)" "$d_multi" "direct pull: index digest == seeded"
    d_amd64=$(jq -r '.manifests[] | select(.platform.architecture == "amd64") | .digest' "$TEST_DIR/direct/blobs/sha256/${d_multi#sha256:}")
    d_arm64=$(jq -r '.manifests[] | select(.platform.architecture == "arm64") | .digest' "$TEST_DIR/direct/blobs/sha256/${d_multi#sha256:}")
    local arm64_set amd64_only="" d
    arm64_set="$d_arm64 $(proxy_blobs "$d_arm64")"
    for d in $d_amd64 $(proxy_blobs "$d_amd64"); do
        [[ " $arm64_set " == *" $d "* ]] || amd64_only+="$d "
    done
    [[ -n $amd64_only ]] || fail "the amd64 and arm64 images share everything: the platform check would prove nothing"
    echo "arm64: $arm64_set; amd64 only: $amd64_only" >&2

    # ---- skopeo ----------------------------------------------------------
    proxy_berth_start skopeo
    grep -F '"message":"pull-through cache"' "$PBERTH_LOG" >&2 || fail "berth did not log its upstream at startup"
    assert_contains "$(grep -F '"message":"pull-through cache"' "$PBERTH_LOG")" "\"namespace\":\"$UP\"" "upstream namespace defaults to its host:port"
    local since blob
    step "skopeo: hub/lib/multi:v1 for linux/arm64 only"
    since=$(up_sync)
    sko copy --src-tls-verify=false --override-arch arm64 --override-os linux \
        "docker://$PREG/hub/lib/multi:v1" "oci:$TEST_DIR/sk:multi"
    assert_eq "$d_arm64" "$(layout_digest "$TEST_DIR/sk" multi)" "skopeo picked the arm64 manifest"
    for blob in $(proxy_blobs "$d_arm64"); do
        cmp "$TEST_DIR/direct/blobs/sha256/${blob#sha256:}" "$TEST_DIR/sk/blobs/sha256/${blob#sha256:}" ||
            fail "arm64 blob $blob differs from the direct pull"
    done
    check_upstream_fetches "skopeo arm64 of multi" "$since" lib/multi "$d_multi $arm64_set" "$amd64_only"

    step "skopeo: cold pull of hub/lib/app:v1 through berth"
    since=$(up_sync)
    sko copy --src-tls-verify=false "docker://$PREG/hub/lib/app:v1" "oci:$TEST_DIR/sk:app"
    assert_eq "$d_app" "$(layout_digest "$TEST_DIR/sk" app)" "skopeo through berth: manifest digest == direct"
    for blob in $(proxy_blobs "$d_app"); do
        cmp "$TEST_DIR/direct/blobs/sha256/${blob#sha256:}" "$TEST_DIR/sk/blobs/sha256/${blob#sha256:}" ||
            fail "blob $blob pulled through berth differs from the direct pull"
    done
    echo "ok: config and every layer identical to the direct pull" >&2
    check_upstream_fetches "skopeo cold app" "$since" lib/app "$d_app $(proxy_blobs "$d_app")" ""
    assert_eq "$d_app" "$(manifest_digest_at "$PREG" hub/lib/app v1)" "berth serves the upstream's manifest bytes"

    step "skopeo: warm pull (served from the cache)"
    local hits0 hits1
    hits0=$(proxy_metric berth_proxy_requests_total 'upstream="hub",result="hit"')
    since=$(up_sync)
    sko copy --src-tls-verify=false "docker://$PREG/hub/lib/app:v1" "oci:$TEST_DIR/sk2:app"
    assert_eq "$d_app" "$(layout_digest "$TEST_DIR/sk2" app)" "warm pull: manifest digest"
    for blob in $(proxy_blobs "$d_app"); do
        cmp "$TEST_DIR/direct/blobs/sha256/${blob#sha256:}" "$TEST_DIR/sk2/blobs/sha256/${blob#sha256:}" ||
            fail "blob $blob of the warm pull differs from the direct pull"
    done
    check_no_blob_fetches "skopeo warm app" "$since"
    hits1=$(proxy_metric berth_proxy_requests_total 'upstream="hub",result="hit"')
    ((hits1 >= hits0 + 3)) || fail "berth_proxy_requests_total{result=\"hit\"} went from $hits0 to $hits1 over a warm pull of 3 blobs"
    echo "ok: berth_proxy_requests_total{result=\"hit\"} $hits0 -> $hits1" >&2
    (($(proxy_metric berth_proxy_requests_total 'upstream="hub",result="miss"') >= 3)) ||
        fail "berth_proxy_requests_total{result=\"miss\"} < 3 after a cold pull"

    step "skopeo: a push into the cache project is refused"
    fails_with "skopeo push into hub/" sko copy --dest-tls-verify=false "oci:$L:arm64" "docker://$PREG/hub/lib/pushed:v1"
    assert_contains "$FAIL_OUT" "unsupported: project hub is a pull-through cache of hub (http://$UP): it is read-only" \
        "skopeo shows berth's UNSUPPORTED message"
    local code
    code=$(curl -sS --max-time 10 -o "$TEST_DIR/del.out" -w '%{http_code}' -X DELETE "http://$PREG/v2/hub/lib/app/manifests/$d_app")
    cat "$TEST_DIR/del.out" >&2; echo >&2
    assert_eq UNSUPPORTED "$(jq -r '.errors[0].code' "$TEST_DIR/del.out")" "DELETE of a cached manifest: error code (HTTP $code)"
    assert_eq "$d_app" "$(manifest_digest_at "$PREG" hub/lib/app v1)" "the cached manifest is still served"

    # ---- podman ----------------------------------------------------------
    proxy_berth_start podman
    containers_env "$TEST_DIR/podstore"
    step "podman: hub/lib/multi:v1 for linux/arm64 only"
    since=$(up_sync)
    pod pull --tls-verify=false --arch arm64 --os linux "$PREG/hub/lib/multi:v1" >&2
    pod image inspect "$PREG/hub/lib/multi:v1" >"$TEST_DIR/pod-multi.json"
    assert_eq "$(proxy_blobs "$d_arm64" | cut -d' ' -f1 | sed 's/^sha256://') arm64" \
        "$(jq -r '"\(.[0].Id) \(.[0].Architecture)"' "$TEST_DIR/pod-multi.json")" "podman: arm64 image id and architecture"
    assert_eq "$(proxy_diff_ids "$d_arm64")" "$(jq -c '.[0].RootFS.Layers' "$TEST_DIR/pod-multi.json")" "podman: arm64 layer diff ids"
    check_upstream_fetches "podman arm64 of multi" "$since" lib/multi "$d_multi $arm64_set" "$amd64_only"
    step "podman: cold pull of hub/lib/app:v1 through berth"
    since=$(up_sync)
    pod pull --tls-verify=false "$PREG/hub/lib/app:v1" >&2
    pod image inspect "$PREG/hub/lib/app:v1" >"$TEST_DIR/pod-app.json"
    assert_eq "$d_app" "$(jq -r '.[0].Digest' "$TEST_DIR/pod-app.json")" "podman: manifest digest == direct"
    assert_eq "$(proxy_blobs "$d_app" | cut -d' ' -f1 | sed 's/^sha256://')" "$(jq -r '.[0].Id' "$TEST_DIR/pod-app.json")" "podman: image id == config digest"
    assert_eq "$(proxy_diff_ids "$d_app")" "$(jq -c '.[0].RootFS.Layers' "$TEST_DIR/pod-app.json")" "podman: layer diff ids == direct"
    check_upstream_fetches "podman cold app" "$since" lib/app "$d_app $(proxy_blobs "$d_app")" ""

    # ---- containerd: berth as the upstream's mirror (hosts.toml, ?ns=) -----
    proxy_berth_start ctr
    containerd_start "$TEST_DIR/containerd"
    local hosts=$TEST_DIR/certs.d
    mkdir -p "$hosts/$UP"
    cat >"$hosts/$UP/hosts.toml" <<TOML
server = "http://$UP"

[host."http://$PREG"]
  capabilities = ["pull", "resolve"]
TOML
    cat "$hosts/$UP/hosts.toml" >&2
    step "ctr: pull $UP/lib/multi:v1 for linux/arm64 only"
    since=$(up_sync)
    x ctr images pull --hosts-dir "$hosts" --platform linux/arm64 "$UP/lib/multi:v1" >&2
    assert_eq "$d_multi" "$(ctr_target "$UP/lib/multi:v1")" "ctr: index target digest"
    for blob in $d_arm64 $(proxy_blobs "$d_arm64"); do
        cmp <(ctr content get "$blob") "$TEST_DIR/direct/blobs/sha256/${blob#sha256:}" || fail "arm64 blob $blob in containerd differs"
    done
    for blob in $amd64_only; do
        if ctr content get "$blob" >/dev/null 2>&1; then fail "containerd has amd64 content $blob after an arm64-only pull"; fi
    done
    echo "ok: containerd holds the arm64 manifest and blobs, no amd64 content" >&2
    check_upstream_fetches "ctr arm64 of multi" "$since" lib/multi "$d_multi $arm64_set" "$amd64_only"
    step "ctr: pull $UP/lib/app:v1 with berth as its mirror"
    since=$(up_sync)
    x ctr images pull --hosts-dir "$hosts" --platform linux/amd64 "$UP/lib/app:v1" >&2
    assert_eq "$d_app" "$(ctr_target "$UP/lib/app:v1")" "ctr: target digest == direct"
    for blob in $(proxy_blobs "$d_app"); do
        cmp <(ctr content get "$blob") "$TEST_DIR/direct/blobs/sha256/${blob#sha256:}" || fail "blob $blob in containerd differs from the direct pull"
    done
    echo "ok: every blob in containerd's content store identical to the direct pull" >&2
    check_upstream_fetches "ctr cold app" "$since" lib/app "$d_app $(proxy_blobs "$d_app")" ""
    # berth's access log: containerd asked berth, naming the upstream in ?ns=
    jq -R -c 'fromjson? | select(.message == "request") | {m: ."http.request.method", p: ."url.path", q: ."url.query", s: ."http.response.status_code"}' \
        "$PBERTH_LOG" >"$TEST_DIR/ctr-access.jsonl"
    for blob in $(proxy_blobs "$d_app"); do
        assert_eq 1 "$(jq -r --arg p "/v2/lib/app/blobs/$blob" --arg ns "ns=$UP" \
            'select(.p == $p and .m == "GET" and .s == 200 and ((.q // "") | gsub("%3A"; ":")) == $ns) | 1' "$TEST_DIR/ctr-access.jsonl" | wc -l)" \
            "berth's access log: GET /v2/lib/app/blobs/$blob?ns=$UP answered 200"
    done
    containerd_stop

    # ---- docker ----------------------------------------------------------
    if docker info >/dev/null 2>&1; then
        proxy_berth_start docker
        local img=$PREG/hub/lib/app:v1 mimg=$PREG/hub/lib/multi:v1 pimg=$PREG/hub/lib/dpushed:v1
        PROXY_DOCKER_IMAGES=("$img" "$mimg" "$pimg" "$PREG/hub/lib/app@$d_app" "$PREG/hub/lib/multi@$d_multi")
        step "docker: pull $mimg for linux/arm64 only"
        since=$(up_sync)
        x docker pull --platform linux/arm64 "$mimg" >&2
        assert_eq "$(proxy_blobs "$d_arm64" | cut -d' ' -f1) arm64" \
            "$(docker image inspect -f '{{.Id}} {{.Architecture}}' "$mimg")" "docker: arm64 image id and architecture"
        assert_contains "$(docker image inspect -f '{{json .RepoDigests}}' "$mimg")" "$PREG/hub/lib/multi@$d_multi" "docker: RepoDigests has the index digest"
        check_upstream_fetches "docker arm64 of multi" "$since" lib/multi "$d_multi $arm64_set" "$amd64_only"
        step "docker: cold pull of $img"
        since=$(up_sync)
        x docker pull "$img" >&2
        assert_eq "$(proxy_blobs "$d_app" | cut -d' ' -f1)" "$(docker image inspect -f '{{.Id}}' "$img")" "docker: image id == config digest"
        assert_contains "$(docker image inspect -f '{{json .RepoDigests}}' "$img")" "$PREG/hub/lib/app@$d_app" "docker: RepoDigests has the upstream's digest"
        assert_eq "$(proxy_diff_ids "$d_app")" "$(docker image inspect -f '{{json .RootFS.Layers}}' "$img")" "docker: layer diff ids == direct"
        check_upstream_fetches "docker cold app" "$since" lib/app "$d_app $(proxy_blobs "$d_app")" ""
        step "docker: a push into the cache project is refused"
        x docker tag "$img" "$pimg"
        fails_with "docker push into hub/" docker push "$pimg"
        assert_contains "$FAIL_OUT" "project hub is a pull-through cache of hub (http://$UP): it is read-only" \
            "docker shows berth's UNSUPPORTED message"
        docker rmi -f "${PROXY_DOCKER_IMAGES[@]}" >/dev/null 2>&1 || true
    else
        echo "note: docker info fails; skipping the docker pulls" >&2
    fi

    # ---- wrong upstream credentials ----------------------------------------
    if [[ -n $UP_CREDS ]]; then
        step "berth with a wrong upstream password: the pull fails and names the upstream"
        PROXY_PASSWORD_FILE=$TEST_DIR/wrong-password
        echo "wrong-$(rand_hex 4)" >"$PROXY_PASSWORD_FILE"
        proxy_berth_start badcreds
        PROXY_PASSWORD_FILE=""
        code=$(curl -sS --max-time 10 -o "$TEST_DIR/bad.out" -w '%{http_code}' -H "Accept: $ACCEPT_ALL" "http://$PREG/v2/hub/lib/app/manifests/v1")
        cat "$TEST_DIR/bad.out" >&2; echo >&2
        [[ $code == [45]?? ]] || fail "GET of a manifest with wrong upstream credentials answered $code"
        assert_contains "$(jq -r '.errors[0].message' "$TEST_DIR/bad.out")" "upstream hub (http://$UP)" "berth's error body (HTTP $code) names the upstream"
        assert_contains "$(jq -r '.errors[0].message' "$TEST_DIR/bad.out")" "credentials" "berth's error body says the credentials were refused"
        (($(proxy_metric berth_proxy_upstream_errors_total 'upstream="hub",kind="auth"') >= 1)) ||
            { curl -sS --max-time 10 "http://$PREG/metrics" | grep berth_proxy_upstream_errors >&2 || true
              fail "berth_proxy_upstream_errors_total{kind=\"auth\"} not counted"; }
        echo "ok: berth_proxy_upstream_errors_total{kind=\"auth\"} counted" >&2
        # What a user sees: the client's own error message.
        local seen=""
        fails_with "skopeo pull through berth with wrong upstream credentials" \
            sko copy --src-tls-verify=false "docker://$PREG/hub/lib/app:v1" "oci:$TEST_DIR/bad:app"
        seen+="skopeo: $(grep -m1 'level=fatal' <<<"$FAIL_OUT" || echo "$FAIL_OUT" | tail -1)"$'\n'
        if docker info >/dev/null 2>&1; then
            PROXY_DOCKER_IMAGES=("$PREG/hub/lib/app:v1")
            fails_with "docker pull through berth with wrong upstream credentials" docker pull "$PREG/hub/lib/app:v1"
            seen+="docker: $(echo "$FAIL_OUT" | tail -1)"
        fi
        local line unclear=""
        while IFS= read -r line; do
            [[ -z $line || $line == *"upstream hub (http://$UP)"* ]] || unclear+="$line | "
        done <<<"$seen"
        # containers/image and Docker show a registry's error message only for 4xx answers.
        [[ -z $unclear ]] || fail "with wrong upstream credentials (berth answered HTTP $code) the clients do not show which upstream failed: ${unclear% | }"
        echo "ok: the clients' errors name the upstream" >&2
    fi

    step "stop berth and the upstream"
    proxy_berth_stop
    if grep -n 'panicked' "$TEST_DIR"/berth-*.log >&2; then fail "a caching berth panicked"; fi
    echo "ok: no panics in the caching berths' logs" >&2
}
# Digest of the manifest bytes served by registry HOST for NAME:REF.
manifest_digest_at() { # host name ref
    local f
    f=$(mktemp)
    rcurl -f -H "Accept: $ACCEPT_ALL" -o "$f" "http://$1/v2/$2/manifests/$3"
    sha256_file "$f"
    rm -f "$f"
}

test_proxy() { proxy_suite none; }
test_proxy_htpasswd() { proxy_suite htpasswd; }

# Entry point of the per-test child process.
run_one() { # test-name
    set -eEuo pipefail
    trap 'exit 143' TERM
    trap 'on_err $? "$BASH_COMMAND"' ERR
    cd "$TEST_DIR"
    "test_$1"
}

if [[ ${BERTH_CLIENTS_LIB:-0} == 1 ]]; then
    # shellcheck disable=SC2317
    return 0 2>/dev/null || exit 0
fi

set -uo pipefail

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
SCRIPT_DIR=$(dirname "$SCRIPT")
ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)

usage() {
    sed -n '2,23p' "$SCRIPT" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

REGISTRY=""
SELECTED=()
while (($#)); do
    case $1 in
        --registry) [[ $# -ge 2 ]] || usage 2; REGISTRY=$2; shift 2 ;;
        --registry=*) REGISTRY=${1#--registry=}; shift ;;
        -h|--help) usage 0 ;;
        --list) printf '%s\n' "${ALL_TESTS[@]}"; exit 0 ;;
        -*) echo "unknown option: $1" >&2; usage 2 ;;
        *) SELECTED+=("$1"); shift ;;
    esac
done
if ((${#SELECTED[@]} == 0)); then SELECTED=("${ALL_TESTS[@]}"); fi
for t in "${SELECTED[@]}"; do
    if ! declare -F "test_$t" >/dev/null; then
        echo "unknown test: $t (known: ${ALL_TESTS[*]})" >&2
        exit 2
    fi
done

for c in curl jq python3 timeout unshare sha256sum; do
    command -v "$c" >/dev/null || { echo "missing command: $c (run scripts/install-test-deps.sh)" >&2; exit 2; }
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/berth-clients.XXXXXX")
chmod 755 "$TMP"
PIDS_FILE=$TMP/pids
: >"$PIDS_FILE"
BERTH_PID=""
TEST_PID=""

cleanup() {
    local pid
    if [[ -n $TEST_PID ]] && kill -0 "$TEST_PID" 2>/dev/null; then
        echo "interrupted: stopping the running test" >&2
        kill -TERM "$TEST_PID" 2>/dev/null   # timeout forwards it to the test's process group
        for _ in $(seq 150); do kill -0 "$TEST_PID" 2>/dev/null || break; sleep 0.1; done
    fi
    if [[ -n $BERTH_PID ]]; then
        kill "$BERTH_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$BERTH_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$BERTH_PID" 2>/dev/null
        wait "$BERTH_PID" 2>/dev/null
    fi
    # daemons started by tests (containerd), in case a test was killed before its own cleanup
    while read -r pid; do
        [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && kill "$pid" 2>/dev/null
    done <"$PIDS_FILE"
    if [[ ${KEEP_TMP:-0} == 1 ]]; then
        echo "kept temp dir: $TMP" >&2
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# No registry to test against: every selected test counts as failed.
no_registry() {
    echo "clients: 0 passed, ${#SELECTED[@]} failed, 0 skipped"
    exit 1
}

if [[ -z $REGISTRY ]]; then
    OWN_BERTH=1
    BERTH_BIN=${BERTH_BIN:-$ROOT/target/debug/berth}
    if [[ ! -x $BERTH_BIN ]]; then
        echo "berth binary not found at $BERTH_BIN (build it, set BERTH_BIN, or pass --registry HOST:PORT)" >&2
        no_registry
    fi
    BERTH_BIN=$(readlink -f "$BERTH_BIN")   # tests run in their own directory
    PORT=$(free_port)
    REGISTRY=127.0.0.1:$PORT
    mkdir -p "$TMP/data"
    echo "starting $BERTH_BIN serve --listen $REGISTRY --data-dir $TMP/data (log: $TMP/berth.log)" >&2
    # frozen-* tags are immutable (test_lifecycle); no other test uses such tags.
    "$BERTH_BIN" serve --listen "$REGISTRY" --data-dir "$TMP/data" --immutable-tags 'frozen-*' >"$TMP/berth.log" 2>&1 &
    export BERTH_STARTED_HERE=1
    BERTH_PID=$!
    deadline=$((SECONDS + 20))
    until [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$REGISTRY/v2/") == 200 ]]; do
        if ! kill -0 "$BERTH_PID" 2>/dev/null; then
            echo "berth exited during startup; last log lines:" >&2
            tail -30 "$TMP/berth.log" >&2
            BERTH_PID=""
            no_registry
        fi
        if ((SECONDS >= deadline)); then
            echo "berth did not answer GET /v2/ with 200 within 20 s; last log lines:" >&2
            tail -30 "$TMP/berth.log" >&2
            no_registry
        fi
        sleep 0.2
    done
else
    OWN_BERTH=0
    BERTH_BIN=""
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://$REGISTRY/v2/")
    if [[ $code != 200 ]]; then
        echo "registry $REGISTRY: GET /v2/ answered '$code', expected 200" >&2
        no_registry
    fi
fi

# Environment for the per-test child processes: all client state in $TMP.
NS="t$(rand_hex 4)"   # per-run repository namespace, so runs against a shared registry do not collide
export REG=$REGISTRY NS OWN_BERTH BERTH_BIN
export TMP PIDS_FILE SCRIPT SCRIPT_DIR ROOT
export VENV=${BERTH_TEST_VENV:-$ROOT/target/test-venv}
export HOME=$TMP/home XDG_RUNTIME_DIR=$TMP/run XDG_CONFIG_HOME=$TMP/home/.config XDG_DATA_HOME=$TMP/home/.local/share
export XDG_CACHE_HOME=$TMP/home/.cache DOCKER_CONFIG=$TMP/docker-config
export VARLIB=$TMP/varlib TMPDIR=$TMP/tmp
export REGISTRY_AUTH_FILE=$TMP/auth.json
export CONTAINERS_REGISTRIES_CONF=$TMP/registries.conf
export TEST_TIMEOUT=${TEST_TIMEOUT:-240}
mkdir -p "$HOME" "$XDG_RUNTIME_DIR" "$XDG_CONFIG_HOME" "$XDG_DATA_HOME" "$XDG_CACHE_HOME" "$DOCKER_CONFIG" "$VARLIB" "$TMPDIR" "$TMP/logs"
chmod 700 "$XDG_RUNTIME_DIR"
echo '{"auths":{}}' >"$REGISTRY_AUTH_FILE"
echo '{"auths":{}}' >"$DOCKER_CONFIG/config.json"
printf '[[registry]]\nlocation = "%s"\ninsecure = true\n' "$REG" >"$CONTAINERS_REGISTRIES_CONF"
echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$TMP/policy.json"
# Private mount namespace for the blob-info cache, if the sandbox allows it.
# shellcheck disable=SC2016
if unshare -m --propagation private -- sh -c 'mount --bind "$0" /var/lib' "$VARLIB" 2>/dev/null; then
    export HAVE_NS_WRAP=1
else
    export HAVE_NS_WRAP=0
    echo "note: unshare -m not permitted; skopeo/buildah/podman use the host blob-info cache" >&2
fi

echo "registry: $REG   namespace: $NS   temp: $TMP" >&2

passed=0 failed=0 skipped=0
for t in "${SELECTED[@]}"; do
    export TEST_DIR=$TMP/$t
    mkdir -p "$TEST_DIR"
    log=$TMP/logs/$t.log
    start=$SECONDS
    # In the background + wait, so that INT/TERM to this script interrupts the wait at once;
    # timeout runs the test in its own process group and kills all of it on expiry.
    # shellcheck disable=SC2016
    BERTH_CLIENTS_LIB=1 timeout -k 10 "$TEST_TIMEOUT" \
        bash -c 'source "$SCRIPT" && run_one "$1"' run-test "$t" >"$log" 2>&1 </dev/null &
    TEST_PID=$!
    wait "$TEST_PID"
    rc=$?
    TEST_PID=""
    dur=$((SECONDS - start))
    if ((rc == 0)); then
        echo "PASS $t (${dur}s)"
        passed=$((passed + 1))
    elif ((rc == 77)); then
        echo "SKIP $t: $(cat "$TEST_DIR/.skip" 2>/dev/null || echo 'no reason given')"
        skipped=$((skipped + 1))
    else
        if ((rc == 124 || rc == 137)); then
            echo "FAIL $t (timed out after ${TEST_TIMEOUT}s)"
        else
            echo "FAIL $t (exit $rc, ${dur}s): $(cat "$TEST_DIR/.reason" 2>/dev/null || echo 'see log')"
        fi
        tail -n 30 "$log" | sed 's/^/    | /'
        if [[ ${KEEP_TMP:-0} == 1 ]]; then
            echo "    full log: $log"
        else
            echo "    (rerun with KEEP_TMP=1 to keep the full log and client state)"
        fi
        failed=$((failed + 1))
    fi
done

echo "clients: $passed passed, $failed failed, $skipped skipped"
((failed == 0))
