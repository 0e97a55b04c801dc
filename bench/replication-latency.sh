#!/usr/bin/env bash
# Replication latency with and without follower long polls, one run on this machine: a
# 3-broker cluster (127.0.0.21-23), one partition with 3 replicas, min.insync.replicas 2,
# acks=all, 1 KiB records at a fixed open-loop rate. Each round starts a fresh cluster with
# --replica-fetch-wait-max-ms 0 (the leader answers every fetch at once; an idle follower polls
# every 5 ms) or 50 (the leader holds a caught-up follower's fetch until an append, a
# high-watermark move or 50 ms), and measures the acknowledgement latency (`produce`) and the
# end-to-end latency (`e2e`, send to receipt by a consumer of the leader), then the throughput
# with at most 1 MiB outstanding and no rate (`window`, NATS's 1,000-message window in the
# peers' table). Modes alternate,
# ROUNDS rounds each, so both see the same machine.
# Writes bench/results/repl-latency-*.json and repl-latency-MODES-summary.json; prints a table.
# COMPARE=inflight compares instead, both with long polls (wait 50 ms), a producer keeping one
# produce request in flight per partition (`--max-in-flight-per-partition 1`, as before
# pipelining) against five (the default); files are then repl-latency-i1-* and -i5-*.
# Usage: [LINGER_MS=1] [CORES=N] [COMPARE=wait|inflight] bench/replication-latency.sh [SECONDS] [RATE] [ROUNDS]
# (LINGER_MS: the producers' linger; CORES: each broker's --cores, default all)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rate=${2:-2000}
rounds=${3:-2}
out=bench/results
mkdir -p "$out"
cargo build --release -q -p skein-broker -p skein-loadgen -p skein-client
data=$(mktemp -d /var/tmp/skein-repl.XXXXXX)
trap 'pkill -f "skein-broker.*$data" || true; sleep 1; rm -rf "$data"' EXIT
wait_ready() { for _ in $(seq 100); do grep -q ready "$1" 2>/dev/null && return; sleep 0.1; done; echo "no ready in $1" >&2; exit 1; }

voters=1@127.0.0.21:19503,2@127.0.0.22:19503,3@127.0.0.23:19503
brokers=127.0.0.21:19503,127.0.0.22:19503,127.0.0.23:19503

compare=${COMPARE:-wait}
run() { # mode round; mode: w0, w50 (fetch wait ms) or i1, i5 (in flight per partition, wait 50)
  local mode=$1 round=$2 dir="$data/$1-$2" wait=50 inflight=5
  case $mode in w*) wait=${mode#w} ;; i*) inflight=${mode#i} ;; esac
  for i in 1 2 3; do
    target/release/skein-broker --node-id $i --listen 127.0.0.2$i:19503 --data-dir "$dir/n$i" --voters $voters \
      --replica-fetch-wait-max-ms "$wait" ${CORES:+--cores "$CORES"} > "$dir-n$i.out" 2> "$dir-n$i.err" &
  done
  for i in 1 2 3; do wait_ready "$dir-n$i.out"; done
  target/release/skein --brokers $brokers topic create repl --partitions 1 --replicas 3 \
    --config min.insync.replicas=2 > /dev/null
  sleep 2
  local common=(--brokers $brokers --topic repl --partitions 1 --replicas 3 --message-size 1024 --acks all
    --rate "$rate" --duration "${secs}s" --warmup 2s --linger-ms "${LINGER_MS:-1}"
    --max-in-flight-per-partition "$inflight")
  echo "== $mode (fetch wait ${wait} ms, ${inflight} in flight), round $round: produce (acknowledgement latency)" >&2
  target/release/skein-loadgen produce "${common[@]}" --report "$out/repl-latency-$mode-$round-produce.json" \
    > "$out/repl-latency-$mode-$round-produce.txt"
  echo "== $mode (fetch wait ${wait} ms, ${inflight} in flight), round $round: e2e (send to receipt)" >&2
  target/release/skein-loadgen e2e "${common[@]}" --report "$out/repl-latency-$mode-$round-e2e.json" \
    > "$out/repl-latency-$mode-$round-e2e.txt"
  echo "== $mode (fetch wait ${wait} ms, ${inflight} in flight), round $round: window (at most 1 MiB outstanding, no rate)" >&2
  target/release/skein-loadgen produce --brokers $brokers --topic repl --partitions 1 --replicas 3 \
    --message-size 1024 --acks all --duration "${secs}s" --warmup 2s --linger-ms "${LINGER_MS:-1}" \
    --max-in-flight-per-partition "$inflight" --buffer-bytes 1048576 --report "$out/repl-latency-$mode-$round-window.json" \
    > "$out/repl-latency-$mode-$round-window.txt"
  pkill -f "skein-broker.*$dir" || true
  # The next cluster binds the same addresses: wait for these brokers to be gone.
  for _ in $(seq 150); do pgrep -f "skein-broker.*$dir" > /dev/null || break; sleep 0.2; done
  # Write back what the window phase left dirty and drop this cluster's files, so the next
  # round's latency phases do not share the disk with that writeback.
  rm -rf "$dir"
  sync
}

