# Helpers the single-node benchmark scripts share (sourced, not run). The caller sets `data`
# (a scratch directory on the data disk) and `server_pid` (the broker or server under test).

# Stops the server under test (SIGTERM, up to 30 s, then SIGKILL).
stop_server() {
  [ -n "$server_pid" ] || return 0
  kill "$server_pid" 2> /dev/null || true
  for _ in $(seq 150); do kill -0 "$server_pid" 2> /dev/null || break; sleep 0.2; done
  kill -9 "$server_pid" 2> /dev/null || true
  wait "$server_pid" 2> /dev/null || true
  server_pid=
}

# CPU seconds (user + system) a process has used so far.
cpu_seconds() {
  local stat
  stat=$(cat "/proc/$1/stat")
  # Fields after the ")" closing the command name: state is 1st, utime 12th, stime 13th.
  awk -v tck="$(getconf CLK_TCK)" '{ s = substr($0, index($0, ") ") + 2); split(s, f, " ");
    printf "%.2f\n", (f[12] + f[13]) / tck }' <<< "$stat"
}

# Fills and frees WARM_MIB (default 6 GiB) of page cache on the data directory's filesystem:
# on this VM, page-cache pages the guest has not used lately are slow to touch.
warm_page_cache() {
  sync
  dd if=/dev/zero of="$data/warm" bs=1M count="${WARM_MIB:-6144}" status=none
  rm -f "$data/warm"
  sync
}
