#!/usr/bin/env bash
# Builds the project's container images from the Dockerfile with buildah, without a Docker
# engine or an image registry (docs/deployment.md):
#
#   scripts/container.sh tools   install buildah and debootstrap when missing (apt, as root)
#   scripts/container.sh base    the Debian-made base image: debootstrap minbase bookworm with
#                                python3, committed as $BASE_IMAGE (kept while its recipe
#                                is unchanged)
#   scripts/container.sh driver  the storage driver the builds and the tests use (printed)
#   scripts/container.sh build   base, then the full image ($IMAGE) and the serving image
#                                ($SERVING_IMAGE) from the Dockerfile on that base; prints
#                                both sizes and the serving image's start-to-ready time
#                                (stdout), the build times and logs (stderr)
#
# The Dockerfile's own default base stays the public python image (docker build works as
# before); only this script passes BASE=$BASE_IMAGE. Between runs on one machine: an image
# stamped with the digest of its current inputs is not rebuilt; otherwise buildah
# --layers reuses every step whose inputs did not change (the dependency stages are kept
# as $CACHE_IMAGE:deps*), and layers no step used are removed. Storage: overlay where the
# kernel lets buildah mount it, vfs otherwise, as root.
set -euo pipefail
cd "$(dirname "$0")/.."

# overlay shares layers (a cold build 3.6x faster than vfs here, docs/deployment.md) but
# needs kernel support that a container host may not give; vfs (plain copies) works
# wherever buildah runs as root. Unset: probed once (see pick_driver). The tests run the
# images with the same driver (they ask this script's `driver`).
STORAGE_DRIVER=${STORAGE_DRIVER:-}
BASE_IMAGE=${BASE_IMAGE:-localhost/driverscore-base:bookworm}
IMAGE=${IMAGE:-localhost/driverscore:test}
SERVING_IMAGE=${SERVING_IMAGE:-localhost/driverscore-serving:test}
# Beside the layer cache: which inputs each image was built from, its start-to-ready time.
STAMPS=${STAMPS:-/var/tmp/driverscore-container}
# The dependency stages, kept under this name as the layer cache of later builds.
CACHE_IMAGE=${CACHE_IMAGE:-localhost/driverscore-cache}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
# The packages a python base image carries: the interpreter and the CA certificates
# (no pip, no venv module: the Dockerfile brings its own uv).
BASE_PACKAGES=python3,ca-certificates
# The recipe of the base, stored as a label: a changed recipe rebuilds it.
BASE_RECIPE="debootstrap --variant=minbase --include=$BASE_PACKAGES $SUITE $MIRROR"

say() { printf 'container: %s\n' "$*" >&2; }

# Every buildah call on the one storage the tests read (this buildah ignores the
# STORAGE_DRIVER variable itself).
buildah() { command buildah --storage-driver "$STORAGE_DRIVER" "$@"; }

# overlay when a scratch container's root mounts with it, else vfs. Both drivers keep
# their layers apart under one storage root, so switching loses only the cache.
pick_driver() {
  [ -n "$STORAGE_DRIVER" ] && return 0
  local ctr
  if ctr=$(command buildah --storage-driver overlay from scratch 2>/dev/null); then
    if command buildah --storage-driver overlay mount "$ctr" >/dev/null 2>&1; then
      STORAGE_DRIVER=overlay
    fi
    command buildah --storage-driver overlay rm "$ctr" >/dev/null 2>&1 || true
  fi
  STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
}

tools() {
  local missing=()
  type -P buildah >/dev/null || missing+=(buildah)
  type -P debootstrap >/dev/null || missing+=(debootstrap)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    say "needs ${missing[*]}: run as root, or install them (apt-get install -y ${missing[*]})"
    exit 1
  fi
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Another apt run (unattended upgrades, a parallel job) holds the lock for a while.
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}

image_label() { # image label -> value, or nothing when the image or label is absent
  buildah inspect --type image --format "{{index .OCIv1.Config.Labels \"$2\"}}" "$1" \
    2>/dev/null || true
}

