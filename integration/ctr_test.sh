#!/bin/bash
# integration/ctr_test.sh: containerd-shim-moat-v2 end to end under a real containerd,
# driven by ctr, in the test host (real KVM; `make test-kvm` runs it through
# integration/tests/containerd.rs, one test host per version and group).
#
#   make build guest images
#   integration/testhost run -- bash integration/ctr_test.sh 1.6|2 basic|task|recovery|parallel|hostile [N]
#
# containerd 1.6 is bookworm's (/usr/bin), 2.x sid's (/opt/containerd2/bin, see
# integration/testhost). Each run starts a private containerd (own root, state and
# socket; config version 2 for 1.6, 3 for 2.x with NRI off), imports the busybox
# test image and runs its group. Every container must prove it ran in the microVM
# (its `uname -r` is the guest kernel), and after each group no VMM, fs backend,
# shim, state dir or mount of moat may be left.
# Prints every step with its output and "ok"/"FAIL"; exits 1 if a step failed.
# Findings:
# - containerd finds `containerd-shim-<name>-v2` through PATH: 2.x must run with
#   /opt/containerd2/bin first, else it takes 1.6's runc shim from /usr/bin.
# - The CRI plugin may stay enabled for ctr-only tests (without CNI it only logs).
# - Neither containerd reports a task's exit status in `ctr task ls`; the tests
#   read it from `ctr run` (foreground) or `ctr task exec`.
set -uo pipefail
# shellcheck source=integration/lib.sh
. "$(dirname "$0")/lib.sh"

image_tar=build/images/busybox.tar
image=docker.io/moat-test/busybox:latest
c2=/opt/containerd2/bin
version=${1:-}
group=${2:-}
parallel=${3:-20} # containers at once in the parallel group
case "$version/$group" in
1.6/* | 2/*) ;;
*) echo "usage: $0 1.6|2 basic|task|recovery|parallel|hostile [N]" >&2; exit 2 ;;
esac
case "$group" in basic | task | recovery | parallel | hostile) ;; *) echo "unknown group $group" >&2; exit 2 ;; esac

[ "${MOAT_TESTHOST:-}" = 1 ] || { echo "run me inside the test host: integration/testhost run -- bash $0" >&2; exit 2; }
[ -f "$image_tar" ] || { echo "no $image_tar: make images" >&2; exit 2; }
# This checkout's build if there is one (`make test-kvm` does not install): the
# shim then finds moat-vmm and the guest beside it, in build/.
[ -x build/bin/containerd-shim-moat-v2 ] && export PATH=$PWD/build/bin:$PATH
command -v containerd-shim-moat-v2 >/dev/null || { echo "containerd-shim-moat-v2 is not on PATH" >&2; exit 2; }

work=$(mktemp -d /var/tmp/ctr-test.XXXXXX)
exec 3>&1 # the script's stdout, for progress from inside captured steps
failures=()
ctrd_pid=
host_kernel=$(uname -r)

cleanup() {
	[ -n "$ctrd_pid" ] && kill "$ctrd_pid" 2>/dev/null && wait "$ctrd_pid" 2>/dev/null
	rm -rf --one-file-system "$work"
}
trap cleanup EXIT

diagnose() {
	local f
	local p t
	echo "    processes:"; pgrep -af 'moat|virtiofsd|ctr ' | sed 's/^/      /'
	for p in $(pgrep -f 'containerd-shim-moat-v2 -namespace'); do
		echo "    shim $p threads:"
		for t in /proc/$p/task/*; do echo "      $(cat "$t/comm") $(cat "$t/wchan" 2>/dev/null) $(head -c 300 "$t/stack" 2>/dev/null | tr '\n' ' ')"; done
	done
	ls -la /run/moat/* 2>/dev/null | sed 's/^/      /'
	for f in /run/moat/*/console.log /run/moat/*/vmm.log /run/moat/*/virtiofsd.log; do
		[ -s "$f" ] && { echo "    $f:"; tail -n 8 "$f" | sed 's/^/      /'; }
	done
	[ -n "$cur" ] && grep -v 'level=debug msg="event' "$cur/containerd.log" | tail -n 30 | sed 's/^/    containerd: /'
}
cur=