if [ "$compare" = inflight ]; then modes=(i1 i5); else modes=(w0 w50); fi
for round in $(seq "$rounds"); do
  run "${modes[0]}" "$round"
  run "${modes[1]}" "$round"
done

python3 - "$out" "$rounds" "$rate" "${modes[@]}" <<'PY'
import json, sys
d, rounds, rate, modes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:6]
rows, summary = [], {"rate": rate, "modes": modes, "rounds": []}
for r in range(1, rounds + 1):
    for mode in modes:
        p = json.load(open(f"{d}/repl-latency-{mode}-{r}-produce.json"))
        e = json.load(open(f"{d}/repl-latency-{mode}-{r}-e2e.json"))
        w = json.load(open(f"{d}/repl-latency-{mode}-{r}-window.json"))
        row = {"round": r, "mode": mode,
               "ack_p50_us": p["latency_us"]["p50"], "ack_p99_us": p["latency_us"]["p99"],
               "e2e_p50_us": e["latency_us"]["p50"], "e2e_p99_us": e["latency_us"]["p99"],
               "produce_msgs_per_sec": p["messages_per_sec"], "errors": p.get("errors"), "e2e_errors": e.get("errors"),
               "window_msgs_per_sec": w["messages_per_sec"], "window_p50_us": w["latency_us"]["p50"],
               "window_p99_us": w["latency_us"]["p99"], "window_errors": w.get("errors")}
        rows.append(row)
print(f"acks=all, 3 replicas, min ISR 2, 1 KiB records at {rate}/s (latencies in microseconds)")
print(f"{'round':>5} {'mode':>7} {'ack p50':>8} {'ack p99':>8} {'e2e p50':>8} {'e2e p99':>8} {'msg/s':>8}"
      f" | {'window msg/s':>12} {'p50':>7} {'p99':>7}")
for x in rows:
    print(f"{x['round']:>5} {x['mode']:>7} {x['ack_p50_us']:>8} {x['ack_p99_us']:>8} {x['e2e_p50_us']:>8} "
          f"{x['e2e_p99_us']:>8} {x['produce_msgs_per_sec']:>8.0f} | {x['window_msgs_per_sec']:>12.0f} "
          f"{x['window_p50_us']:>7} {x['window_p99_us']:>7}")
for r in range(1, rounds + 1):
    a = next(x for x in rows if x["round"] == r and x["mode"] == modes[0])
    b = next(x for x in rows if x["round"] == r and x["mode"] == modes[1])
    ratio = {k: b[k] / max(a[k], 1) for k in ("ack_p50_us", "ack_p99_us", "e2e_p50_us", "e2e_p99_us",
                                               "window_msgs_per_sec", "window_p99_us")}
    print(f"round {r}: {modes[1]} / {modes[0]}: " + ", ".join(f"{k.removesuffix('_us')} {v:.3f}" for k, v in ratio.items()))
    summary["rounds"].append({modes[0]: a, modes[1]: b, "ratios": ratio})
json.dump(summary, open(f"{d}/repl-latency-{'-'.join(modes)}-summary.json", "w"), indent=1)
PY
