#!/usr/bin/env python3
"""Builds moat's test image from Debian's busybox-static, with no registry.

    mkimage.py oci DIR          an OCI image layout directory (index.json, blobs/)
    mkimage.py docker-save TAR  a `docker save` tarball (manifest.json, layer tars)
    mkimage.py rootfs DIR       the unpacked root filesystem only
    mkimage.py pause TAR        a `docker save` tarball of moat-test/pause:latest, the
                                CRI sandbox ("pause") image of the CRI tests: the same
                                layers, run as a process that sleeps until signalled

The output is reproducible (fixed mtimes, sorted entries), so its digests are stable
and moat's image cache is exercised across runs. Two layers, so that whiteouts are
tested too: the first adds /etc/motd and /old, the second deletes /old with a
`.wh.` entry. The image holds what the end-to-end tests need beyond busybox:
a user `app` (1000:1000, also in group `extra` 1001), a non-executable file
/bin/notexec, and a default Cmd of `sh`."""
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

BUSYBOX = "/bin/busybox"  # busybox-static
EPOCH = 0
PASSWD = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = b"root:x:0:\napp:x:1000:\nextra:x:1001:app\nnogroup:x:65534:\n"


def tar_info(name, kind=tarfile.REGTYPE, mode=0o644, size=0, link="", uid=0, gid=0):
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.size, ti.linkname = kind, mode, size, link
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = EPOCH, uid, gid, "", ""
    return ti


def layer(entries):
    """entries: (name, kind, mode, data_or_link, uid, gid), written in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, mode, payload, uid, gid in entries:
            if kind == tarfile.REGTYPE:
                t.addfile(tar_info(name, kind, mode, len(payload), uid=uid, gid=gid), io.BytesIO(payload))
            else:
                t.addfile(tar_info(name, kind, mode, link=payload or "", uid=uid, gid=gid))
    return buf.getvalue()


def base_layer():
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    d, r, s = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE
    entries = [(n, d, 0o1777 if n == "tmp" else 0o755, None, 0, 0)
               for n in ["bin", "dev", "etc", "home", "proc", "root", "run", "sys", "tmp", "usr", "var", "old"]]
    entries.append(("home/app", d, 0o755, None, 1000, 1000))
    entries.append(("bin/busybox", r, 0o755, busybox, 0, 0))
    entries += [("bin/" + a, s, 0o777, "busybox", 0, 0) for a in sorted(set(applets)) if a != "busybox"]
    entries += [("etc/passwd", r, 0o644, PASSWD, 0, 0), ("etc/group", r, 0o644, GROUP, 0, 0),
                ("etc/motd", r, 0o644, b"moat test image\n", 0, 0),
                ("bin/notexec", r, 0o644, b"#!/bin/sh\necho should not run\n", 0, 0),
                ("old/file", r, 0o644, b"deleted by the next layer\n", 0, 0)]
    return layer(entries)


def top_layer():
    return layer([(".wh.old", tarfile.REGTYPE, 0o644, b"", 0, 0),
                  ("etc/moat-layer", tarfile.REGTYPE, 0o644, b"2\n", 0, 0)])


def sha(data):
    return hashlib.sha256(data).hexdigest()


# The pause image's process: PID 1 of the pod's sandbox container. It must stay up
# while the pod lives and end at once on SIGTERM/SIGINT (as PID 1 it has no default
# handlers), like Kubernetes' own pause.
PAUSE_CMD = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; sleep 2147483647 & wait"]


def image(name="busybox"):
    layers = [base_layer(), top_layer()]
    cmd = PAUSE_CMD if name == "pause" else ["sh"]
    config = {
        "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "MOAT_IMAGE=" + name],
                   "Cmd": cmd, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha(l) for l in layers]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "moat integration/mkimage.py"}] * 2,
    }
    return layers, json.dumps(config, sort_keys=True).encode()


def write_oci(out):
    layers, config = image()
    blobs = os.path.join(out, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)

    def blob(data):
        with open(os.path.join(blobs, sha(data)), "wb") as f:
            f.write(data)
        return {"digest": "sha256:" + sha(data), "size": len(data)}

    # The OCI layout gets gzip layers (the common case); docker-save gets plain tars.
    gz = [gzip.compress(l, mtime=0) for l in layers]
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": dict(blob(config), mediaType="application/vnd.oci.image.config.v1+json"),
                "layers": [dict(blob(l), mediaType="application/vnd.oci.image.layer.v1.tar+gzip") for l in gz]}
    m = json.dumps(manifest, sort_keys=True).encode()
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [dict(blob(m), mediaType="application/vnd.oci.image.manifest.v1+json",
                                platform={"architecture": "amd64", "os": "linux"},
                                annotations={"org.opencontainers.image.ref.name": "latest"})]}
    with open(os.path.join(out, "index.json"), "wb") as f:
        f.write(json.dumps(index, sort_keys=True).encode())
    with open(os.path.join(out, "oci-layout"), "wb") as f:
        f.write(b'{"imageLayoutVersion":"1.0.0"}')


def write_docker_save(out, name="busybox"):
    layers, config = image(name)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as t:
        def add(name, data):
            t.addfile(tar_info(name, size=len(data)), io.BytesIO(data))
        names = []
        for l in layers:
            t.addfile(tar_info(sha(l), tarfile.DIRTYPE, 0o755))
            add(sha(l) + "/layer.tar", l)
            names.append(sha(l) + "/layer.tar")
        add(sha(config) + ".json", config)
        add("manifest.json", json.dumps([{"Config": sha(config) + ".json", "RepoTags": [f"moat-test/{name}:latest"],
                                          "Layers": names}]).encode())


def write_rootfs(out):
    layers, _ = image()
    os.makedirs(out, exist_ok=True)
    for l in layers:
        with tarfile.open(fileobj=io.BytesIO(l)) as t:
            for m in t.getmembers():
                base = os.path.basename(m.name)
                if base.startswith(".wh."):
                    victim = os.path.join(out, os.path.dirname(m.name), base[4:])
                    shutil.rmtree(victim) if os.path.isdir(victim) else os.remove(victim)
                else:
                    t.extract(m, out, numeric_owner=True, filter="fully_trusted") if sys.version_info >= (3, 12) \
                        else t.extract(m, out, numeric_owner=True)


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("oci", "docker-save", "rootfs", "pause"):
        sys.exit(__doc__)
    kind, out = sys.argv[1], sys.argv[2]
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else None
    {"oci": write_oci, "docker-save": write_docker_save, "rootfs": write_rootfs,
     "pause": lambda out: write_docker_save(out, "pause")}[kind](tmp)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"{kind} image at {out}")


if __name__ == "__main__":
    main()
