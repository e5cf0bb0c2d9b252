#!/bin/sh
# Lays out the image's whole file system under ROOTFS: the quicmesh binary, the C libraries it
# links (from ldd, paths kept), the CA bundle for ACME's HTTPS, an unprivileged user, /tmp and
# an empty /var/empty (the Containerfile makes the state directory from it, owned by that
# user). Used by the Containerfile's build stage, and on a host without an image
# registry to build FROM scratch (see README.md).
#
#   deploy/container/collect.sh target/release/quicmesh target/container/rootfs
set -eu
bin=$1
rootfs=$2
[ -x "$bin" ] || { echo "collect.sh: $bin is not an executable" >&2; exit 1; }
rm -rf "$rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$rootfs/var/empty" "$rootfs/etc/quicmesh"
cp "$bin" "$rootfs/usr/local/bin/quicmesh"
# Debug information is not needed to run, and is most of the binary's size.
if command -v strip >/dev/null 2>&1; then strip --strip-debug "$rootfs/usr/local/bin/quicmesh"; fi
# Every library the dynamic loader resolves, and the loader itself, at the paths it expects.
ldd "$bin" | awk '/=> \// { print $3 } /^\t\/.* \(0x/ { print $1 }' | while read -r lib; do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
fi
echo 'quicmesh:x:65532:65532:quicmesh:/var/lib/quicmesh:/sbin/nologin' > "$rootfs/etc/passwd"
echo 'quicmesh:x:65532:' > "$rootfs/etc/group"
chmod 1777 "$rootfs/tmp"
chmod 0700 "$rootfs/var/empty"
