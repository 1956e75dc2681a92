#!/usr/bin/env bash
# Build the cluster's image (Containerfile) with podman and run `cluster up` in it: the edge, on the host network,
# must answer one Open Inference Protocol inference of the demo model `echo` from the host. For CI, as its own step:
#
#     bash scripts/container-check.sh
#
# The last line is `container check: PASSED` or `container check: FAILED: <reason>` (exit status 0 or 1).
# Needs root (or sudo) to install podman, runc and debootstrap when missing, and to run podman as root. No container
# registry is needed: the base image is made here with debootstrap from Debian's mirror (kept in podman's storage
# and reused), and the image's pip install reaches PyPI through the host network.
#
# Settings (environment):
#   CONTAINER_CHECK_BUDGET   seconds for the whole check (default 1500), enforced with `timeout`
#   CONTAINER_CHECK_STATE    where the containers.conf, the rootfs and the logs go (default /var/tmp/cluster-container-check)
#   CONTAINER_CHECK_WHEELS   a folder of wheels the build may use (default /opt/wheels where it holds a torch wheel);
#                            torch then comes from it (or PyPI), else from PyPI's CPU index of PyTorch
#   CONTAINER_CHECK_CA_BUNDLE  the CA bundle pip in the build trusts (default the host's,
#                            /etc/ssl/certs/ca-certificates.crt: PyPI may be behind a TLS-intercepting proxy)
#   CONTAINER_CHECK_ROLES    role images (Containerfile's ROLE) to build and check against the full image's cluster
#                            (default "edge"; any of edge core agent): an edge image serves an inference through
#                            that cluster's broker; a core image (manager, broker) answers `cluster health` about its
#                            broker and manager; an agent image imports torch. Only the agent image may hold torch.
#   CONTAINER_CHECK_REBUILD_BASE=1  debootstrap the base again even if localhost/debian-base:bookworm exists
#   CONTAINER_CHECK_NO_CACHE=1      build every layer again (podman build --no-cache): the time a fresh machine takes
#   DEBIAN_MIRROR            default http://deb.debian.org/debian
# podman runs with runc, the cgroupfs cgroup manager, host networking and no default ulimits (crun fails on
# rlimits and hybrid cgroups in some containers): a private containers.conf in the state folder, named by
# CONTAINERS_CONF, so /etc is left alone.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -z "${CONTAINER_CHECK_INNER:-}" ]; then
  budget="${CONTAINER_CHECK_BUDGET:-1500}"
  CONTAINER_CHECK_INNER=1 timeout --kill-after=20 "$budget" bash "$0" "$@"
  rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "container check: FAILED: over the time budget of ${budget} s (CONTAINER_CHECK_BUDGET)"
  fi
  exit "$rc"
fi

STATE="${CONTAINER_CHECK_STATE:-/var/tmp/cluster-container-check}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE=localhost/debian-base:bookworm
IMAGE=localhost/torch-serving-cluster:check
NAME="cluster-check-$$"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
started=$(date +%s)
CONTAINER_ID=""
EDGE_ID=""   # the edge image's container (CONTAINER_CHECK_ROLES), removed on every way out as CONTAINER_ID is

fail() { echo "container check: FAILED: $*"; exit 1; }
say() { echo "[container-check +$(( $(date +%s) - started ))s] $*"; }
cleanup() {
  for id in "$EDGE_ID" "$CONTAINER_ID"; do
    if [ -n "$id" ]; then
      $SUDO env CONTAINERS_CONF="$CONTAINERS_CONF" podman rm -f -t 5 "$id" >/dev/null 2>&1 || true
    fi
  done
}
trap cleanup EXIT
trap 'exit 143' TERM INT   # the budget's timeout: still remove the container (EXIT)

mkdir -p "$STATE" || fail "cannot make $STATE"

# 1. the tools
missing=""
for tool in podman:podman runc:runc debootstrap:debootstrap curl:curl; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing="$missing ${tool#*:}"
done
if [ -n "$missing" ]; then
  say "installing$missing"
  $SUDO apt-get update -qq >"$STATE/apt.log" 2>&1 \
    && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >>"$STATE/apt.log" 2>&1 \
    || fail "apt-get install$missing (see $STATE/apt.log): $(tail -1 "$STATE/apt.log")"
fi

# 2. podman's settings, private to this check
export CONTAINERS_CONF="$STATE/containers.conf"
cat >"$CONTAINERS_CONF" <<'CONF'
[containers]
default_ulimits = []
netns = "host"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
podman() { $SUDO env CONTAINERS_CONF="$CONTAINERS_CONF" podman "$@"; }

