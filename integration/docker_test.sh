#!/bin/bash
# integration/docker_test.sh: Docker 28 running containers in moat microVMs through
# containerd-shim-moat-v2, in the test host (real KVM; `make test-kvm` runs it
# through integration/tests/containerd.rs).
#
#   make build guest images
#   integration/testhost run -- bash integration/docker_test.sh
#
# Bookworm's docker.io 20.10 cannot use a shim v2 runtime (it silently falls back
# to runc), so this uses sid's dockerd 28 (/opt/docker28/bin) on sid's containerd
# 2.x (/opt/containerd2/bin), both unpacked by integration/testhost, with private
# roots and sockets:
#     dockerd --containerd <dir>/containerd.sock --data-root <dir>/docker \
#       --exec-root <dir>/docker-exec --pidfile <dir>/docker.pid \
#       -H unix://<dir>/docker.sock --config-file <dir>/daemon.json \
#       --iptables=false --ip6tables=false --bridge=none
#     daemon.json: {"runtimes": {"moat": {"runtimeType": "io.containerd.moat.v2"}}}
# /opt/docker28/bin and /opt/containerd2/bin go first on dockerd's PATH (it finds
# docker-proxy, docker-init and the containerd shims there). Containers run with
# --network none: moat gives the guest no network device yet.
# Every container must prove it ran in the microVM (`uname -r` is the guest
# kernel); afterwards no VMM, fs backend, shim, state dir or mount may be left.
set -uo pipefail
# shellcheck source=integration/lib.sh
. "$(dirname "$0")/lib.sh"

image_tar=build/images/busybox.tar
image=moat-test/busybox
c2=/opt/containerd2/bin
d28=/opt/docker28/bin

[ "${MOAT_TESTHOST:-}" = 1 ] || { echo "run me inside the test host: integration/testhost run -- bash $0" >&2; exit 2; }
[ -f "$image_tar" ] || { echo "no $image_tar: make images" >&2; exit 2; }
# This checkout's build if there is one (`make test-kvm` does not install): the
# shim then finds moat-vmm and the guest beside it, in build/.
[ -x build/bin/containerd-shim-moat-v2 ] && export PATH=$PWD/build/bin:$PATH
command -v containerd-shim-moat-v2 >/dev/null || { echo "containerd-shim-moat-v2 is not on PATH" >&2; exit 2; }

work=$(mktemp -d /var/tmp/docker-test.XXXXXX)
failures=()
pids=()
host_kernel=$(uname -r)
d=$work
docker=(timeout -k 10 300 "$d28/docker" -H "unix://$d/docker.sock")

cleanup() {
	local p
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
	rm -rf --one-file-system "$work"
}
trap cleanup EXIT

