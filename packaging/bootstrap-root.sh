#!/usr/bin/env bash
# Builds a clean Debian 12 root (debootstrap minbase) once and caches it as a tarball, so
# the install test starts from the same pristine system every time without downloading it.
#   usage: bootstrap-root.sh OUT.tar [SUITE]
# The mirror is the one this machine's apt already uses (first deb822 or one-line entry for
# Debian), so the test works wherever apt does.
set -euo pipefail
out=${1:?usage: bootstrap-root.sh OUT.tar [SUITE]}
suite=${2:-bookworm}
[ -s "$out" ] && exit 0

mirror=$(awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
if [ -z "$mirror" ]; then
  mirror=$(awk '$1 == "deb" && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

mkdir -p "$(dirname "$out")"
work=$(mktemp -d "$(dirname "$out")/.root.XXXXXX")
cleanup() {
  # debootstrap mounts proc/sys inside the target; never leave them behind.
  for m in $(awk -v r="$work" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$m" || true
  done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

nice -n 10 debootstrap --variant=minbase "$suite" "$work/root" "$mirror" >"$work/log" 2>&1 || {
  tail -n 30 "$work/log" >&2
  exit 1
}
rm -rf "$work/root/var/cache/apt/archives/"*.deb
tar -C "$work/root" --numeric-owner -cf "$out.tmp" .
mv "$out.tmp" "$out"
