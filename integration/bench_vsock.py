#!/usr/bin/env python3
"""vsock throughput: moat-vmm's hybrid vsock versus QEMU's vhost-vsock, same kernel,
same initramfs, same host, runs interleaved.

The guest runs moat-agent with `moat.selftest`, which serves a line echo on vsock
port 7. The host streams MiB-sized lines through it and reads them back; the figure
is bytes per second in each direction at once. For moat the host side goes through
the VMM's Unix socket (`CONNECT 7`); for QEMU it is an AF_VSOCK socket to the
guest's CID (vhost-vsock, in the host kernel). Figures, never pass/fail: compare the
columns measured in the same run.

usage: bench_vsock.py [--runs N] [--mib N]
"""
import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PREFIX = os.environ.get("MOAT_PREFIX", "/usr/local")
SHARE = os.path.join(PREFIX, "share/moat")
READY = b"vsock echo listening"
LINE = b"m" * ((1 << 20) - 1) + b"\n"
GUEST_CID = 3


def wait_ready(p, timeout=120):
    seen = b""
    t0 = time.monotonic()
    while READY not in seen:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError("guest echo service did not come up: %r" % seen[-300:])
        chunk = os.read(p.stdout.fileno(), 65536)
        if not chunk:
            raise RuntimeError("VMM exited: %r" % seen[-300:])
        seen += chunk


def pump(sock, mib):
    """Writes mib lines and reads them back; returns MB/s per direction."""
    def writer():
        for _ in range(mib):
            sock.sendall(LINE)
    t0 = time.monotonic()
    w = threading.Thread(target=writer)
    w.start()
    want, got = mib * len(LINE), 0
    while got < want:
        d = sock.recv(1 << 20)
        if not d:
            raise RuntimeError("echo closed after %d of %d bytes" % (got, want))
        got += len(d)
    w.join()
    return want / (time.monotonic() - t0) / 1e6


def moat_run(cmdline, mib, tmp):
    uds = os.path.join(tmp, "v.sock")
    p = subprocess.Popen([os.path.join(PREFIX, "bin/moat-vmm"), "--kernel", os.path.join(SHARE, "vmlinux"),
                          "--initrd", os.path.join(SHARE, "initramfs.cpio.gz"), "--vsock", uds,
                          "--cmdline", cmdline], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_ready(p)
        s = socket.socket(socket.AF_UNIX)
        s.connect(uds)
        s.sendall(b"CONNECT 7\n")
        line = b""
        while not line.endswith(b"\n"):
            line += s.recv(1)
        if not line.startswith(b"OK "):
            raise RuntimeError("handshake: %r" % line)
        return pump(s, mib)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait()
        # moat-vmm leaves its socket behind (a confined VMM may not unlink); the next
        # run in this directory needs the path free.
        if os.path.lexists(uds):
            os.unlink(uds)


def qemu_run(cmdline, mib):
    p = subprocess.Popen(["qemu-system-x86_64", "-enable-kvm", "-M", "microvm,acpi=off,rtc=off", "-cpu", "host",
                          "-smp", "1", "-m", "128", "-kernel", os.path.join(SHARE, "vmlinux"),
                          "-initrd", os.path.join(SHARE, "initramfs.cpio.gz"), "-append", cmdline,
                          "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
                          "-no-reboot", "-device", "vhost-vsock-device,guest-cid=%d" % GUEST_CID],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_ready(p)
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.connect((GUEST_CID, 7))
        return pump(s, mib)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", "3")))
    ap.add_argument("--mib", type=int, default=32)
    a = ap.parse_args()
    vmm = os.path.join(PREFIX, "bin/moat-vmm")
    cmdline = subprocess.run([vmm, "--print-default-cmdline"], check=True, capture_output=True,
                             text=True).stdout.strip() + " moat.selftest"
    have_vhost = os.path.exists("/dev/vhost-vsock")
    if not have_vhost:
        print("bench-vsock: *** /dev/vhost-vsock missing: QEMU column will be empty ***", file=sys.stderr)
    res = {"moat": [], "qemu": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.runs):
            res["moat"].append(moat_run(cmdline, a.mib, tmp))
            if have_vhost:
                res["qemu"].append(qemu_run(cmdline, a.mib))

    def fmt(v):
        return "%.1f / %.1f MB/s" % (statistics.median(v), max(v)) if v else "n/a"

    print("\nvsock line echo, %d MiB each way per run, %d interleaved runs (median / best); "
          "ratio = moat / QEMU, > 1 means moat is faster" % (a.mib, a.runs))
    print("%-28s %22s %22s %8s" % ("metric", "moat hybrid vsock", "QEMU vhost-vsock", "ratio"))
    ratio = "%.2fx" % (statistics.median(res["moat"]) / statistics.median(res["qemu"])) if res["qemu"] else "n/a"
    print("%-28s %22s %22s %8s" % ("echo throughput, each way", fmt(res["moat"]), fmt(res["qemu"]), ratio))


if __name__ == "__main__":
    main()
