#!/usr/bin/env bash
# Smoke test of the Docker image without any registry: build a Debian bookworm base with
# debootstrap, build the image offline from a local wheel directory, serve on the CPU,
# classify one document, stop. Run by hand (`make docker-smoke`); needs root, docker,
# debootstrap and the shipped model in model/artifacts/spamassassin-linformer-distilled/.
#
# Settings (environment): BASE_IMAGE (linmod-base:bookworm; reused when present),
# IMAGE (linmod:smoke), DEBIAN_MIRROR, PYTHON (host Python for pip, 3.11 or later),
# READY_TIMEOUT (seconds, 300), KEEP_CONTAINER=1 to leave the container running.
set -euo pipefail

cd "$(dirname "$0")/.."

BASE_IMAGE=${BASE_IMAGE:-linmod-base:bookworm}
IMAGE=${IMAGE:-linmod:smoke}
CONTAINER=${CONTAINER:-linmod-smoke}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
MODEL_DIR=model/artifacts/spamassassin-linformer-distilled
WHEELS=wheels
READY_TIMEOUT=${READY_TIMEOUT:-300}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

STEPS=7
step() { printf '\n==> [%s/%s] %s\n' "$1" "$STEPS" "$2"; }
info() { printf '    %s\n' "$*"; }
die() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/linmod-docker-smoke.XXXXXX")
cleanup() {
    local rc=$?
    if [ "${KEEP_CONTAINER:-0}" != 1 ] && docker container inspect "$CONTAINER" >/dev/null 2>&1; then
        if [ "$rc" -ne 0 ]; then
            printf '\n--- container logs (last 40 lines) ---\n' >&2
            docker logs --tail 40 "$CONTAINER" >&2 2>&1 || true
        fi
        docker rm -f "$CONTAINER" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT

[ -f "$MODEL_DIR/model.onnx" ] || die "no shipped model in $MODEL_DIR (train and export it first: make model)"
[ -f service/cli.py ] || die "run from a linmod checkout (service/cli.py not found)"

# ---------------------------------------------------------------------------------
step 1 "Docker engine"
if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null 2>&1 || die "no Docker engine; install one (Debian: apt-get install docker.io)"
    [ "$(id -u)" -eq 0 ] || die "the Docker engine is not running and starting it needs root"
    info "starting dockerd (log: /tmp/dockerd.log)"
    dockerd >/tmp/dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || die "dockerd did not come up; see /tmp/dockerd.log"
fi
info "engine $(docker version --format '{{.Server.Version}}')"

# ---------------------------------------------------------------------------------
step 2 "Base image $BASE_IMAGE"
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    info "present; reusing it (docker rmi $BASE_IMAGE to rebuild)"
else
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap is missing (apt-get install debootstrap)"
    [ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
    info "debootstrap $DEBIAN_SUITE (minbase + python3, python3-venv) from $DEBIAN_MIRROR"
    debootstrap --variant=minbase --include=python3,python3-venv \
        "$DEBIAN_SUITE" "$WORK/rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
    # Package caches and lists only make the image bigger.
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/cache/apt/*.bin \
        "$WORK"/rootfs/var/lib/apt/lists/*
    tar -C "$WORK/rootfs" -c . \
        | docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
    info "imported"
fi
read -r BASE_PY BASE_GLIBC BASE_ARCH < <(docker run --rm "$BASE_IMAGE" python3 -c \
    'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}", platform.libc_ver()[1], platform.machine())')
info "base Python $BASE_PY, glibc $BASE_GLIBC, $BASE_ARCH"

# ---------------------------------------------------------------------------------
step 3 "Wheels for the base's Python in $WHEELS/ (the build itself has no network)"
"$PYTHON" -c 'import tomllib' 2>/dev/null || die "$PYTHON is older than 3.11; set PYTHON"
# The same list the Dockerfile installs: the default dependencies of pyproject.toml and its
# postgres extra.
"$PYTHON" -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["postgres"]))' \
    >"$WORK/requirements.txt"
# Binary wheels only, tagged for the base's Python, glibc and architecture (not the host's).
platforms=()
glibc_minor=${BASE_GLIBC#*.}
for minor in $(seq 5 "$glibc_minor"); do platforms+=(--platform "manylinux_2_${minor}_${BASE_ARCH}"); done
platforms+=(--platform "manylinux1_${BASE_ARCH}" --platform "manylinux2010_${BASE_ARCH}" --platform "manylinux2014_${BASE_ARCH}")
rm -rf "$WHEELS"
"$PYTHON" -m pip download --quiet --disable-pip-version-check --dest "$WHEELS" \
    --only-binary=:all: --implementation cp --python-version "$BASE_PY" "${platforms[@]}" \
    -r "$WORK/requirements.txt" 2>"$WORK/pip.log" \
    || { grep -v 'is ignored' "$WORK/pip.log" | tail -20 >&2; die "pip download failed"; }
info "$(find "$WHEELS" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1)"

# ---------------------------------------------------------------------------------
step 4 "Build $IMAGE (BASE_IMAGE=$BASE_IMAGE, WHEELS=$WHEELS)"
start=$(date +%s)
docker build --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "WHEELS=$WHEELS" -t "$IMAGE" . \
    >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; die "docker build failed"; }
grep -E '^Step [0-9]+/[0-9]+ : (FROM|COPY|RUN)' "$WORK/build.log" | cut -c1-110 | sed 's/^/    /' || true
info "built in $(($(date +%s) - start)) s; image size $(docker image inspect --format '{{.Size}}' "$IMAGE" \
    | awk '{printf "%.0f MB", $1 / 1e6}')"

# ---------------------------------------------------------------------------------
step 5 "Start the container on the CPU"
docker rm -f "$CONTAINER" >/dev/null 2>&1 || true
docker run -d --name "$CONTAINER" -p 127.0.0.1::8000 "$IMAGE" \
    python -m service.cli --device cpu >/dev/null
PORT=$(docker port "$CONTAINER" 8000/tcp | head -1 | sed 's/.*://')
URL="http://127.0.0.1:$PORT"
info "container $CONTAINER, user $(docker exec "$CONTAINER" id -un), listening on $URL"

# ---------------------------------------------------------------------------------
step 6 "Wait for /ready (at most $READY_TIMEOUT s)"
start=$(date +%s)
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/ready" || true)" = 200 ]; do
    [ "$(docker inspect --format '{{.State.Running}}' "$CONTAINER")" = true ] \
        || die "the container exited ($(docker inspect --format '{{.State.ExitCode}}' "$CONTAINER"))"
    [ $(($(date +%s) - start)) -lt "$READY_TIMEOUT" ] || die "not ready after $READY_TIMEOUT s"
    sleep 1
done
info "ready after $(($(date +%s) - start)) s"
# The image's own HEALTHCHECK probes /ready too; a success within the start period counts at once.
for _ in $(seq 30); do
    health=$(docker inspect --format '{{.State.Health.Status}}' "$CONTAINER")
    [ "$health" != starting ] && break
    sleep 1
done
info "docker health: $health"
[ "$health" = healthy ] || die "the image's HEALTHCHECK reports $health"

# ---------------------------------------------------------------------------------
step 7 "Classify a document, read /info, stop"
document='Subject: You have WON a free cruise! Click now to claim your prize, limited offer, reply with your bank details today.'
body=$("$PYTHON" -c 'import json, sys; print(json.dumps({"input": sys.argv[1]}))' "$document")
response=$(curl -sS --fail-with-body -H 'Content-Type: application/json' -d "$body" "$URL/v1/classify") \
    || die "POST /v1/classify failed: $response"
info "POST /v1/classify {\"input\": \"${document:0:60}...\"}"
printf '%s\n' "$response" | "$PYTHON" -m json.tool | sed 's/^/    /'
printf '%s\n' "$response" | "$PYTHON" -c '
import json, sys
r = json.load(sys.stdin)
items = r.get("data") or r.get("results")
assert isinstance(items, list) and len(items) == 1 and "label" in items[0], "unexpected response shape"
' || die "the classify response has no label"

info_json=$(curl -sS --fail "$URL/info") || die "GET /info failed"
provider=$(printf '%s\n' "$info_json" | "$PYTHON" -c '
import json, sys
def find(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("provider", "providers") and value:
                return value
            found = find(value)
            if found:
                return found
    elif isinstance(node, list):
        for value in node:
            found = find(value)
            if found:
                return found
    return None
print(find(json.load(sys.stdin)))
')
info "GET /info provider: $provider"
# Replicas behind a load balancer share batch jobs through PostgreSQL: the driver is in the image.
psycopg_version=$(docker exec "$CONTAINER" python -c 'import psycopg; print(psycopg.__version__)') \
    || die "the image has no PostgreSQL driver (psycopg)"
info "PostgreSQL driver: psycopg $psycopg_version"

if [ "${KEEP_CONTAINER:-0}" = 1 ]; then
    info "left running: $CONTAINER on $URL (docker rm -f $CONTAINER)"
else
    docker stop --time 30 "$CONTAINER" >/dev/null
    info "stopped (exit code $(docker inspect --format '{{.State.ExitCode}}' "$CONTAINER"))"
fi
printf '\nOK: %s built offline from %s, served on the CPU, classified a document.\n' "$IMAGE" "$BASE_IMAGE"
