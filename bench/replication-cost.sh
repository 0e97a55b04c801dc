#!/usr/bin/env bash
# Replication cost, one run on this machine: produce throughput of a 3-broker cluster (every
# broker a process on 127.0.0.11-13, replication 3, acks=all) over a single broker
# (replication 1, acks=all), same load generator settings (8 partitions, 8 producers, 1 KiB
# records, 64 KiB batches). Writes bench/results/replication-*.json and prints the ratio.
# Usage: bench/replication-cost.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
out=bench/results
mkdir -p "$out"
cargo build --release -q -p skein-broker -p skein-loadgen -p skein-client
data=$(mktemp -d /var/tmp/skein-replication.XXXXXX)
trap 'pkill -f "skein-broker.*$data" || true; rm -rf "$data"' EXIT
# Touch the page cache the runs will write into first (see bench/RESULTS.md, "first-touch").
prewarm=${PREWARM_GIB:-8}
if [ "$prewarm" -gt 0 ]; then
  dd if=/dev/zero of="$data/prewarm" bs=1M count=$((prewarm * 1024)) status=none
  rm -f "$data/prewarm"
fi
wait_ready() { for _ in $(seq 100); do grep -q ready "$1" 2>/dev/null && return; sleep 0.1; done; echo "no ready in $1" >&2; exit 1; }
load() { # name brokers replicas
  target/release/skein-loadgen produce --brokers "$2" --topic "rep$3" --partitions 8 --replicas "$3" \
    --message-size 1024 --batch-bytes 65536 --acks all --producers 8 --duration "${secs}s" --warmup 2s \
    --report "$out/$1.json" | tee "$out/$1.txt"
}

echo "== single broker, replication 1" >&2
target/release/skein-broker --listen 127.0.0.1:19401 --data-dir "$data/single" > "$data/single.out" 2>/dev/null &
wait_ready "$data/single.out"
load replication-single-rf1 127.0.0.1:19401 1
pkill -f "skein-broker --listen 127.0.0.1:19401" || true
# Free the first run's pages (recycled, warm) and let its writeback finish, so the second run's
# fsyncs do not queue behind it.
sleep 1
rm -rf "$data/single"
sync
sleep 2

echo "== 3 brokers, replication 3" >&2
voters=1@127.0.0.11:19402,2@127.0.0.12:19402,3@127.0.0.13:19402
for i in 1 2 3; do
  target/release/skein-broker --node-id $i --listen 127.0.0.1$i:19402 --data-dir "$data/n$i" --voters $voters \
    > "$data/n$i.out" 2>"$data/n$i.err" &
done
for i in 1 2 3; do wait_ready "$data/n$i.out"; done
sleep 1
load replication-cluster-rf3 127.0.0.11:19402,127.0.0.12:19402,127.0.0.13:19402 3
target/release/skein --brokers 127.0.0.11:19402 topic describe rep3 | tee "$out/replication-cluster-rf3-describe.txt"

python3 - "$out" <<'PY'
import json, sys
d = sys.argv[1]
one = json.load(open(f"{d}/replication-single-rf1.json"))
three = json.load(open(f"{d}/replication-cluster-rf3.json"))
ratio = three["bytes_per_sec"] / one["bytes_per_sec"]
print(f"single broker rf1 acks=all: {one['bytes_per_sec']/1e6:.1f} MB/s, p99 {one['latency_us']['p99']} us")
print(f"3 brokers rf3 acks=all:     {three['bytes_per_sec']/1e6:.1f} MB/s, p99 {three['latency_us']['p99']} us")
print(f"ratio {ratio:.3f} (goal >= 0.25)")
json.dump({"single_rf1_bytes_per_sec": one["bytes_per_sec"], "cluster_rf3_bytes_per_sec": three["bytes_per_sec"],
           "ratio": ratio}, open(f"{d}/replication-summary.json", "w"), indent=1)
PY
