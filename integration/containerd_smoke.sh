#!/bin/bash
# integration/containerd_smoke.sh: the container engines of the test host work,
# with runc, before moat's shim is put under them.
#
#   integration/testhost run -- bash integration/containerd_smoke.sh
#   (needs build/images/busybox.tar: `make images`)
#
# For containerd 1.6 (bookworm, /usr/bin) and containerd 2.x (sid, unpacked in
# /opt/containerd2 by integration/testhost), each with its own config, root,
# state and socket: start, `ctr image import` the docker-save test image,
# `ctr run --rm` it with runc, check which runc shim binary served the task,
# and ask for the moat runtime (its shim is not installed yet: the error is
# printed). Then dockerd 28 (sid, /opt/docker28) on containerd 2.x: `docker
# load`, `docker run --rm --network none` with runc, and the moat runtime from
# daemon.json and by its type name. Prints one line per step with its time;
# exits 1 if a step that must work did not.
#
# How to start the engines in the test host (what this script does):
#
# containerd 1.6, config version 2 (`/usr/bin/containerd --config F`):
#     version = 2
#     root = "<dir>/root"
#     state = "<dir>/state"
#     [grpc]
#       address = "<dir>/containerd.sock"
#     [plugins."io.containerd.grpc.v1.cri"]
#       restrict_oom_score_adj = true   # see the findings below
#
# containerd 2.x, config version 3, started with /opt/containerd2/bin FIRST on
# its PATH: containerd finds `containerd-shim-<name>-v2` through PATH, so
# otherwise 2.x runs its tasks with bookworm's 1.6 runc shim from /usr/bin.
# The same goes for containerd-shim-moat-v2 (make install puts it in
# /usr/local/bin, which is on PATH for both):
#     version = 3
#     root = '<dir>/root'
#     state = '<dir>/state'
#     [grpc]
#       address = '<dir>/containerd.sock'
#     [plugins.'io.containerd.cri.v1.runtime']
#       restrict_oom_score_adj = true
#     [plugins.'io.containerd.nri.v1.nri']
#       disable = true        # else it takes the host-wide /var/run/nri/nri.sock
#
# dockerd 28 on containerd 2.x, with /opt/docker28/bin and /opt/containerd2/bin
# first on its PATH (it finds docker-proxy and docker-init there):
#     dockerd --containerd <dir>/containerd.sock --data-root <dir>/docker \
#       --exec-root <dir>/docker-exec --pidfile <dir>/docker.pid \
#       -H unix://<dir>/docker.sock --config-file <dir>/daemon.json \
#       --iptables=false --ip6tables=false --bridge=none
#     daemon.json: {"runtimes": {"moat": {"runtimeType": "io.containerd.moat.v2"}}}
#
# Findings of the first runs are in the comments at the end of this file.
set -uo pipefail

image_tar=build/images/busybox.tar
image=docker.io/moat-test/busybox:latest # RepoTags of the tar, as containerd names it
c2=/opt/containerd2/bin
d28=/opt/docker28/bin

if [ "${MOAT_TESTHOST:-}" != 1 ]; then
	echo "containerd_smoke: run me inside the test host: integration/testhost run -- bash $0" >&2
	exit 2
fi
[ -f "$image_tar" ] || { echo "containerd_smoke: no $image_tar: run \`make images\` first" >&2; exit 2; }
for f in /usr/bin/containerd /usr/bin/ctr "$c2/containerd" "$c2/ctr" "$d28/dockerd" "$d28/docker"; do
	[ -x "$f" ] || { echo "containerd_smoke: missing $f (test host image too old?)" >&2; exit 2; }
done

work=$(mktemp -d /var/tmp/containerd-smoke.XXXXXX)
failures=()
daemons=() # pids to stop at exit, in start order

