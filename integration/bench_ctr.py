#!/usr/bin/env python3
"""containerd benchmark: the moat runtime (io.containerd.moat.v2) against runc
(io.containerd.runc.v2) in the same private containerd, in the same host.

  1. start latency: `ctr run --rm IMAGE NAME true`, wall time from ctr's exec to its
     exit, runs interleaved moat / runc; for moat also the shim's own boot figure
     (VMM spawned to agent connected), from its log line in containerd's log;
  2. host memory per idle running container: K detached `sleep 100000` per runtime,
     then, after they settle, the PSS (/proc/PID/smaps_rollup) of every host process
     of each: the shim and all its descendants (moat: moat-vmm and virtiofsd; runc:
     the container's processes). For moat the PSS of the guest RAM mappings (the
     "moat-guest-ram" memfd, in the VMM and in virtiofsd) is split out: "beyond guest
     RAM" is what the pod costs the host besides the memory its guest actually touched.
     PSS counts user memory only, not kernel memory (KVM's page tables, vCPU state).
Figures only, never pass/fail; the script fails only if a step fails or something it
started is left behind. Absolute times inside the emulated test host mean little:
compare the columns and ratios of one run.

Needs root, containerd (1.6 in /usr/bin; 2.x in /opt/containerd2/bin with
--containerd 2), containerd-shim-moat-v2 on PATH (`make install`) and
build/images/busybox.tar (`make images`). Run it as `make bench-ctr`.
"""
import argparse
import glob
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_TAR = os.path.join(REPO, "build/images/busybox.tar")
IMAGE = "docker.io/moat-test/busybox:latest"
NAMESPACE = "bench-ctr"
RUNTIMES = {"moat": "io.containerd.moat.v2", "runc": "io.containerd.runc.v2"}
# containerd versions: (binary, ctr, directory put first on its PATH, config version).
CONTAINERD = {
    "1.6": ("/usr/bin/containerd", "/usr/bin/ctr", None, 2),
    "2": ("/opt/containerd2/bin/containerd", "/opt/containerd2/bin/ctr", "/opt/containerd2/bin", 3),
}
CTR_TIMEOUT = 300  # s, any one ctr call (a VM boot in the emulated host can take a while)
MOAT_CONFIG = os.environ.get("MOAT_CONFIG", "/etc/moat/config.toml")
GUEST_RAM = "moat-guest-ram"  # the memfd name vmm/src/vstate/memory.rs gives guest RAM
KIB_PER_MIB = 1024


class BenchError(Exception):
    pass


def run(argv, timeout, **kw):
    """Runs argv with a timeout; returns the CompletedProcess, raises BenchError on a
    timeout or a non-zero exit (with its stderr)."""
    try:
        p = subprocess.run(argv, timeout=timeout, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kw)
    except subprocess.TimeoutExpired:
        raise BenchError(f"`{' '.join(argv)}` did not finish within {timeout} s") from None
    if p.returncode != 0:
        raise BenchError(f"`{' '.join(argv)}` exited {p.returncode}: {(p.stderr or p.stdout).strip()[-800:]}")
    return p


