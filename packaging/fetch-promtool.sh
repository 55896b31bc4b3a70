#!/usr/bin/env bash
# promtool, from Debian's prometheus package, for the alert-rule tests: unpacked into DEST
# (the venv's bin) without installing the package, which would start a Prometheus server.
set -euo pipefail
dest=$1
[ -x "$dest/promtool" ] && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
if ! (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null); then
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  (cd "$tmp" && apt-get download -qq prometheus)
fi
dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
install -m 0755 "$tmp/root/usr/bin/promtool" "$dest/promtool"
