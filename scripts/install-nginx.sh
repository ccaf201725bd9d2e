#!/bin/sh
# Test set-up: tests/test_nginx.py runs a real nginx (Debian's nginx-light) in front of
# trioserve. Install it when missing; `apt-get update` only when the install needs it.
set -e
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "nginx is missing and we are not root: apt-get install nginx-light (tests will skip)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq nginx-light >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq nginx-light >/dev/null; }
