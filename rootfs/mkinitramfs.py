#!/usr/bin/env python3
"""Writes moat's guest initramfs: a gzip'd newc cpio whose /init is the static
moat-agent, plus the few nodes the kernel needs before init runs (/dev/console).

Built directly in Python rather than with cpio(1) so that it needs no root for the
device node and the archive is byte-for-byte reproducible (fixed mtimes and owners).

usage: mkinitramfs.py AGENT OUTPUT
"""
import gzip
import os
import stat
import sys

def header(name, mode, size, ino, rdev=(0, 0), nlink=1):
    fields = [
        ino, mode, 0, 0, nlink, 0, size,  # ino mode uid gid nlink mtime filesize
        0, 0, rdev[0], rdev[1],           # devmajor devminor rdevmajor rdevminor
        len(name) + 1, 0,                 # namesize check
    ]
    h = b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    return h + b"\0" * (-len(h) % 4)

def entry(name, mode, data=b"", ino=0, rdev=(0, 0)):
    out = header(name, mode, len(data), ino, rdev, 2 if stat.S_ISDIR(mode) else 1) + data
    return out + b"\0" * (-len(out) % 4)

def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    agent, output = sys.argv[1], sys.argv[2]
    with open(agent, "rb") as f:
        init = f.read()
    if init[:4] != b"\x7fELF":
        sys.exit(f"mkinitramfs: {agent} is not an ELF executable")
    parts = []
    ino = 1
    for d in ("dev", "proc", "sys", "run", "tmp", "mnt", "etc"):
        parts.append(entry(d, stat.S_IFDIR | 0o755, ino=ino)); ino += 1
    parts.append(entry("dev/console", stat.S_IFCHR | 0o600, ino=ino, rdev=(5, 1))); ino += 1
    parts.append(entry("init", stat.S_IFREG | 0o755, init, ino=ino)); ino += 1
    parts.append(entry("TRAILER!!!", 0, ino=0))
    tmp = output + ".tmp"
    with open(tmp, "wb") as f:
        # mtime=0 keeps the gzip header reproducible too.
        with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=6, mtime=0) as gz:
            gz.write(b"".join(parts))
    os.replace(tmp, output)

if __name__ == "__main__":
    main()
