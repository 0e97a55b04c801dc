#!/usr/bin/env bash
# Two Skein builds side by side on vs-iggy.sh's single-node workload (1 producer, 1 partition,
# 1000-byte messages, ~1 MB batches, acks=leader, default flush, then 1 consumer reading it all
# back), alternating A, B, A, B... for ROUNDS rounds, each on a fresh data directory and a
# fresh broker after WARM_MIB (6 GiB) of page cache was written and freed (see vs-iggy.sh).
# Broker CPU seconds come from /proc/PID/stat before and after each client run.
#
#   bench/ab-single-node.sh A_RELEASE_DIR B_RELEASE_DIR [ROUNDS]
#
# Each directory holds skein-broker and skein-loadgen (e.g. a worktree of the previous commit
# built with `cargo build --release`, and target/release). CORES_A and CORES_B set --cores on
# each side's broker (default: all cores); with the same directory twice they compare core
# counts of one build. FLUSH_MS=VALUE creates the topic with flush.ms=VALUE (default: the
# broker's default). Prints one table row per run (with the producer's latency p99 and max) and the B/A ratios of the means, and writes
# bench/results/ab-single-node.json.
set -euo pipefail
a_dir=$(realpath "${1:?A_RELEASE_DIR}")
b_dir=$(realpath "${2:?B_RELEASE_DIR}")
rounds=${3:-2}
cd "$(dirname "$0")/.."
out=bench/results
mkdir -p "$out"
messages=${MESSAGES:-4000000}
addr=127.0.0.1:19612
data=$(mktemp -d /var/tmp/skein-ab.XXXXXX)
server_pid=
. bench/lib.sh
trap 'stop_server; rm -rf "$data"' EXIT
rows=()
run() { # label dir round cores
  local label=$1 dir=$2 r=$3 d="$data/$1-$3" before mid after cores=()
  [ -n "$4" ] && cores=(--cores "$4")
  warm_page_cache
  "$dir/skein-broker" --data-dir "$d" --listen "$addr" "${cores[@]}" > "$data/$label-$r.out" 2> "$data/$label-$r.err" &
  server_pid=$!
  for _ in $(seq 300); do grep -q '^ready ' "$data/$label-$r.out" && break; sleep 0.1; done
  grep -q '^ready ' "$data/$label-$r.out" || { echo "$label broker did not start" >&2; cat "$data/$label-$r.err" >&2; exit 1; }
  local common=(--brokers "$addr" --topic t --partitions 1 --message-size 1000 --messages "$messages" --warmup 0s)
  echo "== $label, round $r" >&2
  before=$(cpu_seconds "$server_pid")
  local flush=()
  [ -n "${FLUSH_MS:-}" ] && flush=(--topic-config "flush.ms=$FLUSH_MS")
  "$dir/skein-loadgen" produce "${common[@]}" --batch-bytes 1000000 --acks leader "${flush[@]}" \
    --report "$out/ab-$label-$r-produce.json" > "$data/$label-$r-produce.txt" 2>&1
  mid=$(cpu_seconds "$server_pid")
  "$dir/skein-loadgen" consume "${common[@]}" --report "$out/ab-$label-$r-consume.json" > "$data/$label-$r-consume.txt" 2>&1
  after=$(cpu_seconds "$server_pid")
  stop_server
  rm -rf "$d"
  local pm cm
  pm=$(python3 -c "import json;print(round(json.load(open('$out/ab-$label-$r-produce.json'))['bytes_per_sec']/1e6,1))")
  cm=$(python3 -c "import json;print(round(json.load(open('$out/ab-$label-$r-consume.json'))['bytes_per_sec']/1e6,1))")
  local gb p99 pmax
  gb=$(python3 -c "print($messages*1000/1e9)")
  p99=$(python3 -c "import json;print(json.load(open('$out/ab-$label-$r-produce.json'))['latency_us']['p99'])")
  pmax=$(python3 -c "import json;print(json.load(open('$out/ab-$label-$r-produce.json'))['latency_us']['max'])")
  rows+=("{\"side\":\"$label\",\"round\":$r,\"produce_mb_s\":$pm,\"consume_mb_s\":$cm,\"produce_p99_us\":$p99,\"produce_max_us\":$pmax,\"produce_cpu_s_per_gb\":$(python3 -c "print(round(($mid-$before)/$gb,3))"),\"consume_cpu_s_per_gb\":$(python3 -c "print(round(($after-$mid)/$gb,3))")}")
}
for r in $(seq "$rounds"); do
  run A "$a_dir" "$r" "${CORES_A:-}"
  run B "$b_dir" "$r" "${CORES_B:-}"
done
printf '[%s]\n' "$(IFS=,; echo "${rows[*]}")" > "$out/ab-single-node.json"
python3 - "$out/ab-single-node.json" "$a_dir" "$b_dir" << 'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))
print(f"A = {sys.argv[2]}\nB = {sys.argv[3]}")
print(f"{'side':4} {'round':>5} {'produce MB/s':>13} {'cpu s/GB':>9} {'p99 µs':>9} {'max µs':>9} {'consume MB/s':>13} {'cpu s/GB':>9}")
for r in rows:
    print(f"{r['side']:4} {r['round']:>5} {r['produce_mb_s']:>13} {r['produce_cpu_s_per_gb']:>9} {r['produce_p99_us']:>9} {r['produce_max_us']:>9} {r['consume_mb_s']:>13} {r['consume_cpu_s_per_gb']:>9}")
mean = lambda side, k: sum(r[k] for r in rows if r['side'] == side) / sum(1 for r in rows if r['side'] == side)
for k in ['produce_mb_s', 'produce_cpu_s_per_gb', 'produce_p99_us', 'produce_max_us', 'consume_mb_s', 'consume_cpu_s_per_gb']:
    print(f"B/A {k}: {mean('B', k) / mean('A', k):.2f}")
EOF
