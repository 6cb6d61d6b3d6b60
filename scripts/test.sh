#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need (Debian packages;
# PyPI clients in .venv), checks formatting and lints, runs the Rust tests, builds the server and runs the
# end-to-end tests with real clients against it.
#
#   scripts/test.sh            everything
#   SKIP_INSTALL=1 scripts/test.sh   assume the tools are already installed
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

if [ -z "${SKIP_INSTALL:-}" ]; then
  step "installing test tools"
  scripts/install-test-deps.sh
fi

# The toolchain is the machine's own (decision 0007: none can be downloaded here, so no
# rust-toolchain.toml pins one that would have to be fetched); Cargo.toml's rust-version is the floor.
step "toolchain: $(rustc --version)"

step "cargo fmt --check"
cargo fmt --all -- --check

step "docs/compatibility.md and docs/security.md: every row names tests that exist"
python3 scripts/check-compatibility-map.py docs/compatibility.md
python3 scripts/check-compatibility-map.py docs/security.md

# One crypto provider (aws-lc-rs). ring stays in Cargo.lock as an optional dependency of
# rustls-webpki; `cargo tree -i ring` prints nothing (exit 0) while no feature pulls it in,
# and fails with "did not match any packages" once it is not in the lock file at all.
step "ring is not in the dependency graph"
ring_err=$(mktemp)
if ring_tree=$(cargo tree -i ring --workspace --locked 2>"$ring_err"); then
  if [ -n "$ring_tree" ]; then
    printf 'ring is linked (one crypto provider: aws-lc-rs):\n%s\n' "$ring_tree" >&2
    exit 1
  fi
elif ! grep -q 'did not match any packages' "$ring_err"; then
  cat "$ring_err" >&2
  exit 1
fi
rm -f "$ring_err"

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test (unit, property and integration tests)"
cargo test --workspace --locked

step "building sekisho"
cargo build --locked -p sekisho -p sekisho-bench

# The fuzz crate (fuzz/, outside the workspace, its own Cargo.lock) builds on the stable
# toolchain without instrumentation; fuzzing itself is `cargo +nightly fuzz run <target>`.
# In the workspace's target directory it reuses most of the dependencies just built (same
# versions and profile; a separate directory would build them all again), and neither build
# invalidates the other's.
step "fuzz targets compile"
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}" cargo build --manifest-path fuzz/Cargo.toml --locked

step "end-to-end tests (AWS CLI, boto3, awsiotsdk, paho-mqtt, mosquitto)"
# Our profile's ca_bundle must win: AWS_CA_BUNDLE in the environment would override it.
unset AWS_CA_BUNDLE
export SEKISHO_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/sekisho"
# The PyPI clients live in the virtual environment scripts/install-test-deps.sh made: its python
# runs pytest, and its bin/ comes first on PATH so that the tests' `aws` is the pinned AWS CLI.
VENV="${SEKISHO_VENV:-$PWD/.venv}"
if ! "$VENV/bin/python" -c 'import pytest_timeout' 2>/dev/null || [ ! -x "$VENV/bin/aws" ]; then
  echo "no test environment in $VENV: run scripts/install-test-deps.sh (or drop SKIP_INSTALL)" >&2
  exit 1
fi
export PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV"
# Strict: a skipped test fails the run (conftest.py); each test has a timeout (pytest.ini).
export SEKISHO_STRICT=1
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=15 tests/e2e "$@"
