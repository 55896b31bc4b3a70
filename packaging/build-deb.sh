#!/usr/bin/env bash
# Builds the haguard .deb with the standard Debian tools (debhelper via dpkg-buildpackage).
#   usage: build-deb.sh [OUTDIR]        (default build/deb; `make deb` runs this)
# 1. stage the sources with packaging/debian as debian/ in OUTDIR/haguard-VERSION;
# 2. fill its wheelhouse/ with haguard's wheel and its PyPI dependencies (the only step
#    that uses the network, through pip's ordinary index configuration);
# 3. dpkg-buildpackage -b, which installs from that wheelhouse offline (debian/rules).
# Needs: debhelper, dpkg-dev, fakeroot, python3 (3.11, as on the target), python3-pip.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$root/build/deb}" && cd "${1:-$root/build/deb}" && pwd)
py=/usr/bin/python3

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$root/haguard/__init__.py")
deb_version=$(dpkg-parsechangelog -l "$root/packaging/debian/changelog" -S Version)
if [ "${deb_version%-*}" != "$version" ]; then
  echo "build-deb: packaging/debian/changelog is at $deb_version but haguard is $version:" \
       "add a changelog entry (dch -v $version-1)" >&2
  exit 1
fi

src="$out/haguard-$version"
rm -rf "$src" "$out"/haguard_*
mkdir -p "$src/packaging" "$src/wheelhouse"
# Only what the package is built from; caches and the developer venv stay behind.
tar -C "$root" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.elf' \
    -cf - haguard pyproject.toml README.md docs config systemd | tar -C "$src" -xf -
cp "$root/packaging/haguard-wrapper" "$src/packaging/"
cp -r "$root/packaging/prometheus" "$root/packaging/grafana" "$src/packaging/"
cp -r "$root/packaging/debian" "$src/debian"

# The target's Python builds the wheelhouse, so compiled wheels (pydantic-core) match it.
nice -n 10 "$py" -m pip wheel --disable-pip-version-check -w "$src/wheelhouse" "$src" \
    >"$out/wheelhouse.log" 2>&1 || {
  tail -n 20 "$out/wheelhouse.log" >&2
  echo "build-deb: collecting the wheels failed; full log: $out/wheelhouse.log" >&2
  exit 1
}

start=$(date +%s)
(cd "$src" && nice -n 10 dpkg-buildpackage -b -us -uc --no-sign >"$out/build.log" 2>&1) || {
  tail -n 40 "$out/build.log" >&2
  echo "build-deb: dpkg-buildpackage failed; full log: $out/build.log" >&2
  exit 1
}
deb="$out/haguard_${deb_version}_$(dpkg-architecture -qDEB_HOST_ARCH).deb"
echo "built $deb ($(du -h "$deb" | cut -f1), dpkg-buildpackage $(( $(date +%s) - start )) s)"
