#!/usr/bin/env bash
# Builds the glued Debian package from the repository, offline, with
# dpkg-deb alone (no debhelper, no network):
#
#   dist/deb/build.sh [BINARY [OUT_DIR]]
#
# BINARY defaults to target/release/glued, built here with
# `cargo build --release --locked` when absent (set CARGO_NET_OFFLINE=true on
# an air-gapped host with a filled cargo cache). The package goes to OUT_DIR
# (default target/deb); its path is printed last.
#
# Contents: /usr/bin/glued (stripped), the hardened unit
# /lib/systemd/system/glued.service, the systemd-resolved drop-in
# /usr/lib/systemd/resolved.conf.d/glued.conf (~glued.internal → 127.0.0.1),
# /etc/glued/glued.toml from glued.toml.example (a conffile), the Grafana
# dashboard and the README. postinst creates the `glued` system user (in the
# docker group when it exists) and enables the unit.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
binary="${1:-}"
out="${2:-$repo/target/deb}"
# gzip -1 by default keeps the test fast; DEB_COMPRESSION=xz for releases.
compression="${DEB_COMPRESSION:-gzip}"

if [[ -z "$binary" ]]; then
    binary="$repo/target/release/glued"
    [[ -x "$binary" ]] || (cd "$repo" && cargo build --release --locked)
fi
[[ -x "$binary" ]] || { echo "error: $binary is not an executable" >&2; exit 1; }

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n1)"
arch="$(dpkg --print-architecture)"
[[ -n "$version" ]] || { echo "error: no version in Cargo.toml" >&2; exit 1; }

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
root="$stage/glued_${version}_${arch}"

install -D -m 0755 "$binary" "$root/usr/bin/glued"
strip --strip-unneeded "$root/usr/bin/glued" 2>/dev/null || true
install -D -m 0644 "$here/glued.service" "$root/lib/systemd/system/glued.service"
install -D -m 0644 "$here/resolved-glued.conf" \
    "$root/usr/lib/systemd/resolved.conf.d/glued.conf"
install -D -m 0644 "$repo/glued.toml.example" "$root/etc/glued/glued.toml"
install -D -m 0644 "$repo/README.md" "$root/usr/share/doc/glued/README.md"
install -D -m 0644 "$repo/dist/grafana/glued.json" "$root/usr/share/glued/grafana/glued.json"

install -d "$root/DEBIAN"
installed_kib="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
cat >"$root/DEBIAN/control" <<CONTROL
Package: glued
Version: $version
Architecture: $arch
Maintainer: Glued maintainers <glued@localhost>
Installed-Size: $installed_kib
Depends: libc6 (>= 2.34), libgcc-s1, adduser
Recommends: docker.io | docker-ce
Section: net
Priority: optional
Description: cluster-wide DNS names for Docker containers
 Glued answers DNS for the containers of every Docker host of a cluster
 (name.glued.internal), replicating records between hosts over an
 authenticated gossip protocol, and forwards every other name to the
 upstream resolvers.
CONTROL
echo /etc/glued/glued.toml >"$root/DEBIAN/conffiles"

cat >"$root/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if ! getent passwd glued >/dev/null; then
        adduser --system --group --home /var/lib/glued --no-create-home \
            --gecos "Glued DNS" glued >/dev/null
    fi
    # Read access to the Docker engine's socket.
    if getent group docker >/dev/null; then
        adduser glued docker >/dev/null
    fi
    chown root:glued /etc/glued/glued.toml
    chmod 0640 /etc/glued/glued.toml
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        systemctl enable glued.service >/dev/null 2>&1 || true
        # Restart only a running Glued (an upgrade); a fresh install waits
        # for the operator to set the cluster secret and start it.
        systemctl try-restart glued.service || true
        # systemd-resolved reads the new ~glued.internal drop-in.
        systemctl try-restart systemd-resolved.service || true
    fi
fi
SCRIPT

cat >"$root/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl disable --now glued.service >/dev/null 2>&1 || true
fi
SCRIPT

cat >"$root/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    if [ "$1" = remove ] || [ "$1" = purge ]; then
        systemctl try-restart systemd-resolved.service || true
    fi
fi
if [ "$1" = purge ]; then
    rm -rf /var/lib/glued
fi
SCRIPT
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

mkdir -p "$out"
deb="$out/glued_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Z"$compression" -z1 --build "$root" "$deb" >/dev/null
echo "$deb"