base() {
  tools
  if [ "$(image_label "$BASE_IMAGE" org.driverscore.base-recipe)" = "$BASE_RECIPE" ]; then
    say "base $BASE_IMAGE is current"
    return 0
  fi
  local start ctr root
  start=$(date +%s)
  say "building base $BASE_IMAGE: $BASE_RECIPE"
  ctr=$(buildah from scratch)
  trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' RETURN
  root=$(buildah mount "$ctr")
  debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$root" "$MIRROR" \
    > /tmp/driverscore-debootstrap.log 2>&1 || {
    tail -20 /tmp/driverscore-debootstrap.log >&2
    say "debootstrap failed; log: /tmp/driverscore-debootstrap.log"
    exit 1
  }
  # What a base image leaves out: downloaded packages and lists, logs of the bootstrap.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/var/log/* "$root"/debootstrap
  buildah umount "$ctr" >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 \
    --label org.driverscore.base-recipe="$BASE_RECIPE" "$ctr"
  buildah commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
  trap - RETURN
  say "base built in $(($(date +%s) - start)) s: $(image_size "$BASE_IMAGE")"
}

image_size() { # human-readable size of an image (sum of its layers, uncompressed)
  buildah images --format '{{.Size}}' "$1" | head -1
}

build() {
  base
  local inputs start built=0
  inputs=$(inputs_digest)
  logs=$(mktemp -d /var/tmp/driverscore-build.XXXXXX)
  start=$(date +%s)
  # The dependency stages first, tagged: their layers stay the cache of later builds.
  if ! is_current "$IMAGE" "$inputs"; then
    build_target deps "$CACHE_IMAGE:deps"
    build_target runtime "$IMAGE"
    stamp "$IMAGE" "$inputs"
    say "full image $IMAGE built in $(($(date +%s) - start)) s"
    built=1
  fi
  start=$(date +%s)
  if ! is_current "$SERVING_IMAGE" "$inputs"; then
    build_target deps-serving "$CACHE_IMAGE:deps-serving"
    build_target serving "$SERVING_IMAGE"
    stamp "$SERVING_IMAGE" "$inputs"
    say "serving image $SERVING_IMAGE built in $(($(date +%s) - start)) s"
    built=1
  fi
  [ "$built" = 1 ] && prune_stale_layers
  rm -rf "$logs"
  printf 'image sizes: full %s, serving %s (base %s)\n' \
    "$(image_size "$IMAGE")" "$(image_size "$SERVING_IMAGE")" "$(image_size "$BASE_IMAGE")"
  ready_time
}

# What the images are built from: the files the Dockerfile copies (as .dockerignore
# filters them) and the base image. Stamped per image id beside the storage (a label would
# not do: when every step is cached, buildah 1.28 tags the old image, old labels and all);
# an image stamped with the current digest is not rebuilt at all.
inputs_digest() {
  {
    printf 'base %s\n' "$(buildah inspect --type image --format '{{.FromImageID}}' "$BASE_IMAGE")"
    find Dockerfile .dockerignore pyproject.toml uv.lock README.md scripts/lockfile.py src \
      -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | LC_ALL=C sort -z |
      xargs -0 sha256sum
  } | sha256sum | cut -c1-32
}

is_current() { # image inputs-digest
  local id
  id=$(buildah inspect --type image --format '{{.FromImageID}}' "$1" 2>/dev/null) || return 1
  if [ "$(cat "$STAMPS/inputs-$id" 2>/dev/null)" = "$2" ]; then
    say "$1 is current (inputs $2)"
    return 0
  fi
  return 1
}

stamp() { # image inputs-digest
  mkdir -p "$STAMPS"
  printf '%s\n' "$2" >"$STAMPS/inputs-$(buildah inspect --type image --format '{{.FromImageID}}' "$1")"
}

