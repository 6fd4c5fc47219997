#!/usr/bin/env bash
# Builds the local test image `glued-test-busybox` offline from Debian's
# busybox-static: a root file system holding only /bin/busybox and its applet
# links, imported with `docker import` (no registry needed).
#
# Idempotent: does nothing when the image exists (set REBUILD=1 to force).
# Needs: docker, and busybox-static (apt-get install -y busybox-static).
#
# Cheap container for tests and benchmarks:
#   docker run -d --rm --network NET --name NAME glued-test-busybox sleep 3600
set -euo pipefail

IMAGE="${IMAGE:-glued-test-busybox}"

if [[ "${REBUILD:-0}" != 1 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "image $IMAGE already present"
    exit 0
fi

is_static() { [[ -x "$1" ]] && { ldd "$1" 2>&1 || true; } | grep -q "not a dynamic executable"; }
BUSYBOX=""
for candidate in "$(command -v busybox || true)" /bin/busybox /usr/bin/busybox; do
    if [[ -n "$candidate" ]] && is_static "$candidate"; then
        BUSYBOX="$candidate"
        break
    fi
done
if [[ -z "$BUSYBOX" ]]; then
    echo "a static busybox is needed: apt-get install -y busybox-static" >&2
    exit 1
fi

ROOT="$(mktemp -d)"
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT/bin" "$ROOT/sbin" "$ROOT/usr/bin" "$ROOT/usr/sbin" "$ROOT/etc" "$ROOT/tmp"
cp "$BUSYBOX" "$ROOT/bin/busybox"
chroot "$ROOT" /bin/busybox --install -s
echo "root:x:0:0:root:/root:/bin/sh" > "$ROOT/etc/passwd"
echo "root:x:0:" > "$ROOT/etc/group"
tar -C "$ROOT" -c . | docker import \
    --change 'CMD ["/bin/sh"]' \
    --change 'ENV PATH=/bin:/sbin:/usr/bin:/usr/sbin' \
    - "$IMAGE" >/dev/null
echo "image $IMAGE built from $BUSYBOX"