# 3. the base image: Debian bookworm minbase from the mirror (no registry needed)
if [ -n "${CONTAINER_CHECK_REBUILD_BASE:-}" ] || ! podman image exists "$BASE"; then
  say "debootstrap bookworm (minbase) from $MIRROR"
  $SUDO rm -rf "$STATE/rootfs"
  $SUDO debootstrap --variant=minbase bookworm "$STATE/rootfs" "$MIRROR" >"$STATE/debootstrap.log" 2>&1 \
    || fail "debootstrap (see $STATE/debootstrap.log): $(tail -1 "$STATE/debootstrap.log")"
  $SUDO tar -C "$STATE/rootfs" -c . | podman import - "$BASE" >"$STATE/import.log" 2>&1 \
    || fail "podman import of the rootfs: $(tail -1 "$STATE/import.log")"
  $SUDO rm -rf "$STATE/rootfs"
else
  say "base image $BASE exists (CONTAINER_CHECK_REBUILD_BASE=1 makes it again)"
fi

# 4. the image
WHEELS="${CONTAINER_CHECK_WHEELS:-/opt/wheels}"
build_args=(--build-arg "BASE=$BASE")
if compgen -G "$WHEELS/torch-*.whl" >/dev/null; then
  build_args+=(-v "$WHEELS:/wheels:ro" --build-arg WHEELS=/wheels --build-arg TORCH_INDEX=)
fi
# pip in the build trusts the host's CAs (a TLS-intercepting proxy in front of PyPI has its CA there)
CA="${CONTAINER_CHECK_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
if [ -f "$CA" ]; then
  build_args+=(-v "$CA:/etc/host-ca.crt:ro" --build-arg CA_BUNDLE=/etc/host-ca.crt)
fi
say "podman build ${build_args[*]}"
build_start=$(date +%s)
[ -n "${CONTAINER_CHECK_NO_CACHE:-}" ] && build_args+=(--no-cache)
podman build --network host --force-rm "${build_args[@]}" -t "$IMAGE" -f Containerfile . >"$STATE/build.log" 2>&1 \
  || fail "podman build (see $STATE/build.log): $(grep -v '^ *$' "$STATE/build.log" | tail -1)"
BUILD_SECONDS=$(( $(date +%s) - build_start ))
image_mb() { podman image inspect "$1" --format '{{.Size}}' 2>/dev/null | awk '{printf "%.0f MB", $1/1e6}'; }
say "image built in ${BUILD_SECONDS} s: $(image_mb "$IMAGE")"

# 5. `cluster up` in the container, host network, every port picked by the OS (written to the ready file)
RUN_DIR="$STATE/run"
$SUDO rm -rf "$RUN_DIR" && mkdir -p "$RUN_DIR" && chmod 0777 "$RUN_DIR"
CONTAINER_ID=$(podman run -d --name "$NAME" --network host -v "$RUN_DIR:/out" "$IMAGE" \
  up --any-ports --agents 1 --ready-file /out/ready.json 2>"$STATE/run.err") \
  || fail "podman run: $(tail -1 "$STATE/run.err")"
say "container $NAME started"

# wait_for_edge CONTAINER READY_FILE LOG WHAT: sets EDGE_ADDRESS once the container has written the edge's address
# to READY_FILE (a host path); fails, with the container's log in LOG, if it stops first or the deadline passes
wait_for_edge() {
  local id=$1 ready=$2 log=$3 what=$4 until=$(( $(date +%s) + ${CONTAINER_CHECK_START_DEADLINE:-240} ))
  EDGE_ADDRESS=""
  while [ -z "$EDGE_ADDRESS" ]; do
    if [ "$(podman inspect "$id" --format '{{.State.Running}}' 2>/dev/null)" != "true" ]; then
      podman logs "$id" >"$log" 2>&1
      fail "$what stopped before the edge served: $(tail -1 "$log")"
    fi
    [ "$(date +%s)" -lt "$until" ] || { podman logs "$id" >"$log" 2>&1; fail "$what: no edge in the ready file within the deadline (see $log)"; }
    [ -s "$ready" ] && EDGE_ADDRESS=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["addresses"].get("edge", ""))' "$ready" 2>/dev/null)
    [ -n "$EDGE_ADDRESS" ] || sleep 1
  done
}

deadline=$(( $(date +%s) + ${CONTAINER_CHECK_START_DEADLINE:-240} ))
wait_for_edge "$CONTAINER_ID" "$RUN_DIR/ready.json" "$STATE/container.log" "the container"
edge=$EDGE_ADDRESS
say "edge at $edge"
until curl -sf "$edge/v2/models/echo/ready" >/dev/null; do
  [ "$(date +%s)" -lt "$deadline" ] || { podman logs "$CONTAINER_ID" >"$STATE/container.log" 2>&1; fail "echo not ready at $edge within the deadline (see $STATE/container.log)"; }
  sleep 1
