#!/usr/bin/env python3
"""Writes the seed corpus of the shim's fuzz targets (seeds/<target>/<name>), in the
byte formats their doc comments describe: real agent replies, a CRI-style spec with
annotations, `moat run` inputs, a minimal OCI layout and docker-save archive, and
small layers with symlinks, hard links and whiteouts.

Run it after changing a target's input format; the seeds are committed."""
import io
import json
import os
import struct
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))


def u8(v): return struct.pack("<B", v)
def u16(v): return struct.pack("<H", v)
def u32(v): return struct.pack("<I", v)
def section(b):
    if isinstance(b, str):
        b = b.encode()
    return u16(len(b)) + b


# --- protobuf, just enough for the agent's replies -------------------------------

def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def pb_uint(field, n): return varint(field << 3) + varint(n)
def pb_bytes(field, b): return varint(field << 3 | 2) + varint(len(b)) + (b.encode() if isinstance(b, str) else b)


CALLS = ["version", "create", "start", "wait", "signal", "resize", "close_stdin", "exec", "stats", "list_pids",
         "pause", "resume", "update", "remove", "shutdown"]


def agent_seeds():
    call = lambda name: u8(CALLS.index(name))
    payload = lambda name, p: call(name) + u8(2) + p
    yield "version-ok", payload("version", pb_uint(1, 2) + pb_bytes(2, "0.1.0") + pb_bytes(3, "6.1.0-moat"))
    yield "version-mismatch", payload("version", pb_uint(1, 1) + pb_bytes(2, "0.1.0") + pb_bytes(3, "6.1"))
    yield "version-escape", payload("version", pb_uint(1, 2) + pb_bytes(2, "\x1b[2J0.1") + pb_bytes(3, "6.1"))
    yield "start-pid", payload("start", pb_uint(1, 42))
    yield "start-pid-zero", payload("start", b"")
    yield "wait-status", payload("wait", pb_uint(1, 137))
    yield "wait-negative", payload("wait", pb_uint(1, (1 << 64) - 1))
    yield "list-pids", payload("list_pids", pb_bytes(1, b"".join(varint(p) for p in (1, 7, 4194304))))
    yield "stats", payload("stats", pb_uint(1, 4096) + pb_uint(2, 99))
    yield "empty-ok", payload("create", b"")
    yield "status-not-found", call("exec") + u8(3) + u8(5) + b"no such container\n\x1b[31m"
    # Raw: a frame claiming 256 MiB, and a header cut short.
    yield "raw-oversized", call("version") + u8(0) + struct.pack(">IIBB", 256 << 20, 1, 2, 0) + b"xx"
    yield "raw-short", call("wait") + u8(0) + b"\x00\x00\x01"
    yield "frame-garbage", call("list_pids") + u8(1) + b"\xff" * 16


def handshake_seeds():
    yield "ok", b"OK 1073741824\n"
    yield "ok-with-stream", b"OK 1073741825\npayload after the line"
    yield "refused", b""
    yield "err", b"ERR too many connections\n"
    yield "too-long", b"O" * 40
    yield "ok-no-digits", b"OK \n"


