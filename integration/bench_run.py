#!/usr/bin/env python3
"""`moat run` benchmark, against runc in the same host, runs interleaved.

  1. end to end: `moat run IMAGE true` versus `runc run` of the same rootfs (bundle
     made here from `runc spec`), wall time from exec to exit;
  2. stdout throughput: the workload writes N MiB of zeros to stdout; MB/s as the host
     reader sees it, from the first byte to EOF, moat and runc;
  3. small files on the shared directory: the workload creates F files of 1 KiB in a
     host directory bind-mounted in (virtio-fs for moat, a plain bind for runc), then
     reads them back; files per second, timed inside the workload (/proc/uptime).
Figures only, never pass/fail. Absolute times inside the emulated test host mean
little; compare the columns and ratios of one run.

usage: bench_run.py [--runs N] [--mib N] [--files N]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(REPO, "build/images/busybox-oci")
ROOTFS = os.path.join(REPO, "build/images/busybox-rootfs")
MOAT = shutil.which("moat") or os.path.join(REPO, "build/bin/moat")

SMALL_FILES = ("read a b < /proc/uptime; i=0; while [ $i -lt {n} ]; do echo {line} > /data/f$i; i=$((i+1)); done; "
               "read c d < /proc/uptime; i=0; while [ $i -lt {n} ]; do read x < /data/f$i; i=$((i+1)); done; "
               "read e f < /proc/uptime; echo \"$a $c $e\"")


class Runc:
    """A runc bundle over a copy of the test rootfs; one container at a time."""

    def __init__(self, tmp):
        self.dir = os.path.join(tmp, "bundle")
        os.makedirs(self.dir)
        shutil.copytree(ROOTFS, os.path.join(self.dir, "rootfs"), symlinks=True)
        subprocess.run(["runc", "spec"], cwd=self.dir, check=True)
        with open(os.path.join(self.dir, "config.json")) as f:
            self.spec = json.load(f)
        self.spec["process"]["terminal"] = False
        self.n = 0

    def cmd(self, args, volume=None):
        spec = json.loads(json.dumps(self.spec))
        spec["process"]["args"] = args
        if volume:
            spec["mounts"].append({"destination": "/data", "type": "bind", "source": volume, "options": ["rbind", "rw"]})
        with open(os.path.join(self.dir, "config.json"), "w") as f:
            json.dump(spec, f)
        self.n += 1
        return ["runc", "run", "--bundle", self.dir, f"bench-{os.getpid()}-{self.n}"]


def moat_cmd(args, volume=None):
    vol = ["-v", f"{volume}:/data"] if volume else []
    return [MOAT, "run", *vol, IMAGE, "--", *args]


def wall(cmd):
    t = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t


def stdout_rate(cmd, mib):
    """MB/s from the first byte of stdout to EOF; checks the byte count."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first, total = None, 0
    while True:
        chunk = p.stdout.read1(1 << 20)
        if not chunk:
            break
        if first is None:
            first = time.monotonic()
        total += len(chunk)
    end = time.monotonic()
    p.wait()
    if p.returncode != 0 or total != mib << 20:
        raise SystemExit(f"{cmd[0]}: exit {p.returncode}, {total} bytes of {mib << 20}")
    return total / 1e6 / max(end - first, 1e-6)


def small_files(cmd_for, n, tmp):
    vol = tempfile.mkdtemp(dir=tmp)
    script = SMALL_FILES.format(n=n, line="x" * 1023)
    out = subprocess.run(cmd_for(["sh", "-c", script], vol), check=True, capture_output=True, text=True).stdout
    a, c, e = (float(x) for x in out.split())
    shutil.rmtree(vol)
    return n / max(c - a, 0.01), n / max(e - c, 0.01)


def fmt(xs):
    return f"{statistics.median(xs):9.1f} (min {min(xs):.1f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--files", type=int, default=300)
    a = ap.parse_args()
    for p in (IMAGE, ROOTFS):
        if not os.path.exists(p):
            raise SystemExit(f"{p} is missing: run `make images`")
    with tempfile.TemporaryDirectory() as tmp:
        runc = Runc(tmp)
        runc_cmd = runc.cmd
        start = {"moat": [], "runc": []}
        rate = {"moat": [], "runc": []}
        create = {"moat": [], "runc": []}
        read = {"moat": [], "runc": []}
        # Warm the image cache and the page cache once, untimed.
        wall(moat_cmd(["true"]))
        for i in range(a.runs):
            for name, cmd_for in (("moat", moat_cmd), ("runc", runc_cmd)):
                start[name].append(wall(cmd_for(["true"])) * 1000)
                rate[name].append(stdout_rate(cmd_for(["head", "-c", str(a.mib << 20), "/dev/zero"]), a.mib))
                c, r = small_files(cmd_for, a.files, tmp)
                create[name].append(c)
                read[name].append(r)
            print(f"run {i + 1}/{a.runs} done", file=sys.stderr)
    med = statistics.median
    print(f"\nmoat run vs runc run, same rootfs, same host, {a.runs} interleaved runs (median, min)")
    print(f"{'':34}{'moat':>22}{'runc':>22}{'moat/runc':>11}")
    rows = [("`run IMAGE true` end to end (ms)", start), (f"stdout, {a.mib} MiB of zeros (MB/s)", rate),
            (f"create {a.files} x 1 KiB files (files/s)", create), (f"read them back (files/s)", read)]
    for label, d in rows:
        print(f"{label:34}{fmt(d['moat']):>22}{fmt(d['runc']):>22}{med(d['moat']) / med(d['runc']):>10.2f}x")
    print("\nmoat's shared directory is virtio-fs (virtiofsd); runc's is a bind mount of the same host directory.")


if __name__ == "__main__":
    main()