check() { # NAME CMD...
	local name=$1 rc=0 t0=$EPOCHSECONDS
	shift
	echo "--- $name"
	"$@" >"$work/out" 2>&1 || rc=$?
	sed 's/^/    | /' "$work/out" | head -n 40
	if [ "$rc" = 0 ]; then echo "ok    $name ($((EPOCHSECONDS - t0)) s)"; else
		echo "FAIL  $name (exit $rc after $((EPOCHSECONDS - t0)) s)"
		failures+=("$name")
		pgrep -af 'moat|virtiofsd' | sed 's/^/    process: /'
		tail -n 20 "$d/dockerd.log" | sed 's/^/    dockerd: /'
		grep -v 'level=debug' "$d/containerd.log" | tail -n 20 | sed 's/^/    containerd: /'
		# The shims' own lines (they log through containerd) and each live VM's console.
		grep -aE 'msg="(sandbox |pod |[0-9a-f]{12,}/)' "$d/containerd.log" | tail -n 30 | sed 's/^/    shim: /'
		for f in /run/moat/*/jail/console.log; do [ -f "$f" ] && tail -n 15 "$f" | sed "s|^|    console $(basename "$(dirname "$(dirname "$f")")" | cut -c1-12): |"; done
	fi
	return "$rc"
}

start_engines() {
	start_containerd "$c2/containerd" "$c2:" 3 "$d" || { echo "containerd did not start"; return 1; }
	pids+=("$ctrd_pid")
	echo '{"runtimes": {"moat": {"runtimeType": "io.containerd.moat.v2"}}}' >"$d/daemon.json"
	PATH=$d28:$c2:$PATH "$d28/dockerd" --containerd "$d/containerd.sock" --data-root "$d/docker" \
		--exec-root "$d/docker-exec" --pidfile "$d/docker.pid" -H "unix://$d/docker.sock" \
		--config-file "$d/daemon.json" --iptables=false --ip6tables=false --bridge=none \
		>"$d/dockerd.log" 2>&1 &
	pids+=($!)
	wait_socket "$d/docker.sock" || { echo "dockerd did not start"; return 1; }
	local i
	for ((i = 0; i < 300; i++)); do
		"${docker[@]}" version >/dev/null 2>&1 && return 0
		sleep 0.2
	done
	echo "dockerd API did not answer"
	return 1
}

guest_kernel() { # RUNTIME: the container runs on the guest kernel
	local k
	k=$("${docker[@]}" run --rm --network none --runtime "$1" "$image" uname -r) || return
	echo "container kernel: $k (host: $host_kernel)"
	[ -n "$k" ] && [ "$k" != "$host_kernel" ]
}

exit_code() {
	local rc=0
	"${docker[@]}" run --rm --network none --runtime moat "$image" sh -c 'echo out; echo err >&2; exit 3' || rc=$?
	echo "exit status $rc, want 3"
	[ "$rc" = 3 ]
}

stdin_i() {
	local o
	o=$(printf 'one\ntwo\n' | "${docker[@]}" run --rm -i --network none --runtime moat "$image" sh -c 'cat; echo done') || return
	echo "$o"
	[ "$o" = "$(printf 'one\ntwo\ndone')" ]
}

big_stdout() { # 6.9 MB through docker's attach, complete and in order
	local want got
	"${docker[@]}" run --rm --network none --runtime moat "$image" seq 1 1000000 >"$work/big" || return
	want=$(seq 1 1000000 | sha256sum)
	got=$(sha256sum <"$work/big")
	echo "bytes: $(wc -c <"$work/big")"
	[ "$got" = "$want" ]
}

tty_t() { # docker run -t on a pty: the container's own pty
	local o
	o=$(on_pty timeout --foreground 300 "$d28/docker" -H "unix://$d/docker.sock" run --rm -t --network none --runtime moat "$image" \
		sh -c 'tty; echo tty-ok') || { echo "$o"; return 1; }
	echo "$o"
	[[ "$o" == *tty-ok* && "$o" == */dev/pts/* ]]
}

detached_lifecycle() { # run -d, exec, logs, stop with a TERM handler, rm
	local o rc=0
	"${docker[@]}" run -d --name dl --network none --runtime moat "$image" \
		sh -c 'trap "echo got-term; exit 9" TERM; echo started; while :; do sleep 1; done' || return
	o=$("${docker[@]}" exec dl sh -c 'uname -r; exit 6') || rc=$?
	echo "exec: $o (exit $rc, want 6)"
	[ "$rc" = 6 ] && [ "$o" != "$host_kernel" ] || return 1
	"${docker[@]}" stop -t 30 dl || return
	rc=$("${docker[@]}" inspect -f '{{.State.ExitCode}}' dl) || return
	o=$("${docker[@]}" logs dl 2>&1)
	echo "logs: $o; exit code $rc (want 9)"
	"${docker[@]}" rm dl >/dev/null || return
	[ "$rc" = 9 ] && [[ "$o" == *started* && "$o" == *got-term* ]]
}

kill_container() { # docker kill: 137
	local rc t0
	"${docker[@]}" run -d --name kc --network none --runtime moat "$image" sleep 1000 || return
	t0=$EPOCHREALTIME
	"${docker[@]}" kill kc || return
	echo "docker kill took $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"
	"${docker[@]}" wait kc >/dev/null
	rc=$("${docker[@]}" inspect -f '{{.State.ExitCode}}' kc)
	"${docker[@]}" rm kc >/dev/null
	echo "exit code $rc (want 137)"
	[ "$rc" = 137 ]
}

stats_once() {
	local o
	"${docker[@]}" run -d --name st --network none --runtime moat "$image" sleep 1000 || return
	o=$("${docker[@]}" stats --no-stream --format '{{.Name}} {{.MemUsage}} {{.PIDs}}' st)
	echo "$o"
	"${docker[@]}" rm -f st >/dev/null
	[[ "$o" == st* ]] && [[ "$o" != *"0B / 0B"* ]]
}

update_resources() { # docker update reaches the container's cgroup in the guest
	local before after
	"${docker[@]}" run -d --name up --network none --runtime moat "$image" sleep 1000 || return
	before=$("${docker[@]}" exec up cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max | tr '\n' ' ')
	"${docker[@]}" update --memory 64m --memory-swap 64m --pids-limit 33 up || { "${docker[@]}" rm -f up >/dev/null; return 1; }
	after=$("${docker[@]}" exec up cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max | tr '\n' ' ')
	"${docker[@]}" rm -f up >/dev/null
	echo "memory.max pids.max before: $before; after docker update: $after"
	[ "$after" = "67108864 33 " ]
}

echo "===== docker 28 on containerd 2.x: $("$d28/dockerd" --version)"
check "start containerd 2.x and dockerd 28" start_engines || exit 1
check "docker load" "${docker[@]}" load -i "$image_tar" || exit 1
check "docker run --runtime io.containerd.moat.v2: uname -r is the guest kernel" guest_kernel io.containerd.moat.v2
check "docker run --runtime moat (daemon.json): uname -r is the guest kernel" guest_kernel moat
check "exit code 3 propagates" exit_code
check "docker run -i: stdin round trip" stdin_i
check "seq 1..1000000 (6.9 MB of stdout) complete and in order" big_stdout
check "docker run -t: a tty inside" tty_t
check "run -d, exec, stop (TERM handler), logs, rm" detached_lifecycle
check "docker kill: 137" kill_container
check "docker stats" stats_once
check "docker update: memory and pids limits" update_resources
check "nothing left" leftovers

echo "====="
if [ ${#failures[@]} -gt 0 ]; then
	echo "docker_test: ${#failures[@]} failed: ${failures[*]}"
	exit 1
fi
echo "docker_test: all passed"
