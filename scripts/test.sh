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

# The toolchain is the machine's own (none can be downloaded here, so no rust-toolchain.toml
# pins one that would have to be fetched); Cargo.toml's rust-version is the floor.
step "toolchain: $(rustc --version)"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test (unit, property and integration tests)"
cargo test --workspace --locked

step "building sekisho"
cargo build --locked -p sekisho -p sekisho-bench

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
