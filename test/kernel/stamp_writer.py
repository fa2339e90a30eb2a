#!/usr/bin/env python3
"""A writer with verification, run inside the test node against a block device or a file.

    stamp_writer.py write PATH BLOCKS STATE STOP [THREADS]
    stamp_writer.py verify PATH BLOCKS STATE

`write` writes 4 KiB blocks at random offsets with O_DIRECT and O_DSYNC (a write
that completes is durable: the kernel sends it with FUA), THREADS at a time (each
thread owns the blocks i with i % THREADS == its number, so no two writes to one
block are ever in flight), until the file STOP exists. Every block holds a stamp:
magic, block number, sequence number, CRC-32 of the rest. Any I/O error ends it
with status 1. It writes STATE (JSON): the last sequence number each block got,
how many writes completed, and the longest any single write took (a stall).

`verify` reads every block back and checks it holds exactly the stamp STATE says it
got last (or zeros, where it was never written).

Python, not Node.js: O_DIRECT needs buffers aligned to the device's block size,
which mmap gives and Node.js cannot.
"""
import errno
import json
import mmap
import os
import random
import struct
import sys
import threading
import time
import zlib

BLOCK = 4096
MAGIC = 0x41524230_5354414D  # "ARB0STAM"
HEADER = struct.Struct("<QQQ")


def stamp(buffer, block, sequence):
    HEADER.pack_into(buffer, 0, MAGIC, block, sequence)
    # The rest of the block is derived from the stamp, so a torn or misplaced block shows.
    body = (struct.pack("<QQ", block, sequence) * ((BLOCK - 28) // 16 + 1))[: BLOCK - 28]
    buffer[HEADER.size : BLOCK - 4] = body
    struct.pack_into("<I", buffer, BLOCK - 4, zlib.crc32(buffer[: BLOCK - 4]))


def parse(data, block):
    if data == bytes(BLOCK):
        return 0
    magic, owner, sequence = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise ValueError(f"block {block}: no stamp (magic {magic:#x})")
    if owner != block:
        raise ValueError(f"block {block}: holds the stamp of block {owner}")
    if zlib.crc32(data[: BLOCK - 4]) != struct.unpack_from("<I", data, BLOCK - 4)[0]:
        raise ValueError(f"block {block}: the stamp's checksum is wrong (torn or corrupted)")
    return sequence


def write(path, blocks, state_file, stop_file, threads):
    fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
    last = [0] * blocks
    sequence = [0]
    lock = threading.Lock()
    stats = {"writes": 0, "longestWriteSeconds": 0.0, "stalls": []}
    failure = []

    def run(me):
        buffer = mmap.mmap(-1, BLOCK)
        rng = random.Random(me)
        mine = list(range(me, blocks, threads))
        while not failure and not os.path.exists(stop_file):
            block = rng.choice(mine)
            with lock:
                sequence[0] += 1
                number = sequence[0]
            stamp(buffer, block, number)
            started = time.monotonic()
            try:
                written = os.pwrite(fd, buffer, block * BLOCK)
            except OSError as err:
                failure.append(f"write of block {block} failed after {time.monotonic() - started:.1f} s: {err}")
                return
            took = time.monotonic() - started
            if written != BLOCK:
                failure.append(f"write of block {block} wrote {written} bytes")
                return
            with lock:
                last[block] = number
                stats["writes"] += 1
                stats["longestWriteSeconds"] = max(stats["longestWriteSeconds"], took)
                if took >= 1.0:
                    stats["stalls"].append(round(took, 2))

    workers = [threading.Thread(target=run, args=(me,)) for me in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    os.close(fd)
    with open(state_file, "w") as out:
        json.dump({**stats, "last": last, "failure": failure[0] if failure else None}, out)
    if failure:
        print(failure[0], file=sys.stderr)
        sys.exit(1)


def verify(path, blocks, state_file):
    with open(state_file) as f:
        last = json.load(f)["last"]
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as err:
        # tmpfs has no direct I/O (an image exported there): its page cache is the file.
        if err.errno != errno.EINVAL:
            raise
        fd = os.open(path, os.O_RDONLY)
    buffer = mmap.mmap(-1, BLOCK)
    wrong = []
    for block in range(blocks):
        os.preadv(fd, [buffer], block * BLOCK)
        try:
            found = parse(bytes(buffer), block)
            if found != last[block]:
                wrong.append(f"block {block}: holds write {found}, its last completed write was {last[block]}")
        except ValueError as err:
            wrong.append(str(err))
    os.close(fd)
    if wrong:
        print(f"{len(wrong)} of {blocks} blocks are wrong:\n" + "\n".join(wrong[:20]), file=sys.stderr)
        sys.exit(1)
    print(f"all {blocks} blocks hold their last completed write")


if __name__ == "__main__":
    command, path, blocks = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if command == "write":
        write(path, blocks, sys.argv[4], sys.argv[5], int(sys.argv[6]) if len(sys.argv) > 6 else 4)
    elif command == "verify":
        verify(path, blocks, sys.argv[4])
    else:
        sys.exit(f"unknown command {command}")
