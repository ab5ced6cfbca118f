# Shared helpers for contrib/ scripts. Source it; it defines functions only.

# debian_mirror prints the Debian archive URL this machine's apt uses, read
# from its sources at run time (never written into the repository).
debian_mirror() {
	local uri=""
	if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
		uri=$(awk '
			/^URIs:/ { u = $2 }
			/^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") { print u; exit } }
		' /etc/apt/sources.list.d/*.sources)
	fi
	if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
		uri=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list)
	fi
	if [ -z "$uri" ]; then
		echo "no bookworm mirror in /etc/apt/sources*: add one" >&2
		return 1
	fi
	echo "$uri"
}

# phase NAME: prints a phase header and remembers when it started.
phase() {
	phase_name=$1
	phase_start=$(date +%s)
	echo "==> $phase_name"
}

# phase_done: prints how long the current phase took.
phase_done() {
	local took=$(($(date +%s) - phase_start))
	echo "    $phase_name: ${took}s"
	phase_times="${phase_times:-}$(printf '  %-34s %5ss' "$phase_name" "$took")\n"
}
