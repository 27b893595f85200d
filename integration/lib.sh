# integration/lib.sh: shell functions shared by the end-to-end scripts (sourced).

# The cgroup directories that exist now (to compare with later: moat must remove
# every cgroup it made).
cgroup_dirs() {
	find /sys/fs/cgroup -mindepth 1 -maxdepth 5 -type d 2>/dev/null | sort
}
cgroups_at_start=$(cgroup_dirs)

# Nothing of moat is left: no state dir, VMM, virtiofsd, shim or mount under
# /run/moat, no writable-layer disk, no cgroup it made. Polls up to 20 s (processes
# take a moment to go), then lists what is.
leftovers() {
	local bad i
	for ((i = 0; i < 40; i++)); do
		bad=0
		[ -z "$(ls /run/moat 2>/dev/null)" ] || bad=1
		[ -z "$(ls /var/lib/moat/scratch 2>/dev/null)" ] || bad=1
		pgrep moat-vmm >/dev/null && bad=1
		pgrep virtiofsd >/dev/null && bad=1
		pgrep -f containerd-shim-moat >/dev/null && bad=1
		grep -q /run/moat /proc/self/mountinfo && bad=1
		[ -z "$(comm -13 <(echo "$cgroups_at_start") <(cgroup_dirs))" ] || bad=1
		[ $bad = 0 ] && break
		sleep 0.5
	done
	echo "state dirs: $(ls /run/moat 2>/dev/null | tr '\n' ' ')"
	echo "disks: $(ls /var/lib/moat/scratch 2>/dev/null | tr '\n' ' ')"
	echo "new cgroups: $(comm -13 <(echo "$cgroups_at_start") <(cgroup_dirs) | tr '\n' ' ')"
	pgrep -a moat-vmm
	pgrep -a virtiofsd
	pgrep -af containerd-shim-moat
	grep /run/moat /proc/self/mountinfo
	return $bad
}

# Runs CMD... on a new pseudo-terminal (Python's pty.spawn: the command is a session
# leader with the pty as its controlling terminal, our stdin is /dev/null and its
# EOF does not end the session) and exits with CMD's status.
on_pty() {
	python3 -c 'import os, pty, sys; sys.exit(os.waitstatus_to_exitcode(pty.spawn(sys.argv[1:])))' "$@" </dev/null
}

wait_socket() { # PATH [SECONDS]: waits (90 s by default) for a Unix socket to appear
	local i
	for ((i = 0; i < ${2:-90} * 10; i++)); do [ -S "$1" ] && return 0; sleep 0.1; done
	return 1
}

# Starts a private containerd with its own root, state, socket and log in DIR
# (config version 2 for 1.6, 3 for 2.x with NRI off, which would otherwise take the
# host-wide socket); PATHPREFIX goes first on its PATH, where it finds the shims.
# The shims get $moat_config as MOAT_CONFIG if set. Sets ctrd_pid.
start_containerd() { # BIN PATHPREFIX CONFIGVERSION DIR
	local bin=$1 pathpre=$2 ver=$3 d=$4
	mkdir -p "$d"
	if [ "$ver" = 2 ]; then
		printf 'version = 2\nroot = "%s/root"\nstate = "%s/state"\n[grpc]\n  address = "%s/containerd.sock"\n' "$d" "$d" "$d" >"$d/config.toml"
	else
		printf "version = 3\nroot = '%s/root'\nstate = '%s/state'\n[grpc]\n  address = '%s/containerd.sock'\n[plugins.'io.containerd.nri.v1.nri']\n  disable = true\n" "$d" "$d" "$d" >"$d/config.toml"
	fi
	rm -f "$d/containerd.sock"
	PATH=$pathpre$PATH MOAT_CONFIG=${moat_config:-} "$bin" --log-level debug --config "$d/config.toml" >>"$d/containerd.log" 2>&1 &
	ctrd_pid=$!
	wait_socket "$d/containerd.sock" 60 && return 0
	tail -n 20 "$d/containerd.log"
	return 1
}
