#!/bin/sh
# Test set-up: tests/test_http2_clients.py drives a headless Chromium (Debian's chromium)
# against trioserve over HTTP/2 and TLS, and nghttp / h2load (nghttp2-client) over h2c and
# TLS. Install them when missing; `apt-get update` only
# when the install needs it. As root, or through passwordless sudo; otherwise say so (the
# test then skips).
set -e
command -v chromium >/dev/null 2>&1 && command -v h2load >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ]; then
    SUDO=
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "chromium or h2load is missing and we are not root: apt-get install chromium nghttp2-client (their tests will skip)" >&2
    exit 0
fi
APT="$SUDO env DEBIAN_FRONTEND=noninteractive apt-get"  # (sudo does not pass the env on)
$APT install -y -qq --no-install-recommends chromium nghttp2-client >/dev/null 2>&1 \
    || { $APT update -qq && $APT install -y -qq --no-install-recommends chromium nghttp2-client >/dev/null; }