# vfs stores every layer as a full copy: the layers of earlier builds that no step of this
# one used (each step's image id is in its log) are removed, the rest is this build's cache.
prune_stale_layers() {
  local keep stale
  keep=$(grep -ohE '^--> (Using cache )?[0-9a-f]{11,}' "$logs"/*.log | awk '{print $NF}' |
    cut -c1-11 | sort -u)
  stale=$(buildah images --filter dangling=true --format '{{.ID}}' | cut -c1-11 | sort -u |
    comm -23 - <(printf '%s\n' "$keep"))
  if [ -n "$stale" ]; then
    say "removing $(wc -w <<<"$stale") stale layer images"
    # shellcheck disable=SC2086  # one id per word
    buildah rmi $stale >/dev/null 2>&1 || true
  fi
}

# Start-to-ready of the serving image as SageMaker starts it (`serve`, the model in
# /opt/ml/model): from spawning the container to the first 200 on /ping. The model is
# trained on synthetic trips and exported with the full image itself. Measured once per
# serving image (the result is kept beside the layer cache).
ready_time() {
  local id cache work ctr port start pid ms
  id=$(buildah inspect --type image --format '{{.FromImageID}}' "$SERVING_IMAGE")
  cache=$STAMPS/ready-${id:0:16}
  if [ -f "$cache" ]; then
    printf 'serving start-to-ready: %s (measured when the image was built)\n' "$(cat "$cache")"
    return 0
  fi
  work=$(mktemp -d /var/tmp/driverscore-ready.XXXXXX)
  mkdir -p "$work"/home "$work"/state "$work"/tmp
  chown -R 10001:10001 "$work"
  ctr=$(buildah from --pull-never "$IMAGE")
  buildah run --isolation chroot -e DRIVERSCORE_HOME=/work/home -v "$work:/work" "$ctr" -- \
    sh -c 'python -c "from driverscore.adapters.registry import open_registry as o
from driverscore.settings import Settings as S
from driverscore.training.synthetic import register_synthetic_model as r
r(o(S()), trips=1500, max_iter=30, code_version=\"container\")" >/dev/null 2>&1 &&
      driverscore export-model /work/model' >&2
  buildah rm "$ctr" >/dev/null
  ctr=$(buildah from --pull-never "$SERVING_IMAGE")
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  start=$(date +%s%N)
  # Not through the buildah function: $! must be buildah's own pid, which passes SIGTERM
  # on to the service (a function would run in a subshell that does not).
  command buildah --storage-driver "$STORAGE_DRIVER" run --isolation chroot \
    -e DRIVERSCORE_SERVICE__MODEL_DIR=/opt/ml/model \
    -e DRIVERSCORE_SERVICE__AUTH=off -e DRIVERSCORE_SERVICE__PORT="$port" \
    -v "$work/model:/opt/ml/model:ro" -v "$work/state:/var/lib/driverscore" \
    -v "$work/tmp:/tmp" "$ctr" -- driverscore serve >"$work/serve.log" 2>&1 &
  pid=$!
  python3 - "$port" <<'PY' || { kill "$pid"; cat "$work/serve.log" >&2; exit 1; }
import sys, time, urllib.request
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ping", timeout=1) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit("serving image not ready within 120 s")
PY
  ms=$((($(date +%s%N) - start) / 1000000))
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  buildah rm "$ctr" >/dev/null
  rm -rf "$work"
  mkdir -p "$(dirname "$cache")"
  printf '%d.%d s' $((ms / 1000)) $((ms % 1000 / 100)) >"$cache"
  printf 'serving start-to-ready: %s\n' "$(cat "$cache")"
}

build_target() { # target image [buildah build options...]
  local target=$1 image=$2 trust=()
  shift 2
  # Behind a TLS-inspecting proxy the registries are reached only with this machine's CA
  # bundle: lent to the RUN steps (a bind mount, not a layer), never part of the image.
  if [ -f "$CA_BUNDLE" ]; then
    trust=(--volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
  fi
  buildah build --layers --force-rm --isolation chroot --format docker \
    --build-arg BASE="$BASE_IMAGE" "${trust[@]}" "$@" --target "$target" --tag "$image" \
    --file Dockerfile . 2>&1 | tee "$logs/$target.log" >&2
}

# One build at a time on this machine: a second caller (the test suite while CI's early
# build runs) waits, then finds the images current.
build_locked() {
  mkdir -p "$STAMPS"
  exec 9>"$STAMPS/build.lock"
  flock 9
  build
}

case "${1:-build}" in
  tools) tools ;;
  driver) pick_driver && echo "$STORAGE_DRIVER" ;;
  base) pick_driver && base ;;
  build) pick_driver && say "storage driver: $STORAGE_DRIVER" && build_locked ;;
  *)
    say "unknown command '$1': use tools, driver, base or build"
    exit 2
    ;;
esac
