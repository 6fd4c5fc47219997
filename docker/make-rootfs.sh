#!/bin/sh
# Builds the root file system of the Glued image from a dynamically linked
# glued binary: the binary, the shared libraries `ldd` lists (with the
# loader), the glibc NSS modules for files and DNS (so `ID@name:port`
# bootstrap peers resolve through /etc/hosts and Docker's embedded DNS), a
# minimal /etc, and an empty data directory.
#
# Usage: docker/make-rootfs.sh BINARY OUTDIR
#
# OUTDIR is emptied first (a `.keep` placeholder in it survives, so the
# tracked dist/rootfs/.keep stays). The result is copied into a `FROM scratch` image
# (`COPY rootfs/ /`). Used by both Dockerfile paths: inside the online build
# stage, and on the host for the offline stage (dist/rootfs).
set -eu

if [ "$#" -ne 2 ]; then
    echo "usage: $0 BINARY OUTDIR" >&2
    exit 2
fi
binary=$1
out=$2

if [ ! -x "$binary" ]; then
    echo "$0: $binary is not an executable file" >&2
    exit 1
fi

# Refuse to empty something that is obviously not a build output.
case "$out" in
    "" | / | /usr | /usr/* | /etc | /etc/* | /lib* | /bin | /sbin | /var | "$HOME")
        echo "$0: refusing to use $out as OUTDIR" >&2
        exit 1
        ;;
esac

mkdir -p "$out"
find "$out" -mindepth 1 -maxdepth 1 ! -name .keep -exec rm -rf {} +
mkdir -p "$out/usr/local/bin" "$out/etc" "$out/var/lib/glued" "$out/tmp"
chmod 1777 "$out/tmp"
chmod 0700 "$out/var/lib/glued"

cp "$binary" "$out/usr/local/bin/glued"
chmod 0755 "$out/usr/local/bin/glued"

# copy_lib PATH: copies a library to the same path inside OUTDIR, following
# symlinks, and also keeps the path it was linked under.
copy_lib() {
    lib=$1
    [ -e "$lib" ] || return 0
    mkdir -p "$out$(dirname "$lib")"
    cp -L "$lib" "$out$lib"
}

# Shared libraries and the loader: every absolute path `ldd` prints.
# (A static binary has none; ldd then says "not a dynamic executable".)
libs=$(ldd "$binary" 2>/dev/null | awk '
    $2 == "=>" && $3 ~ /^\// { print $3 }
    $1 ~ /^\// { print $1 }
' | sort -u)
for lib in $libs; do
    copy_lib "$lib"
done

# NSS modules for `hosts: files dns`. glibc >= 2.34 has both built in and
# ships these as small compatibility stubs; older ones need them.
libdir=""
for lib in $libs; do
    case "$lib" in
        */libc.so.*) libdir=$(dirname "$lib") ;;
    esac
done
if [ -n "$libdir" ]; then
    for module in libnss_files.so.2 libnss_dns.so.2 libresolv.so.2; do
        copy_lib "$libdir/$module"
    done
fi

cat > "$out/etc/nsswitch.conf" <<'NSS'
passwd: files
group: files
hosts: files dns
NSS
cat > "$out/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
PASSWD
cat > "$out/etc/group" <<'GROUP'
root:x:0:
nogroup:x:65534:
GROUP
# Docker bind-mounts its own /etc/hosts, /etc/resolv.conf and /etc/hostname
# over these; they only matter when the rootfs is used some other way.
: > "$out/etc/hosts"
: > "$out/etc/resolv.conf"

echo "rootfs for $(basename "$binary") in $out:"
(cd "$out" && find . -type f | sort | sed 's/^\./  /')