check() { # NAME CMD...: run, show output, record failure
	local name=$1 rc=0 t0=$EPOCHSECONDS
	shift
	echo "--- $name: $*"
	if declare -F "$1" >/dev/null; then
		"$@" >"$work/out" 2>&1 || rc=$?
	else
		timeout 300 "$@" >"$work/out" 2>&1 || rc=$?
	fi
	sed 's/^/    | /' "$work/out" | head -n 40
	if [ "$rc" = 0 ]; then echo "ok    $name ($((EPOCHSECONDS - t0)) s)"; else
		echo "FAIL  $name (exit $rc after $((EPOCHSECONDS - t0)) s)"
		failures+=("$name")
		diagnose
	fi
	return "$rc"
}

guest_kernel() { # ctr... : prints uname -r from a moat container; must differ from the host's
	local k
	k=$("$@" run --rm --runtime io.containerd.moat.v2 "$image" uk uname -r) || return
	echo "container kernel: $k (host: $host_kernel)"
	[ -n "$k" ] && [ "$k" != "$host_kernel" ]
}

exit_code() { # want ctr...
	local want=$1 rc=0
	shift
	"$@" run --rm --runtime io.containerd.moat.v2 "$image" ec sh -c "echo out; echo err >&2; exit $want" || rc=$?
	echo "exit status $rc, want $want"
	[ "$rc" = "$want" ]
}

stdin_roundtrip() { # ctr...
	local o
	o=$(printf 'line1\nline2\n' | "$@" run --rm --runtime io.containerd.moat.v2 "$image" si sh -c 'cat; echo done') || return
	echo "$o"
	[ "$o" = "$(printf 'line1\nline2\ndone')" ]
}

exit_is() { # want CMD...
	local want=$1 rc=0
	shift
	"$@" || rc=$?
	echo "exit status $rc, want $want"
	[ "$rc" = "$want" ]
}

with_tty() { # CMD...: run on a pty; output must say tty-ok and name the container's pty
	local o
	# timeout(1) would run ctr in a background process group of the pty, where
	# ctr's raw-mode setup stops it (SIGTTOU): keep it in the foreground.
	[ "$1" = timeout ] && set -- timeout --foreground "${@:2}"
	o=$(on_pty "$@") || { echo "$o"; return 1; }
	echo "$o"
	[[ "$o" == *tty-ok* && "$o" == */dev/pts/* ]]
}

expect_fail() { # CMD...: must fail
	if "$@"; then echo "succeeded, expected an error"; return 1; fi
	return 0
}

mem_annotation() { # ctr...: MemTotal in the guest reflects io.moat.memory_mib
	local o
	o=$("$@" run --rm --annotation io.moat.memory_mib=192 --runtime io.containerd.moat.v2 "$image" ma grep MemTotal /proc/meminfo) || return
	echo "$o"
	local kb
	kb=$(echo "$o" | awk '{ print $2 }')
	[ "$kb" -gt 120000 ] && [ "$kb" -le 196608 ]
}

wait_status() { # want task ctr...
	local want=$1 task=$2 i
	shift 2
	for ((i = 0; i < 300; i++)); do
		"$@" task ls | awk -v t="$task" '$1 == t { print $3 }' | grep -qx "$want" && { "$@" task ls; return 0; }
		sleep 0.1
	done
	"$@" task ls
	return 1
}

run_moat() { # ctr... -- ARGS: ctr run --rm with the moat runtime
	local ctr=()
	while [ "$1" != -- ]; do ctr+=("$1"); shift; done
	shift
	"${ctr[@]}" run --rm --runtime io.containerd.moat.v2 "$@"
}

big_stdout() { # ctr...: 6.9 MB of numbered lines arrive complete and in order
	local want got
	"$@" run --rm --runtime io.containerd.moat.v2 "$image" bo seq 1 1000000 >"$work/big" || return
	want=$(seq 1 1000000 | sha256sum)
	got=$(sha256sum <"$work/big")
	echo "bytes: $(wc -c <"$work/big"), sha256 $got"
	[ "$got" = "$want" ]
}

log_file() { # ctr...: --log-uri file:// gets the output, exit status kept
	local f=$work/ctr-log rc=0
	"$@" run --rm --log-uri "file://$f" --runtime io.containerd.moat.v2 "$image" lf sh -c 'echo to-log; echo err-to-log >&2; exit 5' || rc=$?
	echo "exit status $rc; log:"
	cat "$f"
	[ "$rc" = 5 ] && grep -qx to-log "$f" && grep -qx err-to-log "$f"
}

not_found_error() { # ctr...: a command that does not exist is a clear error, nothing left
	local o rc=0
	o=$("$@" run --rm --runtime io.containerd.moat.v2 "$image" nf /no/such/binary 2>&1) || rc=$?
	echo "$o"
	"$@" container rm nf >/dev/null 2>&1
	[ "$rc" != 0 ] && [[ "$o" == */no/such/binary* ]]
}

