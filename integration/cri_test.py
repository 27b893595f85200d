#!/usr/bin/env python3
"""containerd-shim-moat-v2 under Kubernetes' CRI, end to end: a CRI v1 client (gRPC,
like the kubelet) drives containerd's CRI plugin, which runs a pod with the runtime
handler `moat`, in the test host (real KVM; `make test-kvm` runs it through
integration/tests/cri.rs, one test host per containerd version).

    make build guest images
    integration/testhost run -- python3 integration/cri_test.py 1.6|2

containerd 1.6 is bookworm's (/usr/bin, config version 2), 2.x sid's
(/opt/containerd2/bin, config version 3, NRI off); see integration/testhost. Each run
starts a private containerd with the CRI runtimes `runc` (default) and `moat`, its
sandbox ("pause") image imported from build/images/pause.tar (there is no registry),
and the busybox test image. The pod uses the host network (no CNI needed).

The scenario: one pod with two containers must share one shim and one VM; a
container's CRI log file shows the guest kernel; ExecSync gives output and exit
codes; ContainerStatus the exit code of a finished container; stats are printed;
StopPodSandbox + RemovePodSandbox leave no VMM, fs backend, shim, state dir or
mount. A pod with a bad io.moat.* annotation fails naming it and leaves nothing.

The client speaks the trimmed CRI v1 API in integration/cri/api.proto, compiled with
protoc at test time. Prints each step and "ok"/"FAIL"; exits 1 if a step failed.
Needs root, python3-grpcio, python3-protobuf and protoc (all in the test host).

Findings:
- containerd's CRI passes a pod's annotations to the runtime only if the runtime's
  `pod_annotations` lists them: moat's entry needs pod_annotations = ["io.moat.*"],
  else io.moat.* pod annotations are silently dropped.
"""
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUSYBOX_TAR = os.path.join(REPO, "build/images/busybox.tar")
PAUSE_TAR = os.path.join(REPO, "build/images/pause.tar")
BUSYBOX = "docker.io/moat-test/busybox:latest"
PAUSE = "docker.io/moat-test/pause:latest"
PROTO_DIR = os.path.join(REPO, "integration/cri")
CRI_NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin works in
STATE_DIR = "/run/moat"  # moat's default state_dir (config/src/host.rs)
C2 = "/opt/containerd2/bin"
RPC_TIMEOUT = 300  # s: a pod start boots a VM, slow in the emulated test host
CONTAINERD = {
    # version: (containerd, ctr, directory first on its PATH)
    "1.6": ("/usr/bin/containerd", "/usr/bin/ctr", None),
    "2": (C2 + "/containerd", C2 + "/ctr", C2),
}


class StepFailed(Exception):
    pass


def config_toml(version, d):
    """containerd's config: private root, state and socket; CRI runtimes runc
    (default) and moat; our pause image as the sandbox image."""
    sock = os.path.join(d, "containerd.sock")
    if version == "1.6":
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        return f'''version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{sock}"
[{cri}]
  sandbox_image = "{PAUSE}"
  restrict_oom_score_adj = true
[{cri}.containerd]
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.moat]
  runtime_type = "io.containerd.moat.v2"
  pod_annotations = ["io.moat.*"]
'''
    rt = "plugins.'io.containerd.cri.v1.runtime'"
    return f'''version = 3
root = '{d}/root'
state = '{d}/state'
[grpc]
  address = '{sock}'
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = '{PAUSE}'
[{rt}]
  restrict_oom_score_adj = true
[{rt}.containerd]
  default_runtime_name = 'runc'
[{rt}.containerd.runtimes.runc]
  runtime_type = 'io.containerd.runc.v2'
[{rt}.containerd.runtimes.moat]
  runtime_type = 'io.containerd.moat.v2'
  pod_annotations = ['io.moat.*']
[plugins.'io.containerd.nri.v1.nri']
  disable = true
'''


def compile_proto(out):
    """protoc's Python for api.proto in `out`; returns the imported module."""
    os.makedirs(out)
    subprocess.run(["protoc", f"--proto_path={PROTO_DIR}", f"--python_out={out}", os.path.join(PROTO_DIR, "api.proto")],
                   check=True)
    sys.path.insert(0, out)
    import api_pb2  # noqa: E402 (generated just now)
    return api_pb2


