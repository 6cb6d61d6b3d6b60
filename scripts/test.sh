#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need (Debian packages,
# PyPI clients), checks formatting and lints, runs the Rust tests, builds the server and runs the
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
python3 -m pytest -q -p no:cacheprovider tests/e2e "$@"
