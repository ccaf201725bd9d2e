#!/bin/sh
# Test set-up: tests/test_nginx.py runs a real nginx (Debian's nginx-light) in front of
# trioserve. Install it when missing; `apt-get update` only when the install needs it.
# As root, or through passwordless sudo; otherwise say so (the tests then skip, or fail
# when CI is set).
set -e
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] && exit 0
if [ "$(id -u)" = 0 ]; then
    SUDO=
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "nginx is missing and we are not root: apt-get install nginx-light (tests will skip)" >&2
    exit 0
fi
APT="$SUDO env DEBIAN_FRONTEND=noninteractive apt-get"  # (sudo does not pass the env on)
$APT install -y -qq nginx-light >/dev/null 2>&1 \
    || { $APT update -qq && $APT install -y -qq nginx-light >/dev/null; }
