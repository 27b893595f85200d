# integration/lib.sh: shell functions shared by the end-to-end scripts (sourced).

# Nothing of moat is left: no state dir, VMM, virtiofsd, shim or mount under
# /run/moat. Polls up to 20 s (processes take a moment to go), then lists what is.
leftovers() {
	local bad i
	for ((i = 0; i < 40; i++)); do
		bad=0
		[ -z "$(ls /run/moat 2>/dev/null)" ] || bad=1
		pgrep moat-vmm >/dev/null && bad=1
		pgrep virtiofsd >/dev/null && bad=1
		pgrep -f containerd-shim-moat >/dev/null && bad=1
		grep -q /run/moat /proc/self/mountinfo && bad=1
		[ $bad = 0 ] && break
		sleep 0.5
	done
	echo "state dirs: $(ls /run/moat 2>/dev/null | tr '\n' ' ')"
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
