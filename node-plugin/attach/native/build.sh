#!/bin/sh
# Builds arbor-nbd-netlink, the helper that configures the kernel's NBD driver over
# netlink (see nbd-netlink.c), into dist/native/. `npm ci` runs this (the package's
# install script) and so does `npm run build`.
#
# Without a C compiler the helper is not built and the node plugin attaches volumes
# through nbdfuse instead: `arbor serve` must keep working on a machine with Node.js
# alone. With a compiler, a failed build is an error.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
out="$root/dist/native"
cc=${CC:-cc}
if ! command -v "$cc" >/dev/null 2>&1; then
  echo "arbor: no C compiler ('$cc'), so the kernel NBD attach helper was not built; the node plugin will attach volumes through nbdfuse. Install gcc (Debian: apt-get install gcc libc6-dev) and run 'npm run build' to build it." >&2
  exit 0
fi
mkdir -p "$out"
"$cc" -O2 -Wall -Wextra -std=c11 -o "$out/arbor-nbd-netlink.tmp" "$here/nbd-netlink.c"
mv "$out/arbor-nbd-netlink.tmp" "$out/arbor-nbd-netlink"