class Cri:
    """The CRI v1 RuntimeService and ImageService of one containerd socket."""

    def __init__(self, grpc, pb, sock):
        self.grpc, self.pb = grpc, pb
        self.channel = grpc.insecure_channel("unix://" + sock)

    def call(self, service, rpc, request, timeout=RPC_TIMEOUT):
        response = getattr(self.pb, rpc + "Response")
        method = self.channel.unary_unary(f"/runtime.v1.{service}/{rpc}", request_serializer=type(request).SerializeToString,
                                          response_deserializer=response.FromString)
        return method(request, timeout=timeout)

    def rt(self, rpc, timeout=RPC_TIMEOUT, **fields):
        return self.call("RuntimeService", rpc, getattr(self.pb, rpc + "Request")(**fields), timeout)

    def img(self, rpc, timeout=RPC_TIMEOUT, **fields):
        return self.call("ImageService", rpc, getattr(self.pb, rpc + "Request")(**fields), timeout)


def proc_cmdlines():
    """{pid: argv} of every process."""
    out = {}
    for p in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(p, "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if argv:
            out[int(p.split("/")[2])] = argv
    return out


def moat_processes():
    """{kind: [pid...]} of moat's host processes: the VMM, the fs backend and serving
    shims (a shim's `start`/`delete` runs are short-lived and not counted)."""
    kinds = {"moat-vmm": [], "virtiofsd": [], "shim": []}
    for pid, argv in proc_cmdlines().items():
        exe = os.path.basename(argv[0])
        if exe == "moat-vmm":
            kinds["moat-vmm"].append(pid)
        elif exe == "virtiofsd":
            kinds["virtiofsd"].append(pid)
        elif exe == "containerd-shim-moat-v2" and "-socket" in argv:
            kinds["shim"].append(pid)
    return kinds


def moat_leftovers():
    """What of moat is still on the host: processes, state dirs, mounts."""
    left = [f"{k} {pids}" for k, pids in moat_processes().items() if pids]
    if os.path.isdir(STATE_DIR) and os.listdir(STATE_DIR):
        left.append(f"state dirs {sorted(os.listdir(STATE_DIR))}")
    with open("/proc/self/mountinfo") as f:
        left += ["mount " + line.split()[4] for line in f if STATE_DIR in line.split()[4]]
    return left


def wait_nothing_left(seconds=30):
    deadline = time.monotonic() + seconds
    while True:
        left = moat_leftovers()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def read_cri_log(path):
    """[(stream, text)] of a CRI log file (`<RFC3339 time> <stream> <P|F> <text>`)."""
    if not os.path.exists(path):
        return []
    entries = []
    with open(path, errors="replace") as f:
        for line in f.read().splitlines():
            parts = line.split(" ", 3)
            if len(parts) < 3 or parts[1] not in ("stdout", "stderr") or parts[2] not in ("P", "F"):
                raise StepFailed(f"{path}: not a CRI log line: {line!r}")
            entries.append((parts[1], parts[3] if len(parts) == 4 else ""))
    return entries


class Test:
    def __init__(self, version):
        self.version = version
        self.bin, self.ctr_bin, self.path_first = CONTAINERD[version]
        self.name = "containerd" + version
        self.work = tempfile.mkdtemp(prefix="cri-test.", dir="/var/tmp")
        self.dir = os.path.join(self.work, self.name)
        self.sock = os.path.join(self.dir, "containerd.sock")
        self.log = os.path.join(self.dir, "containerd.log")
        self.logs = os.path.join(self.work, "pod-logs")
        self.proc = None
        self.cri = None
        self.failures = []
        self.host_kernel = os.uname().release
        with open("/proc/sys/kernel/random/boot_id") as f:
            self.host_boot_id = f.read().strip()

    # ------------------------------------------------------------ plumbing
    def step(self, name, fn, *args):
        """Runs one step; prints its outcome; a failure is recorded and diagnosed.
        Returns fn's result (True if that is None), or None if it failed."""
        print(f"--- {self.name}: {name}", flush=True)
        try:
            result = fn(*args)
        except Exception as e:  # a failed step of any kind: report it, go on
            print(f"    | {type(e).__name__}: {describe(e)}")
            print(f"FAIL  {self.name}: {name}", flush=True)
            self.failures.append(name)
            self.diagnose()
            return None
        print(f"ok    {self.name}: {name}", flush=True)
        return True if result is None else result

    def diagnose(self):
        print(f"    moat processes: {moat_processes()}")
        for f in sorted(glob.glob(STATE_DIR + "/*/*.log")):
            print(f"    {f}:")
            with open(f, errors="replace") as fh:
                for line in fh.read().splitlines()[-8:]:
                    print(f"      {line}")
        for line in self.log_lines()[-25:]:
            print(f"    containerd: {line}")

    def log_lines(self, pattern=None):
        try:
            with open(self.log, errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return []
        return [l for l in lines if pattern is None or re.search(pattern, l)]

    def ctr(self, *args, timeout=300):
        p = subprocess.run([self.ctr_bin, "--address", self.sock, "--namespace", CRI_NAMESPACE, *args], capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise StepFailed(f"ctr {' '.join(args)} exited {p.returncode}: {p.stderr.strip()[-600:]}")
        return p.stdout

    # ------------------------------------------------------------ steps
    def start_containerd(self):
        os.makedirs(self.dir)
        os.makedirs(self.logs)
        cfg = os.path.join(self.dir, "config.toml")
        with open(cfg, "w") as f:
            f.write(config_toml(self.version, self.dir))
        env = dict(os.environ)
        if self.path_first:
            # containerd finds containerd-shim-*-v2 on its PATH: 2.x must get its own.
            env["PATH"] = self.path_first + ":" + env["PATH"]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([self.bin, "--config", cfg], env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise StepFailed(f"containerd did not come up: {self.log_lines()[-15:]}")
            time.sleep(0.1)
        print(f"    | {subprocess.run([self.bin, '--version'], capture_output=True, text=True).stdout.strip()}")

    def cri_version(self):
        # The CRI plugin may come up a moment after the socket.
        deadline = time.monotonic() + 60
        while True:
            try:
                v = self.cri.rt("Version", timeout=10, version="v1")
                break
            except self.grpc.RpcError as e:
                if time.monotonic() > deadline:
                    raise StepFailed(f"the CRI plugin does not answer: {describe(e)}") from None
                time.sleep(0.5)
        print(f"    | {v.runtime_name} {v.runtime_version}, CRI {v.runtime_api_version}")

    def import_images(self):
        for tar in (BUSYBOX_TAR, PAUSE_TAR):
            print("    | " + self.ctr("image", "import", tar).strip().replace("\n", "\n    | "))
        # The CRI plugin learns of imported images from containerd's events.
        deadline = time.monotonic() + 60
        for ref in (BUSYBOX, PAUSE):
            while not self.cri.img("ImageStatus", image=self.pb.ImageSpec(image=ref)).image.id:
                if time.monotonic() > deadline:
                    raise StepFailed(f"the CRI plugin does not see {ref} after `ctr image import`")
                time.sleep(0.5)
            print(f"    | CRI sees {ref}")

    def pod_config(self, name, annotations=None):
        pb = self.pb
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=name + "-uid", namespace="moat-test", attempt=0),
            log_directory=os.path.join(self.logs, name),
            annotations=annotations or {},
            linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
                # The host's network: no CNI needed. Pid and IPC per pod.
                namespace_options=pb.NamespaceOption(network=pb.NODE, pid=pb.POD, ipc=pb.POD))))

    def run_pod(self, config):
        os.makedirs(config.log_directory, exist_ok=True)
        t = time.monotonic()
        pod = self.cri.rt("RunPodSandbox", config=config, runtime_handler="moat").pod_sandbox_id
        print(f"    | pod {pod} ready in {time.monotonic() - t:.1f} s")
        st = self.cri.rt("PodSandboxStatus", pod_sandbox_id=pod).status
        if st.state != self.pb.SANDBOX_READY or st.runtime_handler != "moat":
            raise StepFailed(f"pod status: state {st.state}, runtime handler {st.runtime_handler!r}; want READY, moat")
        return pod

    def create_start(self, pod, config, name, command):
        pb = self.pb
        cfg = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=BUSYBOX), command=command,
                                 log_path=name + ".log")
        cid = self.cri.rt("CreateContainer", pod_sandbox_id=pod, config=cfg, sandbox_config=config).container_id
        self.cri.rt("StartContainer", container_id=cid)
        print(f"    | {name}: {cid}")
        return cid

    def wait_exited(self, cid, want_code):
        deadline = time.monotonic() + 120
        while True:
            st = self.cri.rt("ContainerStatus", container_id=cid).status
            if st.state == self.pb.CONTAINER_EXITED:
                break
            if time.monotonic() > deadline:
                raise StepFailed(f"container {cid} still in state {st.state} after 120 s")
            time.sleep(0.5)
        print(f"    | state EXITED, exit code {st.exit_code}, reason {st.reason!r}, log {st.log_path}")
        if st.exit_code != want_code:
            raise StepFailed(f"exit code {st.exit_code}, want {want_code}")
        return st

    def kernel_log(self, path):
        """The finished container's CRI log: its kernel and boot id, from the guest."""
        deadline = time.monotonic() + 30
        while True:
            entries = read_cri_log(path)
            out = dict(t.split("=", 1) for s, t in entries if s == "stdout" and "=" in t)
            if "kernel" in out and "boot" in out or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for s, t in entries:
            print(f"    | log: {s} {t}")
        if ("stderr", "to-stderr") not in entries:
            raise StepFailed("the log lacks the stderr line")
        if out.get("kernel") in (None, "", self.host_kernel):
            raise StepFailed(f"kernel in the log {out.get('kernel')!r}: must be the guest's, not the host's {self.host_kernel}")
        if out.get("boot") in (None, "", self.host_boot_id):
            raise StepFailed(f"boot id in the log {out.get('boot')!r}: must be the guest's")
        print(f"    | guest kernel {out['kernel']} (host {self.host_kernel})")
        return out

    def exec_sync(self, cid, cmd, want_code, want_stdout=None, want_stderr=None):
        r = self.cri.rt("ExecSync", container_id=cid, cmd=cmd, timeout=120)
        out, err = r.stdout.decode(errors="replace").strip(), r.stderr.decode(errors="replace").strip()
        print(f"    | exit {r.exit_code}, stdout {out!r}, stderr {err!r}")
        if r.exit_code != want_code:
            raise StepFailed(f"exit code {r.exit_code}, want {want_code}")
        if want_stdout is not None and out != want_stdout:
            raise StepFailed(f"stdout {out!r}, want {want_stdout!r}")
        if want_stderr is not None and err != want_stderr:
            raise StepFailed(f"stderr {err!r}, want {want_stderr!r}")
        return out

    def one_vm(self):
        # A shim's `start` run for the second container exits at once; let it go.
        deadline = time.monotonic() + 10
        while True:
            procs = moat_processes()
            if (len(procs["moat-vmm"]), len(procs["shim"])) == (1, 1) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        print(f"    | {procs}")
        for pid, argv in proc_cmdlines().items():
            if pid in procs["shim"]:
                print(f"    | shim: {' '.join(argv)}")
        if len(procs["moat-vmm"]) != 1 or len(procs["shim"]) != 1:
            raise StepFailed(f"{len(procs['moat-vmm'])} VMMs and {len(procs['shim'])} shims for one pod, want 1 and 1")

    def stats(self, pod, cid):
        s = self.cri.rt("ContainerStats", container_id=cid).stats
        print(f"    | ContainerStats: cpu {s.cpu.usage_core_nano_seconds.value} ns, memory working set "
              f"{s.memory.working_set_bytes.value} B, usage {s.memory.usage_bytes.value} B")
        ls = self.cri.rt("ListContainerStats", filter=self.pb.ContainerStatsFilter(pod_sandbox_id=pod)).stats
        for s in ls:
            print(f"    | ListContainerStats: {s.attributes.metadata.name}: cpu {s.cpu.usage_core_nano_seconds.value} ns, "
                  f"memory working set {s.memory.working_set_bytes.value} B")
        if not ls:
            print("    | ListContainerStats: empty")

    def remove_pod(self, pod):
        self.cri.rt("StopPodSandbox", pod_sandbox_id=pod)
        self.cri.rt("RemovePodSandbox", pod_sandbox_id=pod)
        items = self.cri.rt("ListPodSandbox").items
        if any(i.id == pod for i in items):
            raise StepFailed(f"pod {pod} still listed after RemovePodSandbox")

    def nothing_left(self):
        left = wait_nothing_left()
        if left:
            raise StepFailed("left behind: " + "; ".join(left))
        print("    | no moat process, state dir or mount left")

    def bad_annotation(self, key, value):
        before = {i.id for i in self.cri.rt("ListPodSandbox").items}
        try:
            pod = self.cri.rt("RunPodSandbox", config=self.pod_config("bad-" + key.split(".")[-1], {key: value}),
                              runtime_handler="moat").pod_sandbox_id
        except self.grpc.RpcError as e:
            msg = describe(e)
            print(f"    | refused: {msg[-600:]}")
            if key not in msg:
                raise StepFailed(f"the error does not name {key}") from None
        else:
            self.remove_pod(pod)
            raise StepFailed(f"RunPodSandbox with {key}={value} succeeded (pod {pod}), want an error naming {key}")
        after = {i.id for i in self.cri.rt("ListPodSandbox").items}
        for pod in after - before:
            # The CRI keeps a failed sandbox on record in some versions; it must not run.
            st = self.cri.rt("PodSandboxStatus", pod_sandbox_id=pod).status
            print(f"    | failed pod {pod} still listed, state {st.state}; removing it")
            self.remove_pod(pod)
        self.nothing_left()

    # ------------------------------------------------------------ scenario
    def run(self):
        import grpc  # python3-grpcio
        self.grpc = grpc
        self.pb = compile_proto(os.path.join(self.work, "pb"))
        print(f"===== {self.name}: CRI")
        if self.step("start containerd", self.start_containerd) is None:
            return
        self.cri = Cri(grpc, self.pb, self.sock)
        if self.step("CRI Version", self.cri_version) is None or self.step("import images", self.import_images) is None:
            return
        config = self.pod_config("pod1")
        pod = self.step("RunPodSandbox (runtime handler moat)", self.run_pod, config)
        if pod is None:
            return
        try:
            self.pod_scenario(pod, config)
        finally:
            self.step("StopPodSandbox + RemovePodSandbox", self.remove_pod, pod)
        self.step("nothing left after the pod", self.nothing_left)
        self.step("io.moat.vcpus=0 is refused by name", self.bad_annotation, "io.moat.vcpus", "0")
        self.step("unknown io.moat.bogus is refused by name", self.bad_annotation, "io.moat.bogus", "1")

    def pod_scenario(self, pod, config):
        sleeper = self.step("create + start container `sleeper`", self.create_start, pod, config, "sleeper",
                            ["sleep", "100000"])
        writer = self.step("create + start container `kernel` (exits 3)", self.create_start, pod, config, "kernel",
                           ["sh", "-c", "echo kernel=$(uname -r); echo boot=$(cat /proc/sys/kernel/random/boot_id); "
                                        "echo to-stderr >&2; exit 3"])
        if sleeper is None or writer is None:
            return
        self.step("ContainerStatus of `kernel`: EXITED, exit code 3", self.wait_exited, writer, 3)
        out = self.step("CRI log of `kernel`: guest kernel and boot id", self.kernel_log,
                        os.path.join(config.log_directory, "kernel.log")) or {}
        self.step("ExecSync uname -r in `sleeper`: the guest kernel", self.exec_sync, sleeper, ["uname", "-r"], 0,
                  out.get("kernel"))
        self.step("ExecSync exit code 7 and stderr", self.exec_sync, sleeper, ["sh", "-c", "echo out; echo err >&2; exit 7"], 7,
                  "out", "err")
        self.step("`sleeper` and `kernel` share the VM (same boot id)", self.exec_sync, sleeper,
                  ["cat", "/proc/sys/kernel/random/boot_id"], 0, out.get("boot"))
        self.step("one VMM and one shim for the pod", self.one_vm)
        self.step("ContainerStats / ListContainerStats", self.stats, pod, sleeper)

    def cleanup(self):
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # --one-file-system: never into a mount a failed step may have left.
        subprocess.run(["rm", "-rf", "--one-file-system", self.work], check=False)


