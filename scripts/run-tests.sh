#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian machine (as root, or with sudo), then runs the test suite.
# --lint first (CI, .ci/run): `ruff check .` and `ruff format --check .` after the install, before any test.
# Debian packages: Chromium (browser tests), nfs-ganesha + libnfs tools + rpcbind (the NFS share test), wrk (benchmarks),
# g++ (AOTInductor compiles C++ when a test publishes a model with --compile).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
PACKAGES="chromium nfs-ganesha nfs-ganesha-vfs libnfs-utils rpcbind wrk g++"
if ! dpkg -s $PACKAGES >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
fi
# constraints.lock: every package at the version CI tested (scripts/lock.py makes it)
python3 -m pip install -q -c constraints.lock -e '.[test]'
if [ "${1:-}" = "--lint" ]; then
  shift
  python3 -m ruff check .
  python3 -m ruff format --check .
fi
exec python3 -m pytest "$@"
