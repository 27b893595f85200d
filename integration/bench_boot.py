#!/usr/bin/env python3
"""Boot benchmark: moat-vmm versus QEMU's microvm machine, same kernel, same
initramfs, same command line, same host, runs interleaved.

For each VMM and run it measures, from the VMM's exec to the agent's ready line on
the serial console:
  - wall time to the ready line (and, for moat, the VMM's own boot-timer figure,
    taken when the agent writes the control port);
  - KVM exits up to that point, from the VM's debugfs statistics (all exits, handled
    in the kernel or in the VMM), where debugfs is mounted;
  - resident memory of the VMM process beyond the guest RAM it has touched.
Figures only, never pass/fail: absolute times inside an emulated test host mean
little, so compare the two columns and the ratio, measured in the same run.

usage: bench_boot.py [--runs N] [--vcpus N] [--memory MIB]
"""
import argparse
import glob
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import time

PREFIX = os.environ.get("MOAT_PREFIX", "/usr/local")
SHARE = os.path.join(PREFIX, "share/moat")
READY = b"moat-agent: ready"
TIMEOUT = 120


def default_cmdline(vmm):
    return subprocess.run([vmm, "--print-default-cmdline"], check=True, capture_output=True, text=True).stdout.strip()


def kvm_exits(pid):
    """Sum of the 'exits' statistic of the VMs owned by pid, or None."""
    total = None
    for d in glob.glob(f"/sys/kernel/debug/kvm/{pid}-*"):
        try:
            with open(os.path.join(d, "exits")) as f:
                total = (total or 0) + int(f.read().strip())
        except OSError:
            pass
    return total


def memory(pid, guest_bytes):
    """(total RSS, RSS of the guest RAM mapping) in KiB. The guest RAM mapping is the
    largest mapping at least as large as the guest's memory."""
    rss_total = 0
    guest_rss = 0
    size = 0
    best = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                a, b = line.split()[0].split("-")
                size = int(b, 16) - int(a, 16)
            elif line.startswith("Rss:"):
                kib = int(line.split()[1])
                rss_total += kib
                if size >= guest_bytes and size >= best:
                    best = size
                    guest_rss = kib
    return rss_total, guest_rss


def one_run(name, argv, guest_bytes):
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    ready_at = None
    try:
        while ready_at is None:
            if time.monotonic() - t0 > TIMEOUT:
                raise RuntimeError(f"{name}: no ready line within {TIMEOUT} s; console: {seen[-500:]!r}")
            r, _, _ = select.select([p.stdout], [], [], 1.0)
            if r:
                chunk = os.read(p.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"{name}: exited before ready: {seen[-500:]!r} {p.stderr.read()[-500:]!r}")
                seen += chunk
                if READY in seen:
                    ready_at = time.monotonic() - t0
        exits = kvm_exits(p.pid)
        rss, guest = memory(p.pid, guest_bytes)
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            _, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
    timer = None
    m = re.search(rb"guest ready ([0-9.]+) ms after VMM start", err or b"")
    if m:
        timer = float(m.group(1))
    return {"ready_ms": ready_at * 1000, "timer_ms": timer, "exits": exits, "rss_kib": rss, "overhead_kib": rss - guest}


def fmt(values, unit, digits=1):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{statistics.median(values):.{digits}f} / {min(values):.{digits}f} {unit}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", "5")))
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--memory", type=int, default=128)
    a = ap.parse_args()

    vmm = os.path.join(PREFIX, "bin/moat-vmm")
    kernel = os.path.join(SHARE, "vmlinux")
    initrd = os.path.join(SHARE, "initramfs.cpio.gz")
    cmdline = default_cmdline(vmm)
    guest_bytes = a.memory << 20
    moat = [vmm, "--kernel", kernel, "--initrd", initrd, "--vcpus", str(a.vcpus), "--memory", str(a.memory),
            "--cmdline", cmdline]
    qemu = ["qemu-system-x86_64", "-enable-kvm", "-M", "microvm,acpi=off,rtc=off", "-cpu", "host",
            "-smp", str(a.vcpus), "-m", str(a.memory), "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"]
    have_qemu = subprocess.run(["sh", "-c", "command -v qemu-system-x86_64"], capture_output=True).returncode == 0
    if not have_qemu:
        print("bench-boot: *** qemu-system-x86_64 not found: QEMU column will be empty ***", file=sys.stderr)
    if not os.path.isdir("/sys/kernel/debug/kvm"):
        print("bench-boot: debugfs not mounted: KVM exit counts unavailable", file=sys.stderr)

    results = {"moat": [], "qemu": []}
    for i in range(a.runs):
        for name, argv in (("moat", moat), ("qemu", qemu)):
            if name == "qemu" and not have_qemu:
                continue
            for attempt in (1, 2):
                try:
                    results[name].append(one_run(name, argv, guest_bytes))
                    break
                except RuntimeError as e:
                    # Nested guests under emulation occasionally freeze; retry once, loudly.
                    print(f"bench-boot: run {i + 1} {name} attempt {attempt} failed: {e}", file=sys.stderr)
            else:
                sys.exit(f"bench-boot: {name} failed twice")

    def col(name, key):
        return [r[key] for r in results[name]]

    def ratio(key):
        m = [v for v in col("moat", key) if v is not None]
        q = [v for v in col("qemu", key) if v is not None]
        if not m or not q or statistics.median(m) == 0:
            return "n/a"
        return f"{statistics.median(q) / statistics.median(m):.2f}x"

    print(f"\nboot to agent ready: {a.vcpus} vCPU, {a.memory} MiB, {a.runs} interleaved runs each "
          f"(median / min); ratio = QEMU / moat, > 1 means moat is better")
    rows = [
        ("exec to ready line (console)", "ready_ms", "ms", 1),
        ("KVM exits to ready", "exits", "", 0),
        ("VMM RSS beyond guest RAM", "overhead_kib", "KiB", 0),
        ("VMM RSS total", "rss_kib", "KiB", 0),
    ]
    print(f"{'metric':34} {'moat-vmm':>22} {'QEMU microvm':>22} {'ratio':>8}")
    for label, key, unit, digits in rows:
        print(f"{label:34} {fmt(col('moat', key), unit, digits):>22} {fmt(col('qemu', key), unit, digits):>22} {ratio(key):>8}")
    print(f"{'moat boot timer (control port)':34} {fmt(col('moat', 'timer_ms'), 'ms'):>22}")


if __name__ == "__main__":
    main()