stop_pid() { # pid: TERM, KILL after 20 s
	local i
	kill -TERM "$1" 2>/dev/null || return 0
	for ((i = 0; i < 200; i++)); do
		kill -0 "$1" 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL "$1" 2>/dev/null || true
	wait "$1" 2>/dev/null || true
}
cleanup() {
	local i m
	for ((i = ${#daemons[@]} - 1; i >= 0; i--)); do stop_pid "${daemons[i]}"; done
	daemons=()
	# Mounts left below $work (a task that did not get deleted), deepest first.
	awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/self/mounts | sort -r |
		while read -r m; do umount -l "$m" 2>/dev/null || true; done
	rm -rf --one-file-system "$work"
}
trap cleanup EXIT

now() { date +%s%N; }
secs() { # start_ns -> seconds, 2 decimals
	local d=$(($(now) - $1))
	printf '%d.%02d' $((d / 1000000000)) $((d / 10000000 % 100))
}

# step NAME CMD...: run CMD, print "ok"/"FAIL", the time, and on failure its output.
step() {
	local name=$1 t0 rc=0
	shift
	t0=$(now)
	"$@" >"$work/out" 2>&1 || rc=$?
	if [ "$rc" = 0 ]; then
		printf 'ok    %-58s %6s s\n' "$name" "$(secs "$t0")"
	else
		printf 'FAIL  %-58s %6s s (exit %d)\n' "$name" "$(secs "$t0")" "$rc"
		tail -n 25 "$work/out" | sed 's/^/      | /'
		failures+=("$name")
	fi
	return "$rc"
}

# expect_error NAME CMD...: CMD must fail; print its error message.
expect_error() {
	local name=$1 t0 rc=0
	shift
	t0=$(now)
	"$@" >"$work/out" 2>&1 || rc=$?
	if [ "$rc" != 0 ]; then
		printf 'ok    %-58s %6s s (fails as expected, exit %d)\n' "$name" "$(secs "$t0")" "$rc"
		sed 's/^/      | /' "$work/out" | tail -n 8
	else
		printf 'FAIL  %-58s %6s s (succeeded, expected an error)\n' "$name" "$(secs "$t0")"
		failures+=("$name")
	fi
}

prints_hi() { # CMD...: CMD succeeds and prints exactly "hi"
	local o
	o=$("$@") || return
	echo "$o"
	[ "$o" = hi ]
}

# Kill the task shim-check, wait for it to stop, delete it and its container.
kill_rm_task() { # ctr-command...
	local i
	"$@" task kill -s KILL shim-check || return
	for ((i = 0; i < 100; i++)); do
		"$@" task ls | grep -qE '^shim-check .*RUNNING' || break
		sleep 0.1
	done
	"$@" task rm shim-check && "$@" container rm shim-check
}

# Wait up to $2 s for the Unix socket $1; the daemon $3 must stay alive.
wait_socket() {
	local i
	for ((i = 0; i < $2 * 10; i++)); do
		[ -S "$1" ] && return 0
		kill -0 "$3" 2>/dev/null || { echo "daemon exited before $1 appeared"; return 1; }
		sleep 0.1
	done
	echo "no socket $1 after $2 s"
	return 1
}

# The shim binary serving a running task: the parent of its init process.
task_shim_exe() { # ctr-command-array... (via "$@"), task id is "shim-check"
	local pid ppid
	pid=$("$@" task ls | awk '$1 == "shim-check" { print $2 }')
	[ -n "$pid" ] || { echo "no task shim-check"; return 1; }
	ppid=$(awk '{ print $4 }' "/proc/$pid/stat")
	readlink "/proc/$ppid/exe"
}

# ------------------------------------------------------------------ facts
echo "== test host"
echo "kernel $(uname -r); $(grep -E '^CapEff' /proc/self/status)"
if (echo -500 >/proc/self/oom_score_adj) 2>/dev/null; then
	echo "lowering oom_score_adj: allowed"
else
	echo "lowering oom_score_adj: NOT allowed (CRI needs restrict_oom_score_adj = true)"
fi
echo "containerd 1.6:  $(/usr/bin/containerd --version)"
echo "containerd 2.x:  $("$c2/containerd" --version)   [$(cat /opt/containerd2/VERSION 2>/dev/null)]"
echo "runc:            $(runc --version | head -1)"
echo "dockerd 28:      $("$d28/dockerd" --version)   [$(tr '\n' ' ' </opt/docker28/VERSION 2>/dev/null)]"
echo "docker CLI:      $("$d28/docker" --version)"

# ------------------------------------------------------------------ containerd
ctrd_pid=
# start_containerd NAME BIN PATH-PREFIX CONFIG-VERSION DIR: config in DIR, sets ctrd_pid
start_containerd() {
	local name=$1 bin=$2 pathpre=$3 ver=$4 d=$5
	mkdir -p "$d"
	if [ "$ver" = 2 ]; then
		cat >"$d/config.toml" <<EOF
version = 2
root = "$d/root"
state = "$d/state"
[grpc]
  address = "$d/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
EOF
	else
		cat >"$d/config.toml" <<EOF
version = 3
root = '$d/root'
state = '$d/state'
[grpc]
  address = '$d/containerd.sock'
[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
[plugins.'io.containerd.nri.v1.nri']
  disable = true
EOF
	fi
	PATH=$pathpre$PATH "$bin" --config "$d/config.toml" >"$d/containerd.log" 2>&1 &
	ctrd_pid=$!
	daemons+=("$ctrd_pid")
	wait_socket "$d/containerd.sock" 60 "$ctrd_pid" || { tail -n 20 "$d/containerd.log"; return 1; }
}

# containerd_suite NAME BIN CTR PATH-PREFIX CONFIG-VERSION EXPECTED-SHIM-DIR
containerd_suite() {
	local name=$1 bin=$2 ctrbin=$3 pathpre=$4 ver=$5 shimdir=$6 d ctr exe
	d=$work/$name
	ctr=("$ctrbin" --address "$d/containerd.sock" --namespace smoke)
	echo "== $name"
	if ! step "$name: start until socket" start_containerd "$name" "$bin" "$pathpre" "$ver" "$d"; then
		return
	fi
	step "$name: ctr version" "${ctr[@]}" version
	step "$name: ctr image import busybox.tar" "${ctr[@]}" image import "$image_tar" &&
		step "$name: ctr run --rm (runc) echo hi" \
			prints_hi "${ctr[@]}" run --rm --runtime io.containerd.runc.v2 "$image" t1 echo hi
	if step "$name: ctr run -d (runc) sleep" "${ctr[@]}" run -d "$image" shim-check sleep 60; then
		exe=$(task_shim_exe "${ctr[@]}" 2>&1)
		if [ "$exe" = "$shimdir/containerd-shim-runc-v2" ]; then
			echo "ok    $name: task served by $exe"
		else
			echo "FAIL  $name: task served by '$exe', expected $shimdir/containerd-shim-runc-v2"
			failures+=("$name: shim binary")
		fi
		step "$name: ctr task kill + rm, container rm" kill_rm_task "${ctr[@]}"
	fi
	expect_error "$name: ctr run --runtime io.containerd.moat.v2" \
		"${ctr[@]}" run --rm --runtime io.containerd.moat.v2 "$image" m1 echo hi
	"${ctr[@]}" container rm m1 >/dev/null 2>&1 || true
	step "$name: stop containerd" stop_pid "$ctrd_pid"
	grep -E 'level=(error|fatal)' "$d/containerd.log" | grep -vE 'cni|CNI' | tail -n 5 | sed "s/^/      $name log: /"
}

containerd_suite containerd1.6 /usr/bin/containerd /usr/bin/ctr "" 2 /usr/bin
containerd_suite containerd2 "$c2/containerd" "$c2/ctr" "$c2:" 3 "$c2"

# ------------------------------------------------------------------ docker
start_dockerd() { # dir containerd-socket
	local d=$1 csock=$2
	echo '{"runtimes": {"moat": {"runtimeType": "io.containerd.moat.v2"}}}' >"$d/daemon.json"
	PATH=$d28:$c2:$PATH "$d28/dockerd" --containerd "$csock" --data-root "$d/docker" \
		--exec-root "$d/docker-exec" --pidfile "$d/docker.pid" -H "unix://$d/docker.sock" \
		--config-file "$d/daemon.json" --iptables=false --ip6tables=false --bridge=none \
		>"$d/dockerd.log" 2>&1 &
	dockerd_pid=$!
	daemons+=("$dockerd_pid")
	wait_socket "$d/docker.sock" 90 "$dockerd_pid" || { tail -n 20 "$d/dockerd.log"; return 1; }
	# The socket appears before the API answers.
	local i
	for ((i = 0; i < 300; i++)); do
		"$d28/docker" -H "unix://$d/docker.sock" version >/dev/null 2>&1 && return 0
		sleep 0.2
	done
	echo "dockerd API did not answer"
	return 1
}

# `docker info` names the runtimes but does not show a runtimeType.
runtimes_have_moat() { # docker-command...
	local r
	# shellcheck disable=SC2016 # a Go template, not shell
	r=$("$@" info --format '{{range $k, $v := .Runtimes}}{{$k}} {{end}}') || return
	echo "runtimes: $r"
	[[ " $r " == *" moat "* ]]
}

docker_suite() {
	local d=$work/docker28 c=$work/docker28/ctrd docker
	docker=("$d28/docker" -H "unix://$d/docker.sock")
	echo "== docker 28 on containerd 2.x"
	mkdir -p "$d"
	step "docker28: containerd 2.x start until socket" start_containerd containerd2 "$c2/containerd" "$c2:" 3 "$c" || return
	step "docker28: dockerd start until the API answers" start_dockerd "$d" "$c/containerd.sock" || {
		tail -n 20 "$d/dockerd.log" | sed 's/^/      dockerd log: /'
		return
	}
	step "docker28: docker load -i busybox.tar" "${docker[@]}" load -i "$image_tar" &&
		step "docker28: docker run --rm --network none (runc) echo hi" \
			prints_hi "${docker[@]}" run --rm --network none moat-test/busybox echo hi
	step "docker28: docker info lists runtime moat" runtimes_have_moat "${docker[@]}" &&
		sed 's/^/      /' "$work/out"
	expect_error "docker28: docker run --runtime moat (daemon.json)" \
		"${docker[@]}" run --rm --network none --runtime moat moat-test/busybox echo hi
	expect_error "docker28: docker run --runtime io.containerd.moat.v2" \
		"${docker[@]}" run --rm --network none --runtime io.containerd.moat.v2 moat-test/busybox echo hi
	step "docker28: stop dockerd" stop_pid "$dockerd_pid"
	step "docker28: stop containerd 2.x" stop_pid "$ctrd_pid"
	grep -E 'level=(error|fatal)' "$d/dockerd.log" | tail -n 5 | sed 's/^/      dockerd log: /'
}
docker_suite

echo "=="
if [ ${#failures[@]} -gt 0 ]; then
	echo "containerd_smoke: ${#failures[@]} step(s) failed: ${failures[*]}"
	exit 1
fi
echo "containerd_smoke: all steps passed"

# Findings (first runs, 2026-11; containerd 1.6.20~ds1-1+deb12u3 and runc
# 1.1.5+ds1 from bookworm, containerd 2.1.9+ds1-5 and docker.io 28.5.2+dfsg4-5
# from sid):
# - Everything above works with bookworm's runc 1.1.5, also under containerd
#   2.x and Docker 28. `ctr image import` takes the docker-save tar on both
#   containerds (no --platform needed); the image is then named
#   docker.io/moat-test/busybox:latest, for docker `moat-test/busybox`.
# - The CRI plugin can stay enabled for ctr-only tests: without a CNI config
#   it only logs errors. Its restrict_oom_score_adj lives in
#   plugins."io.containerd.grpc.v1.cri" (1.6, config version 2) and in
#   plugins.'io.containerd.cri.v1.runtime' (2.x, config version 3). It matters
#   where CAP_SYS_RESOURCE is missing (the outer development machine: CapEff
#   000001fffeffffff); the emulated test host runs everything as root with
#   all capabilities and may lower oom_score_adj, so there it changes nothing.
# - A runtime whose shim is not on containerd's PATH: containerd 1.6 and 2.x
#   both answer "failed to start shim: failed to resolve runtime path: runtime
#   "io.containerd.moat.v2" binary not installed "containerd-shim-moat-v2":
#   file does not exist" (1.6 appends ": unknown"), ctr exits 1.
# - dockerd 28 accepts {"runtimes": {"moat": {"runtimeType":
#   "io.containerd.moat.v2"}}} in daemon.json at start; `docker info` lists
#   "moat" (without its type). `docker run --runtime moat` and `docker run
#   --runtime io.containerd.moat.v2` (no daemon.json entry needed) both reach
#   containerd and fail with the message above, docker exits 125: the shim
#   binary is the only missing piece.
# - dockerd logs "copy stream failed ... reading from a closed fifo" after a
#   failed start; harmless.
# - Seconds inside the TCG host, two runs on a loaded 2-core machine (1.6 /
#   2.x): start to socket 1.1 / 2.1-3.9, ctr version 1.0-1.1 / 1.3-1.6, image
#   import 2.2-2.4 / 2.5-4.4, ctr run --rm echo 3.5-4.8 / 3.7-7.4; dockerd 28
#   start to API 3.7-7.8, docker load 2.5-3.8, docker run --rm 4.2-6.9. The
#   whole script: 60-90 s plus 6-8 s of host boot.