class Containerd:
    """A private containerd (own root, state, socket) and the ctr that talks to it."""

    def __init__(self, version, tmp):
        self.version = version
        self.bin, self.ctr_bin, self.path_first, cfg_version = CONTAINERD[version]
        self.dir = os.path.join(tmp, f"containerd-{version}")
        self.sock = os.path.join(self.dir, "containerd.sock")
        self.log = os.path.join(self.dir, "containerd.log")
        self.proc = None
        os.makedirs(self.dir)
        if cfg_version == 2:
            cfg = f'version = 2\nroot = "{self.dir}/root"\nstate = "{self.dir}/state"\n[grpc]\n  address = "{self.sock}"\n'
        else:
            # NRI off: else 2.x takes the host-wide /var/run/nri/nri.sock.
            cfg = (f"version = 3\nroot = '{self.dir}/root'\nstate = '{self.dir}/state'\n[grpc]\n  address = '{self.sock}'\n"
                   "[plugins.'io.containerd.nri.v1.nri']\n  disable = true\n")
        with open(os.path.join(self.dir, "config.toml"), "w") as f:
            f.write(cfg)

    def start(self):
        env = dict(os.environ)
        if self.path_first:
            # containerd finds containerd-shim-*-v2 through PATH: 2.x must get its own runc shim.
            env["PATH"] = self.path_first + ":" + env.get("PATH", "")
        with open(self.log, "w") as log:
            # A session of its own: a Ctrl-C must reach us, not containerd, so that we
            # can still delete the tasks through it.
            self.proc = subprocess.Popen([self.bin, "--config", os.path.join(self.dir, "config.toml")], env=env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"containerd {self.version} did not come up:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, n=15):
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def ctr(self, *args, timeout=CTR_TIMEOUT):
        return run([self.ctr_bin, "--address", self.sock, "--namespace", NAMESPACE, *args], timeout)

    def version_line(self):
        return run([self.bin, "--version"], 30).stdout.strip()

    def tasks(self):
        """{container id: (pid, status)} from `ctr task ls`."""
        out = {}
        for line in self.ctr("task", "ls").stdout.splitlines()[1:]:
            f = line.split()
            if len(f) >= 3 and f[1].isdigit():
                out[f[0]] = (int(f[1]), f[2])
        return out

    def remove_all(self):
        """Deletes every task and container of our namespace; returns what failed."""
        errors = []
        try:
            names = self.ctr("container", "ls", "-q", timeout=60).stdout.split()
        except BenchError as e:
            return [str(e)]
        for name in names:
            try:
                self.ctr("task", "delete", "-f", name, timeout=120)
            except BenchError as e:
                if "not found" not in str(e):
                    errors.append(str(e))
            try:
                self.ctr("container", "rm", name, timeout=60)
            except BenchError as e:
                errors.append(str(e))
        return errors

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


# ---------------------------------------------------------------------- /proc

def stat_fields(pid):
    """The fields of /proc/PID/stat after the command name (field 3 first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()


def ppid(pid):
    f = stat_fields(pid)
    return int(f[1]) if f else None


def identity(pid):
    """(pid, start time): a pid number alone is reused once its process is gone."""
    f = stat_fields(pid)
    return (pid, int(f[19])) if f else None


def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def descendants(root):
    """root and every live process below it."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            p = ppid(int(d))
            if p is not None:
                children.setdefault(p, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def pss_kib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise BenchError(f"no Pss line in /proc/{pid}/smaps_rollup")


def guest_ram_kib(pid):
    """(PSS, size) in KiB of pid's mappings of the guest RAM memfd."""
    pss = size = 0
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$", line)
            if m:
                inside = GUEST_RAM in m.group(3)
                if inside:
                    size += (int(m.group(2), 16) - int(m.group(1), 16)) >> 10
            elif inside and line.startswith("Pss:"):
                pss += int(line.split()[1])
    return pss, size


def pod_memory(task_pid):
    """The host memory of one container: its shim (the parent of the task's pid, the
    VMM for moat, the init process for runc) and all the shim's descendants."""
    shim = ppid(task_pid)
    if shim is None or not comm(shim).startswith("containerd-shim"):
        raise BenchError(f"the parent of task pid {task_pid} is {shim} ({comm(shim)}), not a containerd shim")
    parts = {"shim": 0, "moat-vmm": 0, "virtiofsd": 0, "container": 0}
    guest_pss = guest_size = 0
    pids = descendants(shim)
    for pid in pids:
        name = comm(pid)
        key = ("shim" if name.startswith("containerd-shim") else name if name in ("moat-vmm", "virtiofsd")
               else "container")
        try:
            parts[key] += pss_kib(pid)
            if name in ("moat-vmm", "virtiofsd"):
                p, s = guest_ram_kib(pid)
                guest_pss += p
                guest_size = max(guest_size, s)
        except (FileNotFoundError, ProcessLookupError):
            pass  # exited since the listing: it holds no memory any more
    total = sum(parts.values())
    return {**parts, "total": total, "guest_ram": guest_pss, "beyond": total - guest_pss,
            "guest_size": guest_size, "procs": [i for i in map(identity, pids) if i], "nprocs": len(pids)}


# ---------------------------------------------------------------------- phases

def parse_duration_ms(text):
    m = re.fullmatch(r"([0-9.]+)(ns|µs|us|ms|s)", text)
    if not m:
        return None
    scale = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1000.0}[m.group(2)]
    return float(m.group(1)) * scale


def shim_boot_ms(ctrd, names):
    """The shim's 'agent ... after D' figure for each of the named pods, from the
    shim log lines containerd copies into its own log."""
    out = []
    try:
        with open(ctrd.log, errors="replace") as f:
            text = f.read()
    except OSError:
        return out
    for name, dur in re.findall(r"sandbox (\S+): agent .* after ([0-9.]+(?:ns|µs|us|ms|s))", text):
        if name in names:
            ms = parse_duration_ms(dur)
            if ms is not None:
                out.append(ms)
    return out


def latency(ctrd, runs):
    times = {"moat": [], "runc": []}
    names = []
    # Warm the page cache (image layers, guest kernel and initramfs) once, untimed.
    for rt, runtime in RUNTIMES.items():
        ctrd.ctr("run", "--rm", "--runtime", runtime, IMAGE, f"warm-{rt}", "true")
    for i in range(runs):
        for rt, runtime in RUNTIMES.items():
            name = f"lat-{rt}-{i}"
            t = time.monotonic()
            ctrd.ctr("run", "--rm", "--runtime", runtime, IMAGE, name, "true")
            times[rt].append((time.monotonic() - t) * 1000)
            if rt == "moat":
                names.append(name)
        print(f"bench-ctr: latency run {i + 1}/{runs} done", file=sys.stderr)
    return times, shim_boot_ms(ctrd, set(names))


def idle_memory(ctrd, k, settle):
    names = {"moat": [], "runc": []}
    for i in range(k):
        for rt, runtime in RUNTIMES.items():
            name = f"idle-{rt}-{i}"
            ctrd.ctr("run", "-d", "--runtime", runtime, IMAGE, name, "sleep", "100000")
            names[rt].append(name)
    print(f"bench-ctr: {k} idle containers per runtime started; settling {settle} s", file=sys.stderr)
    time.sleep(settle)
    tasks = ctrd.tasks()
    result = {"moat": [], "runc": []}
    for rt, ns in names.items():
        for name in ns:
            pid, status = tasks.get(name, (None, "missing"))
            if status != "RUNNING":
                raise BenchError(f"idle container {name} is {status}, not RUNNING")
            result[rt].append(pod_memory(pid))
    return result


# ---------------------------------------------------------------------- output

def med_min(xs, digits=0):
    if not xs:
        return "n/a"
    return f"{statistics.median(xs):.{digits}f} / {min(xs):.{digits}f}"


def mib(kib):
    return f"{kib / KIB_PER_MIB:.1f}"


def report(version_line, runs, times, boot, mem, k, settle):
    med = statistics.median
    print(f"\n{version_line}; {runs} interleaved runs each (median / min)")
    print(f"{'start latency':44}{'moat':>18}{'runc':>18}{'moat/runc':>11}")
    print(f"{'`ctr run --rm IMAGE NAME true` (ms)':44}{med_min(times['moat']):>18}{med_min(times['runc']):>18}"
          f"{med(times['moat']) / med(times['runc']):>10.2f}x")
    print(f"{'  of which VMM spawn to agent up (shim log)':44}{med_min(boot):>18}")

    print(f"\nhost memory per idle container (`sleep 100000`), {k} per runtime, {settle} s after start;"
          f" PSS in MiB, median over the {k}")
    m, r = mem["moat"], mem["runc"]

    def col(rows, key):
        if not rows:
            return "n/a"
        return mib(med([x[key] for x in rows])) if any(x[key] for x in rows) else "-"

    guest_size = max((x["guest_size"] for x in m), default=0)
    lines = [
        ("containerd shim", col(m, "shim"), col(r, "shim")),
        ("moat-vmm (with the guest RAM it maps)", col(m, "moat-vmm"), col(r, "moat-vmm")),
        ("virtiofsd", col(m, "virtiofsd"), col(r, "virtiofsd")),
        ("other processes (runc: the container's)", col(m, "container"), col(r, "container")),
        ("total", col(m, "total"), col(r, "total")),
        (f"  of which guest RAM touched (of {guest_size >> 10} MiB)", col(m, "guest_ram"), col(r, "guest_ram")),
        ("total beyond guest RAM (goal < 30 MiB)", col(m, "beyond"), col(r, "beyond")),
    ]
    print(f"{'':44}{'moat':>18}{'runc':>18}")
    for label, a, b in lines:
        print(f"{label:44}{a:>18}{b:>18}")
    for rt in ("moat", "runc"):
        per = ", ".join(f"{mib(x['total'])} ({x['nprocs']} procs)" for x in mem[rt])
        print(f"  {rt} per container total: {per}")
    print("  Kata Containers measures about 125 MB per pod beyond guest RAM; PSS leaves out kernel memory.")
    sys.stdout.flush()  # before the next containerd's progress lines on stderr


# ---------------------------------------------------------------------- main

def leftovers(idents):
    """The processes of idents still alive (zombies count as gone)."""
    return [i[0] for i in idents if identity(i[0]) == i and stat_fields(i[0])[0] not in ("Z", "X")]


def moat_state_dir():
    """The shim's state_dir (config/src/host.rs: /run/moat unless the config says)."""
    try:
        import tomllib
        with open(MOAT_CONFIG, "rb") as f:
            return tomllib.load(f).get("state_dir", "/run/moat")
    except (ImportError, OSError, ValueError):
        return "/run/moat"


def diagnose():
    """What moat's state dirs say (the shim removes them when all goes well)."""
    for path in sorted(glob.glob(os.path.join(moat_state_dir(), "*", "*.log"))):
        try:
            with open(path, errors="replace") as f:
                tail = f.readlines()[-8:]
        except OSError:
            continue
        if tail:
            print(f"bench-ctr: {path}:\n  " + "  ".join(tail), file=sys.stderr)


def bench(version, a, tmp):
    ctrd = Containerd(version, tmp)
    pod_pids = []
    # Every moat pod this run may have made (see latency and idle_memory).
    moat_names = ["warm-moat"] + [f"lat-moat-{i}" for i in range(a.runs)] + [f"idle-moat-{i}" for i in range(a.idle)]
    failed = False
    try:
        ctrd.start()
        version_line = ctrd.version_line()
        print(f"bench-ctr: {version_line}; importing {IMAGE_TAR}", file=sys.stderr)
        ctrd.ctr("image", "import", IMAGE_TAR)
        times, boot = latency(ctrd, a.runs)
        mem = idle_memory(ctrd, a.idle, a.settle)
        pod_pids = [i for rt in mem.values() for x in rt for i in x["procs"]]
        report(version_line, a.runs, times, boot, mem, a.idle, a.settle)
    except BaseException:
        failed = True
        print(f"bench-ctr: containerd {version} log, last lines:\n{ctrd.log_tail()}", file=sys.stderr)
        diagnose()
        raise
    finally:
        # No signal may cut the clean-up short; every step in it has a timeout.
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            errors = ctrd.remove_all() if ctrd.proc and ctrd.proc.poll() is None else []
            ctrd.stop()
            state = moat_state_dir()
            dirs = [os.path.join(state, n) for n in moat_names]
            left, left_dirs = [], []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                left = leftovers(pod_pids)
                left_dirs = [d for d in dirs if os.path.exists(d)]
                if not left and not left_dirs:
                    break
                time.sleep(0.5)
            errors += [f"left behind after delete: state dir {d}" for d in left_dirs]
            print(f"bench-ctr: clean-up: {len(pod_pids) - len(left)} of {len(pod_pids)} processes of the idle pods gone, "
                  f"{len(dirs) - len(left_dirs)} of {len(dirs)} moat state dirs gone", file=sys.stderr)
            for p in left:
                errors.append(f"left behind after delete: pid {p} ({comm(p)}); killing it")
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if errors:
            msg = "clean-up problems:\n  " + "\n  ".join(errors)
            if failed:
                print(msg, file=sys.stderr)
            else:
                raise BenchError(msg)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="timed `ctr run --rm` per runtime (default 5)")
    ap.add_argument("--idle", type=int, default=3, help="idle containers per runtime for memory (default 3)")
    ap.add_argument("--settle", type=float, default=5, help="seconds to let idle containers settle (default 5)")
    ap.add_argument("--containerd", choices=("1.6", "2", "both"), default="1.6",
                    help="which containerd to run under (default 1.6)")
    a = ap.parse_args()
    if a.runs < 1 or a.idle < 1 or a.settle < 0:
        ap.error("--runs and --idle must be at least 1, --settle not negative")
    versions = ["1.6", "2"] if a.containerd == "both" else [a.containerd]
    if os.geteuid() != 0:
        sys.exit("bench-ctr: needs root (containerd, /proc/PID/smaps of other users); run it as `make bench-ctr`")
    if not os.path.exists(IMAGE_TAR):
        sys.exit(f"bench-ctr: {IMAGE_TAR} is missing: run `make images`")
    if not shutil.which("containerd-shim-moat-v2"):
        sys.exit("bench-ctr: containerd-shim-moat-v2 is not on PATH: `make install` (the test host does it)")
    for v in versions:
        if not os.access(CONTAINERD[v][0], os.X_OK):
            sys.exit(f"bench-ctr: {CONTAINERD[v][0]} not found (containerd {v})")

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    tmp = tempfile.mkdtemp(prefix="bench-ctr.", dir="/var/tmp")
    try:
        for v in versions:
            bench(v, a, tmp)
    except BenchError as e:
        sys.exit(f"bench-ctr: {e}")
    except KeyboardInterrupt:
        sys.exit("bench-ctr: interrupted; cleaned up")
    finally:
        # --one-file-system: never descend into a mount containerd may have left.
        subprocess.run(["rm", "-rf", "--one-file-system", tmp], timeout=120, check=False)


if __name__ == "__main__":
    main()
