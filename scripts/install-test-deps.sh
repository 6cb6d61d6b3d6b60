#!/usr/bin/env bash
# Installs the clients the end-to-end tests drive. Idempotent.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need_apt=()
command -v mosquitto_pub >/dev/null || need_apt+=(mosquitto-clients)
command -v openssl >/dev/null || need_apt+=(openssl)
# Runs the server and a client in the future, to test what happens when credentials expire.
command -v faketime >/dev/null || need_apt+=(faketime)
# *.localhost names resolve to loopback through nss-myhostname (the endpoints are <prefix>-ats.iot.<region>.localhost).
getent hosts probe-ats.iot.us-east-1.localhost >/dev/null 2>&1 || need_apt+=(libnss-myhostname)
if [ ${#need_apt[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! getent hosts probe-ats.iot.us-east-1.localhost >/dev/null 2>&1; then
  # The package adds itself to nsswitch.conf on install; make sure it is there.
  $SUDO sed -i 's/^hosts:\s*files/hosts:          files myhostname/' /etc/nsswitch.conf
fi
getent hosts probe-ats.iot.us-east-1.localhost >/dev/null

python3 -m pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt

# Node.js clients (aws-sdk v2, aws-iot-device-sdk v1), pinned by package-lock.json.
command -v node >/dev/null || {
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
}
npm ci --prefix tests/e2e/node --no-audit --no-fund --loglevel=error >/dev/null
