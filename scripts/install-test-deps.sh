#!/usr/bin/env bash
# Installs the clients the end-to-end tests drive. Idempotent, and quick when all is there.
# Works on a stock Debian: Debian packages with apt-get; the PyPI clients (AWS CLI, boto3,
# awsiotsdk, paho-mqtt, pytest) in a virtual environment, .venv at the repository's root
# (SEKISHO_VENV overrides), never in the system's Python (PEP 668). scripts/test.sh runs pytest
# with that environment's python and puts its bin/ first on PATH, so `aws` is the pinned one.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
VENV="${SEKISHO_VENV:-$PWD/.venv}"

apt_updated=""
apt_install() {
  [ -n "$apt_updated" ] || { $SUDO apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
command -v curl >/dev/null || need_apt+=(curl ca-certificates)
command -v mosquitto_pub >/dev/null || need_apt+=(mosquitto-clients)
command -v openssl >/dev/null || need_apt+=(openssl)
# Runs the server and a client in the future, to test what happens when credentials expire.
command -v faketime >/dev/null || need_apt+=(faketime)
# *.localhost names resolve to loopback through nss-myhostname (the endpoints are <prefix>-ats.iot.<region>.localhost).
getent hosts probe-ats.iot.us-east-1.localhost >/dev/null 2>&1 || need_apt+=(libnss-myhostname)
# Node.js clients (aws-sdk v2, aws-iot-device-sdk v1).
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
# npm's aws-lambda-ric (the runtime interface client Node.js functions run under) builds its
# native part from source.
for tool in cmake autoconf automake libtool g++ make; do
  command -v "$tool" >/dev/null || need_apt+=("$tool")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  apt_install "${need_apt[@]}"
fi
if ! getent hosts probe-ats.iot.us-east-1.localhost >/dev/null 2>&1; then
  # The package adds itself to nsswitch.conf on install; make sure it is there.
  $SUDO sed -i 's/^hosts:\s*files/hosts:          files myhostname/' /etc/nsswitch.conf
fi
getent hosts probe-ats.iot.us-east-1.localhost >/dev/null

# The PyPI clients, pinned by requirements.txt, in the virtual environment. A stamp with the
# requirements' hash skips pip when nothing changed.
req=tests/e2e/requirements.txt
want="$(sha256sum "$req" | cut -d' ' -f1)"
stamp="$VENV/.sekisho-requirements.sha256"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
  rm -rf "$VENV"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    # Debian's python3 makes environments only with python3-venv (ensurepip).
    rm -rf "$VENV"
    pyver="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    apt_install python3-venv "python${pyver}-venv" 2>/dev/null || apt_install python3-venv
    python3 -m venv "$VENV"
  fi
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
  echo "$want" >"$stamp"
fi
"$VENV/bin/python" -c 'import pytest, pytest_timeout, boto3, paho.mqtt, awsiot' >/dev/null
[ -x "$VENV/bin/aws" ]

# The AWS IoT Device SDK for Python v1's samples ship only in its source distribution, which pip
# does not keep: fetched once from PyPI (the version requirements.txt pins), checked against its
# hash, and unpacked to $VENV/sdk-samples for tests/e2e/test_sdk_samples.py.
samples="$VENV/sdk-samples"
sdist=awsiotpythonsdk-1.6.2
if [ ! -d "$samples/$sdist/samples" ]; then
  rm -rf "$samples" && mkdir -p "$samples"
  "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    -d "$samples" AWSIoTPythonSDK==1.6.2
  echo "ad5c13f0f563168a34ef818cbf74cf1ae02774650559a074950f6631981abcda  $samples/$sdist.tar.gz" | sha256sum -c --quiet -
  tar -xzf "$samples/$sdist.tar.gz" -C "$samples" "$sdist/samples"
fi

# The Node.js clients, pinned by package-lock.json; `npm ci` again only when the lock changed.
node_dir=tests/e2e/node
want="$(sha256sum "$node_dir/package-lock.json" | cut -d' ' -f1)"
stamp="$node_dir/node_modules/.sekisho-lock.sha256"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  npm ci --prefix "$node_dir" --no-audit --no-fund --loglevel=error >/dev/null
  echo "$want" >"$stamp"
fi