tiny_memory_error() { # ctr...: an impossible VM size is refused by name
	local o rc=0
	o=$("$@" run --rm --annotation io.moat.memory_mib=8 --runtime io.containerd.moat.v2 "$image" tm true 2>&1) || rc=$?
	echo "$o"
	"$@" container rm tm >/dev/null 2>&1
	[ "$rc" != 0 ] && [[ "$o" == *io.moat.memory_mib* ]]
}

above_limit_error() { # ctr...: a VM above the host config's max_memory_mib is refused naming the limit
	local o rc=0
	o=$("$@" run --rm --annotation io.moat.memory_mib=1024 --runtime io.containerd.moat.v2 "$image" al true 2>&1) || rc=$?
	echo "$o"
	"$@" container rm al >/dev/null 2>&1
	[ "$rc" != 0 ] && [[ "$o" == *"io.moat.memory_mib=1024 is above the host's limit max_memory_mib=512 (set in $moat_config)"* ]]
}

term_with_trap() { # ctr...: SIGTERM reaches the workload, its handler's exit status comes back
	local pid rc=0 i
	"$@" run --rm --runtime io.containerd.moat.v2 "$image" tt sh -c \
		'trap "echo got-term; exit 7" TERM; echo ready; while :; do sleep 1; done' >"$work/term" 2>&1 &
	pid=$!
	for ((i = 0; i < 600; i++)); do grep -q ready "$work/term" && break; sleep 0.5; done
	"$@" task kill -s SIGTERM tt || { kill "$pid"; return 1; }
	wait "$pid" || rc=$?
	cat "$work/term"
	echo "exit status $rc, want 7"
	[ "$rc" = 7 ] && grep -q got-term "$work/term"
}

kill_all() { # ctr...: kill --all ends every process of the container
	"$@" run -d --runtime io.containerd.moat.v2 "$image" ka sh -c 'sleep 1000 & sleep 1000 & wait' || return
	wait_status RUNNING ka "$@" || return
	sleep 1
	"$@" task ps ka
	"$@" task kill -a -s SIGKILL ka || return
	wait_status STOPPED ka "$@" || return
	"$@" task delete ka && "$@" container rm ka
}

exec_sees_same_vm() { # ctr...: an exec runs in the container's VM (same boot id)
	local a b
	a=$("$@" task exec --exec-id b1 t1 cat /proc/sys/kernel/random/boot_id) || return
	b=$("$@" task exec --exec-id b2 t1 cat /proc/sys/kernel/random/boot_id) || return
	echo "boot ids: $a $b (host: $(cat /proc/sys/kernel/random/boot_id))"
	[ -n "$a" ] && [ "$a" = "$b" ] && [ "$a" != "$(cat /proc/sys/kernel/random/boot_id)" ]
}

exec_stdin() { # ctr...: exec with stdin, closed by the client
	local o
	o=$(printf 'abc\n' | "$@" task exec --exec-id si t1 sh -c 'cat; echo exec-done') || return
	echo "$o"
	[ "$o" = "$(printf 'abc\nexec-done')" ]
}

parallel_runs() { # n ctr...: n containers at once, each its own output and status
	local n=$1 i rc=0 bad=0
	shift
	local pids=()
	for ((i = 0; i < n; i++)); do
		"$@" run --rm --runtime io.containerd.moat.v2 "$image" "p$i" sh -c "echo p$i \$(uname -r); exit $((i % 5))" \
			>"$work/p$i" 2>&1 &
		pids+=($!)
	done
	# Progress on the real stdout (fd 3), so a long wait is not taken for a hang.
	local running=$n
	while [ "$running" -gt 0 ]; do
		sleep 30
		running=0
		for ((i = 0; i < n; i++)); do kill -0 "${pids[$i]}" 2>/dev/null && running=$((running + 1)); done
		echo "    ... $((n - running)) of $n containers done" >&3
	done
	for ((i = 0; i < n; i++)); do
		rc=0
		wait "${pids[$i]}" || rc=$?
		if [ "$rc" != $((i % 5)) ] || [ "$(cat "$work/p$i")" != "p$i $guest" ]; then
			echo "p$i: exit $rc (want $((i % 5))), output: $(cat "$work/p$i")"
			bad=1
		fi
	done
	echo "$n containers, each with its own output and exit status: $([ $bad = 0 ] && echo yes || echo NO)"
	return $bad
}