done

# 6. one inference from the host
body='{"id":"container-check","inputs":[{"name":"x","datatype":"FP32","shape":[1,3],"data":[1.5,2.5,3.5]}]}'
answer=$(curl -sS -m 30 -H 'Content-Type: application/json' -d "$body" "$edge/v2/models/echo/infer" 2>&1) \
  || fail "POST $edge/v2/models/echo/infer: $answer"
say "answer: $answer"
python3 -c '
import json, sys
a = json.loads(sys.argv[1])
out = a["outputs"][0]
assert a.get("id") == "container-check", a
assert out["name"] == "y" and out["shape"] == [1, 3] and out["data"] == [1.5, 2.5, 3.5], out
' "$answer" 2>"$STATE/answer.err" || fail "unexpected answer: $answer ($(tail -1 "$STATE/answer.err"))"

# 6b. the role images (CONTAINER_CHECK_ROLES), each checked against the cluster running in the full image
broker=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["addresses"]["broker_clients"])' "$RUN_DIR/ready.json")
manager=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["addresses"]["manager_queries"])' "$RUN_DIR/ready.json")
for role in ${CONTAINER_CHECK_ROLES-edge}; do
  role_image="$IMAGE-$role"
  role_start=$(date +%s)
  podman build --network host --force-rm "${build_args[@]}" --build-arg "ROLE=$role" -t "$role_image" \
    -f Containerfile . >"$STATE/build-$role.log" 2>&1 \
    || fail "podman build ROLE=$role (see $STATE/build-$role.log): $(grep -v '^ *$' "$STATE/build-$role.log" | tail -1)"
  say "$role image built in $(( $(date +%s) - role_start )) s: $(image_mb "$role_image")"
  has_torch=$(podman run --rm --entrypoint /opt/cluster/bin/python "$role_image" -c \
    'import importlib.util; print(importlib.util.find_spec("torch") is not None)' 2>&1)
  case "$role:$has_torch" in
    agent:True|edge:False|core:False) ;;
    *) fail "the $role image: torch importable = $has_torch" ;;
  esac
  case "$role" in
    edge)
      rm -f "$RUN_DIR/edge-ready.json"
      EDGE_ID=$(podman run -d --network host -v "$RUN_DIR:/out" "$role_image" edge --broker "$broker" \
        --host 127.0.0.1 --port 0 --grpc-port -1 --ready-file /out/edge-ready.json 2>"$STATE/run-edge.err") \
        || fail "podman run the edge image: $(tail -1 "$STATE/run-edge.err")"
      wait_for_edge "$EDGE_ID" "$RUN_DIR/edge-ready.json" "$STATE/edge.log" "the edge image's container"
      role_edge=$EDGE_ADDRESS
      answer=$(curl -sS -m 30 -H 'Content-Type: application/json' -d "$body" "$role_edge/v2/models/echo/infer" 2>&1)
      podman logs "$EDGE_ID" >"$STATE/edge.log" 2>&1
      podman rm -f -t 5 "$EDGE_ID" >/dev/null 2>&1
      EDGE_ID=""
      case "$answer" in *'"data":[1.5,2.5,3.5]'*) ;; *) fail "the edge image's answer: $answer (see $STATE/edge.log)" ;; esac
      say "edge image: answered through the cluster's broker: $answer" ;;
    core)
      for what in broker manager; do
        address="$broker"; [ "$what" = manager ] && address="$manager"
        podman run --rm --network host "$role_image" health "$what" "--$what" "$address" >"$STATE/health-$what.log" 2>&1 \
          || fail "the core image: cluster health $what: $(tail -1 "$STATE/health-$what.log")"
        say "core image: cluster health $what: $(tail -1 "$STATE/health-$what.log")"
      done ;;
  esac
done

# 7. stop it: SIGTERM to `cluster up`, which stops every role and exits 0
podman stop -t 30 "$CONTAINER_ID" >/dev/null 2>&1
status=$(podman inspect "$CONTAINER_ID" --format '{{.State.ExitCode}}' 2>/dev/null)
podman logs "$CONTAINER_ID" >"$STATE/container.log" 2>&1
podman rm -f "$CONTAINER_ID" >/dev/null 2>&1
CONTAINER_ID=""
[ "$status" = 0 ] || fail "cluster up exited with status $status after SIGTERM (see $STATE/container.log)"
say "stopped (exit status 0); build ${BUILD_SECONDS} s, whole check $(( $(date +%s) - started )) s"
echo "container check: PASSED"