def describe(e):
    """A gRPC error's code and message, or any exception's text."""
    if hasattr(e, "code") and hasattr(e, "details"):
        return f"{e.code().name}: {e.details()}"
    return str(e)


def main():
    if len(sys.argv) != 2 or sys.argv[1] not in CONTAINERD:
        sys.exit("usage: cri_test.py 1.6|2")
    if os.environ.get("MOAT_TESTHOST") != "1":
        sys.exit("run me inside the test host: integration/testhost run -- python3 integration/cri_test.py " + sys.argv[1])
    for f in (BUSYBOX_TAR, PAUSE_TAR):
        if not os.path.exists(f):
            sys.exit(f"no {f}: make images")
    # This checkout's build if there is one (`make test-kvm` does not install): the
    # shim then finds moat-vmm and the guest beside it.
    build_bin = os.path.join(REPO, "build/bin")
    if os.access(os.path.join(build_bin, "containerd-shim-moat-v2"), os.X_OK):
        os.environ["PATH"] = build_bin + ":" + os.environ["PATH"]
    if not shutil.which("containerd-shim-moat-v2"):
        sys.exit("containerd-shim-moat-v2 is not on PATH")
    test = Test(sys.argv[1])
    try:
        test.run()
    finally:
        for line in test.log_lines(r"level=(error|warning)")[-15:]:
            if not re.search(r"cni|btrfs|zfs|aufs|devmapper|tracing|blockfile|erofs", line, re.I):
                print(f"    {test.name} log: {line}")
        test.cleanup()
    print("=====")
    if test.failures:
        print(f"cri_test {test.version}: {len(test.failures)} failed: {'; '.join(test.failures)}")
        sys.exit(1)
    print(f"cri_test {test.version}: all passed")


if __name__ == "__main__":
    main()