# --- hostile: a guest that has root (a privileged container mounts the pod's
# virtio-fs shares itself, as guest root or a guest kernel could) attacks the host.

guest_root_plants() { # ctr...: the shares' own dirs are read-only to the guest
	local o
	"$@" run -d --privileged --annotation io.kubernetes.cri.sandbox-id=hp --runtime io.containerd.moat.v2 "$image" h1 sleep 1000 || return
	wait_status RUNNING h1 "$@" || return
	# Try to plant symlinks where the host will mount the next container's rootfs and
	# its binds, to make a dir there, and to fill the host's /run through the share.
	o=$("$@" task exec --exec-id a1 h1 sh -c '
		mkdir -p /mnt/fs /mnt/vol
		mount -t virtiofs moatfs /mnt/fs && mount -t virtiofs moatvol /mnt/vol && echo mounted-shares
		ls /mnt/fs
		ln -s /etc /mnt/fs/h2 2>&1 && echo PLANTED-ROOTFS
		mkdir /mnt/vol/h2 2>&1 && echo MADE-VOLDIR
		ln -s /etc/shadow /mnt/vol/h2 2>&1 && echo PLANTED-VOL
		dd if=/dev/zero of=/mnt/fs/fill bs=1M count=8 2>&1 && echo FILLED
		touch /mnt/fs/h1/x 2>&1 && echo WROTE-SKELETON
		touch /mnt/fs/h1/rootfs/written-through-share && echo rootfs-writable
		umount /mnt/fs /mnt/vol
		echo done') || { echo "$o"; return 1; }
	echo "$o"
	[[ "$o" == *mounted-shares* && "$o" == *rootfs-writable* && "$o" == *done* ]] || return 1
	[[ "$o" != *PLANTED* && "$o" != *MADE-VOLDIR* && "$o" != *FILLED* && "$o" != *WROTE-SKELETON* ]] || return 1
	[[ "$o" == *"Read-only file system"* ]]
}

next_container_is_safe() { # ctr...: the pod's next container, with a bind, runs normally
	local o sum
	sum=$(sha256sum /etc/shadow)
	mkdir -p "$work/h2vol" && echo data >"$work/h2vol/f"
	o=$("$@" run --rm --annotation io.kubernetes.cri.sandbox-id=hp --mount "type=bind,src=$work/h2vol,dst=/v,options=rbind:rw" \
		--runtime io.containerd.moat.v2 "$image" h2 sh -c 'cat /v/f; ls / | head -3; echo h2-ok') || { echo "$o"; return 1; }
	echo "$o"
	[[ "$o" == *data* && "$o" == *h2-ok* ]] && [ "$(sha256sum /etc/shadow)" = "$sum" ] && [ ! -L /etc/rootfs ]
}

end_h1() { # ctr...
	"$@" task kill -s KILL h1
	wait_status STOPPED h1 "$@" || return
	"$@" task delete h1 && "$@" container rm h1
}

ro_bind_with_submount() { # ctr...: a read-only bind is read-only in its submounts too, on the host side
	local o
	mkdir -p "$work/rovol/sub"
	echo keep >"$work/rovol/f"
	mount -t tmpfs -o size=1m tmpfs "$work/rovol/sub" || return
	echo below >"$work/rovol/sub/g"
	# Guest root writes straight into the volume share, past what the guest's own
	# read-only bind would stop.
	o=$("$@" run --rm --privileged --mount "type=bind,src=$work/rovol,dst=/v,options=rbind:ro" --runtime io.containerd.moat.v2 "$image" h3 sh -c '
		cat /v/f /v/sub/g
		mkdir -p /mnt/vol && mount -t virtiofs moatvol /mnt/vol && echo mounted-share
		echo x > /mnt/vol/h3/0/f 2>&1 && echo WROTE-TOP
		echo x > /mnt/vol/h3/0/sub/g 2>&1 && echo WROTE-SUB
		touch /mnt/vol/h3/0/sub/new 2>&1 && echo CREATED-SUB
		umount /mnt/vol
		echo done')
	echo "$o"
	echo "host: $(cat "$work/rovol/f" "$work/rovol/sub/g" | tr '\n' ' ')"
	local host
	host=$(cat "$work/rovol/f" "$work/rovol/sub/g")
	umount "$work/rovol/sub"
	[[ "$o" == *keep*below*mounted-share*done* && "$o" != *WROTE* && "$o" != *CREATED* ]] && [ "$host" = "$(printf 'keep\nbelow')" ]
}

volume_set_id_and_devices() { # ctr...: no set-ID file or device node lands in a writable bind
	local o mode
	mkdir -p "$work/rwvol"
	printf '#!/bin/sh\n' >"$work/rwvol/prog"
	chmod 755 "$work/rwvol/prog"
	o=$("$@" run --rm --mount "type=bind,src=$work/rwvol,dst=/v,options=rbind:rw" --runtime io.containerd.moat.v2 "$image" h4 sh -c '
		id -u
		chmod u+s /v/prog 2>&1 && echo SUID
		chmod g+s /v/prog 2>&1 && echo SGID
		cp /bin/busybox /v/bb && chmod 4755 /v/bb 2>&1 && echo SUID-COPY
		mknod /v/sda b 8 0 2>&1 && echo BLOCK-DEV
		mknod /v/mem c 1 1 2>&1 && echo CHAR-DEV
		mkfifo /v/fifo && echo fifo-ok
		echo done')
	echo "$o"
	mode=$(stat -c %a "$work/rwvol/prog")
	ls -l "$work/rwvol"
	[[ "$o" == *fifo-ok*done* && "$o" != *SUID* && "$o" != *SGID* && "$o" != *DEV* ]] &&
		[ "$mode" = 755 ] && [ ! -e "$work/rwvol/sda" ] && [ ! -e "$work/rwvol/mem" ] && [ ! -u "$work/rwvol/bb" ]
}

vmm_is_jailed() { # ctr...: moat-vmm runs unprivileged, in its own namespaces, seeing only its jail
	local pid uid caps o
	"$@" run -d --runtime io.containerd.moat.v2 "$image" h5 sleep 1000 || return
	wait_status RUNNING h5 "$@" || return
	pid=$(pgrep -x moat-vmm | head -1)
	[ -n "$pid" ] || { echo "no moat-vmm"; return 1; }
	uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status")
	caps=$(awk '/^CapEff:/ { print $2 }' "/proc/$pid/status")
	echo "moat-vmm pid $pid uid $uid CapEff $caps"
	o=$(ls "/proc/$pid/root/" 2>&1; ls "/proc/$pid/root/dev" 2>&1)
	echo "its root: $o" | tr '\n' ' '; echo
	local bad=0
	[ "$uid" != 0 ] || { echo "runs as root"; bad=1; }
	[ "$caps" = 0000000000000000 ] || { echo "has capabilities"; bad=1; }
	for ns in mnt pid net ipc uts; do
		[ "$(readlink "/proc/$pid/ns/$ns")" != "$(readlink /proc/1/ns/$ns)" ] || { echo "shares the host's $ns namespace"; bad=1; }
	done
	[ ! -e "/proc/$pid/root/etc" ] && [ ! -e "/proc/$pid/root/var" ] || { echo "sees the host's files"; bad=1; }
	local t
	for t in /proc/$pid/task/*; do
		awk '/^Seccomp:/ { exit $2 == 2 ? 0 : 1 }' "$t/status" || { echo "thread $(basename "$t") ($(cat "$t/comm")) has no seccomp filter"; bad=1; }
	done
	"$@" task kill -s KILL h5
	wait_status STOPPED h5 "$@"
	"$@" task delete h5 && "$@" container rm h5
	return $bad
}

group_hostile() {
	check "$name: guest root cannot plant, make or fill anything in the shares' own dirs" guest_root_plants "${ctr[@]}"
	check "$name: the pod's next container (with a bind) is unaffected" next_container_is_safe "${ctr[@]}"
	check "$name: end the privileged container" end_h1 "${ctr[@]}"
	check "$name: a read-only bind with a writable submount is read-only all the way down" ro_bind_with_submount "${ctr[@]}"
	check "$name: no set-ID file or device node in a writable bind" volume_set_id_and_devices "${ctr[@]}"
	check "$name: moat-vmm is jailed" vmm_is_jailed "${ctr[@]}"
	sleep 1
	check "$name: nothing left" leftovers
}

restart_containerd() { # bin pathprefix version dir
	kill "$ctrd_pid"
	wait "$ctrd_pid" 2>/dev/null
	ctrd_pid=
	pgrep -af containerd-shim-moat-v2 || { echo "the shim died with containerd"; return 1; }
	start_containerd "$@"
}

guest=

group_basic() {
	check "$name: run --rm uname -r is the guest kernel" guest_kernel "${ctr[@]}"
	check "$name: exit code 3 propagates" exit_code 3 "${ctr[@]}"
	check "$name: exit code 0" exit_code 0 "${ctr[@]}"
	check "$name: stdin round trip" stdin_roundtrip "${ctr[@]}"
	check "$name: seq 1..1000000 (6.9 MB of stdout) complete and in order" big_stdout "${ctr[@]}"
	check "$name: --log-uri file:// log file" log_file "${ctr[@]}"
	check "$name: run --rm -t (pty)" with_tty "${ctr[@]}" run --rm -t --runtime io.containerd.moat.v2 "$image" tt sh -c 'tty; echo tty-ok'
	check "$name: bad annotation is refused" expect_fail "${ctr[@]}" run --rm --annotation io.moat.vcpu=2 --runtime io.containerd.moat.v2 "$image" ba true
	"${ctr[@]}" container rm ba >/dev/null 2>&1
	check "$name: io.moat.memory_mib=8 is refused by name" tiny_memory_error "${ctr[@]}"
	check "$name: io.moat.memory_mib=192 sizes the VM" mem_annotation "${ctr[@]}"
	check "$name: io.moat.memory_mib=1024 above max_memory_mib=512 is refused naming the limit" above_limit_error "${ctr[@]}"
	check "$name: a missing binary is a clear error" not_found_error "${ctr[@]}"
	sleep 1
	check "$name: nothing left" leftovers
}

group_task() {
	check "$name: run -d sleep" "${ctr[@]}" run -d --runtime io.containerd.moat.v2 "$image" t1 sleep 1000
	check "$name: task ls RUNNING" wait_status RUNNING t1 "${ctr[@]}"
	check "$name: task exec e1 (exit 4 propagates)" exit_is 4 "${ctr[@]}" task exec --exec-id e1 t1 sh -c 'echo exec-ok; uname -r; exit 4'
	check "$name: execs run in the same VM" exec_sees_same_vm "${ctr[@]}"
	check "$name: task exec with stdin" exec_stdin "${ctr[@]}"
	check "$name: task exec -t (pty)" with_tty "${ctr[@]}" task exec -t --exec-id e3 t1 sh -c 'tty; echo tty-ok'
	check "$name: task ps" "${ctr[@]}" task ps t1
	check "$name: task metrics" "${ctr[@]}" task metrics t1
	check "$name: task pause" "${ctr[@]}" task pause t1
	check "$name: task ls PAUSED" wait_status PAUSED t1 "${ctr[@]}"
	check "$name: task resume" "${ctr[@]}" task resume t1
	check "$name: task ls RUNNING again" wait_status RUNNING t1 "${ctr[@]}"
	check "$name: task kill -s KILL" "${ctr[@]}" task kill -s KILL t1
	check "$name: task ls STOPPED" wait_status STOPPED t1 "${ctr[@]}"
	check "$name: task delete" "${ctr[@]}" task delete t1
	check "$name: container rm" "${ctr[@]}" container rm t1
	check "$name: SIGTERM with a handler: its exit status" term_with_trap "${ctr[@]}"
	check "$name: task kill --all" kill_all "${ctr[@]}"
	sleep 1
	check "$name: nothing left" leftovers
}

group_recovery() {
	local shim
	# containerd restarts: the running task survives and is still driven.
	check "$name: run -d sleep (t3)" "${ctr[@]}" run -d --runtime io.containerd.moat.v2 "$image" t3 sleep 1000
	check "$name: task ls RUNNING" wait_status RUNNING t3 "${ctr[@]}"
	check "$name: restart containerd" restart_containerd "${start_args[@]}"
	check "$name: task still RUNNING after the restart" wait_status RUNNING t3 "${ctr[@]}"
	check "$name: task exec after the restart" exit_is 0 "${ctr[@]}" task exec --exec-id r1 t3 sh -c 'uname -r'
	check "$name: kill after the restart" "${ctr[@]}" task kill -s KILL t3
	check "$name: task ls STOPPED (exit event reached the new containerd)" wait_status STOPPED t3 "${ctr[@]}"
	check "$name: task delete t3" "${ctr[@]}" task delete t3
	check "$name: container rm t3" "${ctr[@]}" container rm t3
	sleep 1
	check "$name: nothing left after the restart" leftovers
	# A shim SIGKILLed mid-run: containerd's cleanup runs `containerd-shim-moat-v2 delete`.
	check "$name: run -d sleep (t2)" "${ctr[@]}" run -d --runtime io.containerd.moat.v2 "$image" t2 sleep 1000
	check "$name: task ls RUNNING (t2)" wait_status RUNNING t2 "${ctr[@]}"
	shim=$(pgrep -f 'containerd-shim-moat-v2.*-id t2' | head -1)
	echo "shim of t2: $shim; VMM: $(pgrep moat-vmm | tr '\n' ' ')"
	check "$name: SIGKILL the shim" kill -9 "$shim"
	sleep 2
	"${ctr[@]}" task ls
	"${ctr[@]}" task delete t2 >/dev/null 2>&1 || "${ctr[@]}" task delete -f t2
	check "$name: container rm t2" "${ctr[@]}" container rm t2
	sleep 1
	check "$name: nothing left after a killed shim" leftovers
}

group_parallel() {
	# 20 guests booting at once in the emulated host take minutes, not the default
	# 120 s (see moat_config below); and 20 x 256 MiB would not fit its RAM.
	[ "$parallel" -ge 20 ] || echo "*** $parallel containers in parallel, not 20: the emulated test host (see parallel_count in integration/tests/containerd.rs)"
	check "$name: $parallel containers in parallel" parallel_runs "$parallel" timeout -k 10 1500 "$ctrbin" --address "$d/containerd.sock" --namespace smoke
	sleep 2
	check "$name: nothing left" leftovers
}

if [ "$version" = 1.6 ]; then
	name=containerd1.6 bin=/usr/bin/containerd ctrbin=/usr/bin/ctr pathpre="" cfgver=2
else
	name=containerd2 bin=$c2/containerd ctrbin=$c2/ctr pathpre="$c2:" cfgver=3
fi
d=$work/$name
cur=$d
start_args=("$bin" "$pathpre" "$cfgver" "$d")
moat_config=
if [ "$group" = parallel ]; then
	# The shims read it from containerd's environment.
	moat_config=$work/moat.toml
	printf 'boot_timeout_secs = 1200\nmemory_mib = 128\n' >"$moat_config"
elif [ "$group" = basic ]; then
	# An operator's limit, for the above-the-limit check (the VMs here take 256 MiB).
	moat_config=$work/moat.toml
	printf 'max_memory_mib = 512\n' >"$moat_config"
fi
# Every ctr call is bounded: a hang becomes a failure with diagnostics.
ctr=(timeout -k 10 300 "$ctrbin" --address "$d/containerd.sock" --namespace smoke)
echo "===== $name: $group"
check "$name: start containerd" start_containerd "${start_args[@]}" || exit 1
check "$name: image import" "${ctr[@]}" image import "$image_tar" || exit 1
guest=$("${ctr[@]}" run --rm --runtime io.containerd.moat.v2 "$image" gk uname -r)
echo "guest kernel: $guest (host: $host_kernel)"
if [ -z "$guest" ] || [ "$guest" = "$host_kernel" ]; then
	echo "FAIL  $name: a moat container must run on the guest kernel"
	failures+=("guest kernel")
else
	"group_$group"
fi
grep -E 'level=(error|warning)' "$d/containerd.log" | grep -viE 'cni|btrfs|zfs|aufs|devmapper|tracing|blockfile|erofs' | tail -n 15 | sed "s/^/    $name log: /"

echo "====="
if [ ${#failures[@]} -gt 0 ]; then
	echo "ctr_test $version $group: ${#failures[@]} failed: ${failures[*]}"
	exit 1
fi
echo "ctr_test $version $group: all passed"