def cri_spec():
    return {
        "ociVersion": "1.0.2",
        "process": {"args": ["sh", "-c", "echo hi"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "pod",
        "hooks": {"prestart": [{"path": "/usr/bin/hook"}]},
        "annotations": {
            "io.kubernetes.cri.sandbox-id": "0123456789abcdef",
            "io.kubernetes.cri.container-type": "container",
            "io.moat.vcpus": "2",
            "io.moat.memory_mib": "512",
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro"]},
            {"destination": "/etc/hosts", "type": "bind", "source": "hosts", "options": ["rbind", "ro"]},
            {"destination": "/data", "source": "data", "options": ["rbind", "rw"]},
        ],
        "linux": {
            "cgroupsPath": "kubepods-besteffort.slice:cri-containerd:abc",
            "namespaces": [{"type": "pid"}, {"type": "network", "path": "/proc/1/ns/net"}, {"type": "ipc"},
                           {"type": "uts"}, {"type": "mount"}],
            "resources": {"pids": {"limit": 10}},
        },
    }


def oci_seeds():
    yield "cri-pod", json.dumps(cri_spec()).encode()
    s = cri_spec()
    s["annotations"] = {"io.moat.vcpus": "64", "io.moat.memory_mib": "999999"}
    yield "above-limits", json.dumps(s).encode()
    s = cri_spec()
    s["annotations"] = {"io.moat.vcpu": "2", "io.kubernetes.cri.sandbox-id": ""}
    yield "unknown-annotation", json.dumps(s).encode()
    yield "docker-minimal", json.dumps({"ociVersion": "1.0.2", "process": {"args": ["true"]}, "root": {"path": "rootfs"},
                                        "mounts": [{"destination": "/n", "type": "bind", "source": "/dev/null"}]}).encode()
    yield "not-an-object", b"[1, 2, 3]"


def run_spec_seed(flags=0, pids=0, config=None, passwd="", group="", user="", workdir="", env="", cmd="", volumes="", hostname="c1"):
    config = json.dumps(config if config is not None else {"Entrypoint": ["/bin/sh"], "Cmd": ["-c", "id"], "Env": ["PATH=/bin"]})
    return u8(flags) + u32(pids) + b"".join(section(s) for s in (config, passwd, group, user, workdir, env, cmd, volumes, hostname))


PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\napp:x:1000:1000::/home/app:/bin/sh\n"
GROUP = "root:x:0:\nwheel:x:10:app\napp:x:1000:\n"


def run_seeds():
    yield "defaults", run_spec_seed()
    yield "named-user", run_spec_seed(passwd=PASSWD, group=GROUP, user="app:wheel", env="A=1\nPATH=/usr/bin\nB", workdir="/home/app")
    yield "flags", run_spec_seed(flags=0x1E, pids=100, passwd=PASSWD, volumes="/tmp:/data:ro\n/tmp:/x", cmd="ls\n-l")
    yield "host-passwd-links", run_spec_seed(flags=1, user="root")
    yield "image-user", run_spec_seed(config={"Cmd": ["true"], "User": "nobody", "WorkingDir": "rel"}, passwd=PASSWD)
    yield "bad-env", run_spec_seed(env="=x\n")


# --- image layers and layouts ---------------------------------------------------------

KINDS = {"file": 0, "hardlink": 1, "symlink": 2, "char": 3, "block": 4, "dir": 5, "fifo": 6, "break": 7}


def entry(kind, name="", link="", data=b"", mode=0o644, uid=0, gid=0):
    if kind == "break":
        return u8(7)
    return u8(KINDS[kind]) + u16(mode) + u8(uid) + u8(gid) + section(name) + section(link) + section(data)


def layer_seeds():
    yield "plain", u8(0) + entry("dir", "etc/", mode=0o755) + entry("file", "etc/passwd", data=PASSWD.encode()) + entry("symlink", "bin", "usr/bin")
    # A symlink out of the root, then entries through it.
    yield "symlink-escape", (u8(0) + entry("symlink", "esc", "../outside") + entry("file", "esc/x", data=b"pwned")
                             + entry("symlink", "abs", "@OUT") + entry("file", "abs/y", data=b"pwned")
                             + entry("dir", "abs/d/"))
    yield "hardlink-escape", u8(0) + entry("hardlink", "h", "../outside/sentinel") + entry("hardlink", "h2", "@OUT/sentinel")
    yield "dotdot-names", u8(0) + entry("file", "../outside/z", data=b"pwned") + entry("file", "a/../../outside/w", data=b"x")
    # Whiteouts across two layers: a file, a directory made opaque, a whiteout through a symlink.
    yield "whiteouts", (u8(0) + entry("dir", "d/", mode=0o755) + entry("file", "d/keep") + entry("file", "d/gone")
                        + entry("file", "f") + entry("symlink", "l", "@OUT") + entry("break")
                        + entry("file", ".wh.f") + entry("file", "d/.wh..wh..opq") + entry("file", "d/new")
                        + entry("file", "l/.wh.sentinel") + entry("file", ".wh.."))
    yield "nodes-and-modes", (u8(0) + entry("char", "null", data=b"\x01\x03") + entry("block", "blk", data=b"\x08\x00")
                              + entry("fifo", "p") + entry("file", "suid", data=b"#!/bin/sh\n", mode=0o4755)
                              + entry("dir", "ro/", mode=0o000) + entry("file", "ro/f"))
    yield "long-names", u8(0) + entry("file", "d" * 150 + "/" + "f" * 120) + entry("symlink", "s", "t" * 300) + entry("file", "n" * 300)
    # A raw tar from Python's tarfile: a symlink and a whiteout.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("etc")
        info.type = tarfile.DIRTYPE
        t.addfile(info)
        info = tarfile.TarInfo("etc/motd")
        info.size = 3
        t.addfile(info, io.BytesIO(b"hi\n"))
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/motd"
        t.addfile(info)
        info = tarfile.TarInfo("etc/.wh.motd")
        t.addfile(info, io.BytesIO(b""))
    yield "raw-tar", u8(1) + buf.getvalue()


def small_layer():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        info = tarfile.TarInfo("hello")
        info.size = 6
        t.addfile(info, io.BytesIO(b"hello\n"))
        info = tarfile.TarInfo("s")
        info.type = tarfile.SYMTYPE
        info.linkname = "../../etc"
        t.addfile(info)
        info = tarfile.TarInfo(".wh.gone")
        t.addfile(info, io.BytesIO(b""))
    return buf.getvalue()


def layout_seeds():
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/hello"], "Env": ["PATH=/"]},
              "rootfs": {"type": "layers", "diff_ids": ["@D0"]}}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "@C", "size": "#C"},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "@L0", "size": "#L0"}]}
    index = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                                "digest": "@M", "size": "#M",
                                                "platform": {"architecture": "amd64", "os": "linux"}}]}
    # Sizes are numbers in JSON: their placeholders go in unquoted.
    raw = lambda kind, idx, man, cfg, layers: (u8(kind) + section(json.dumps(idx).replace('"#M"', "#M"))
                                               + section(json.dumps(man).replace('"#C"', "#C").replace('"#L0"', "#L0"))
                                               + section(json.dumps(cfg)) + u8(len(layers)) + b"".join(section(l) for l in layers))
    layer = small_layer()
    yield "oci-dir", raw(0, index, manifest, config, [layer])
    yield "oci-tar", raw(2, index, manifest, config, [layer])
    gz = json.loads(json.dumps(manifest))
    gz["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip"
    yield "oci-gzip", raw(4, index, gz, config, [layer])
    bad = json.loads(json.dumps(config))
    bad["rootfs"]["diff_ids"] = ["sha256:" + "0" * 64]
    yield "oci-wrong-diff-id", raw(0, index, manifest, bad, [layer])
    docker = [{"Config": "@CH.json", "RepoTags": ["busybox:latest"], "Layers": ["layer0.tar"]}]
    yield "docker-save-dir", raw(1, docker, {}, config, [layer])
    yield "docker-save-tar", raw(3, docker, {}, config, [layer])
    yield "docker-two-images", raw(1, docker * 2, {}, config, [layer])


def main():
    for target, seeds in (("agent_reply", agent_seeds), ("vsock_handshake", handshake_seeds), ("oci_spec", oci_seeds),
                          ("run_spec", run_seeds), ("image_layer", layer_seeds), ("image_layout", layout_seeds)):
        d = os.path.join(HERE, target)
        os.makedirs(d, exist_ok=True)
        for name, data in seeds():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
