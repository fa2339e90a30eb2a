# syntax=docker/dockerfile:1
#
# The Arbor image: the `arbor` command (controller, node plugin, CLI) with its
# production dependencies and the host tools the node plugin runs.
#
#   docker build -t arbor:dev .
#
# Both stages use the same base image: better-sqlite3 is a native module, and the
# binary built (or fetched) in the build stage must match the runtime's Node ABI and
# glibc exactly.
ARG NODE_IMAGE=node:20.20.2-bookworm-slim

FROM ${NODE_IMAGE} AS build
# better-sqlite3 compiles from source when no prebuilt binary matches; gcc and the
# kernel's headers (linux-libc-dev, with libc6-dev) build arbor-nbd-netlink, the
# helper that configures the kernel's NBD driver over netlink.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 make g++ gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/arbor
COPY package.json package-lock.json ./
# `npm ci` runs the package's install script, which builds the helper from here.
COPY node-plugin/attach/native ./node-plugin/attach/native
RUN npm ci --no-audit --no-fund
COPY tsconfig.json ./
COPY types ./types
COPY lib ./lib
COPY store ./store
COPY csi ./csi
COPY controller ./controller
COPY node-plugin ./node-plugin
COPY cli ./cli
# Generates csi/generated from csi/proto/csi.proto, compiles to dist/, bundles the
# `arbor` program into dist/arbor-main.js (esbuild) with the bin dist/arbor.js that
# runs it, writes V8's code cache for it with this stage's Node (the same image as
# the runtime's, so V8 takes it), then drops the development dependencies
# (typescript, esbuild, mocha, the test tools).
RUN npm run build \
 && npm prune --omit=dev --no-audit --no-fund

FROM ${NODE_IMAGE}
# What the node plugin runs on the host's devices (the kernel NBD path needs no
# package: Arbor's own dist/native/arbor-nbd-netlink configures the driver):
#   libnbd-bin        the userspace attach path (nbdfuse)
#   fuse3             fusermount3, to undo nbdfuse's mount
#   mount             mount, umount, losetup
#   util-linux        blkid, blockdev, findmnt
#   e2fsprogs         mkfs.ext4, e2fsck, resize2fs, dumpe2fs
#   xfsprogs          mkfs.xfs, xfs_growfs
#   kmod              modprobe (the chart's init container loads the nbd module)
#   tini              PID 1: reaps the processes nbdfuse leaves behind
#                     and forwards SIGTERM to arbor, which commits every volume
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libnbd-bin \
      fuse3 \
      mount \
      util-linux \
      e2fsprogs \
      xfsprogs \
      kmod \
      tini \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/arbor
COPY --from=build /opt/arbor/package.json ./package.json
COPY --from=build /opt/arbor/node_modules ./node_modules
COPY --from=build /opt/arbor/dist ./dist
# csi/proto.ts loads the proto at run time from csi/proto/csi.proto under the package
# directory (lib/package-root.ts).
COPY --from=build /opt/arbor/csi/proto ./csi/proto
# `arbor` on PATH is package.json's bin; the native module must load here.
RUN ln -s /opt/arbor/dist/arbor.js /usr/local/bin/arbor \
 && arbor --version \
 && test -x /opt/arbor/dist/native/arbor-nbd-netlink \
 && node -e "require('better-sqlite3')(':memory:').close()"
# The controller in distributed mode runs as this user; the node plugin (which
# attaches devices and mounts filesystems) and the embedded controller (which uses the
# node's root-only admin socket) run as root, set by the chart.
USER node
ENTRYPOINT ["/usr/bin/tini", "--", "arbor"]
CMD ["--help"]
