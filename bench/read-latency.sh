#!/usr/bin/env bash
# Follower reads against leader reads, one run on this machine: a 3-broker cluster (processes
# on 127.0.0.11-13, racks r1-r3), one topic with replication 3 and acks=all producers at a fixed
# rate; end-to-end latency (send to receipt) with consumers reading from the leader, then from
# a follower (--prefer-replica closest with the follower's rack), on the same cluster and
# topic. Each consumer keeps a session (monotonic reads), so the reports also give the share
# of reads that waited for a replica to catch up or were sent to the leader.
# Writes bench/results/read-{leader,follower}.json and read-latency-summary.json.
# Usage: bench/read-latency.sh [SECONDS] [RATE]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rate=${2:-2000}
out=bench/results
mkdir -p "$out"
cargo build --release -q -p skein-broker -p skein-loadgen -p skein-client
data=$(mktemp -d /var/tmp/skein-reads.XXXXXX)
trap 'pkill -f "skein-broker.*$data" || true; sleep 1; rm -rf "$data"' EXIT
wait_ready() { for _ in $(seq 100); do grep -q ready "$1" 2>/dev/null && return; sleep 0.1; done; echo "no ready in $1" >&2; exit 1; }

voters=1@127.0.0.11:19403/r1,2@127.0.0.12:19403/r2,3@127.0.0.13:19403/r3
brokers=127.0.0.11:19403,127.0.0.12:19403,127.0.0.13:19403
for i in 1 2 3; do
  target/release/skein-broker --node-id $i --listen 127.0.0.1$i:19403 --data-dir "$data/n$i" --voters $voters \
    > "$data/n$i.out" 2>"$data/n$i.err" &
done
for i in 1 2 3; do wait_ready "$data/n$i.out"; done
target/release/skein --brokers $brokers topic create reads --partitions 1 --replicas 3 >/dev/null
sleep 2
leader=$(target/release/skein --brokers $brokers topic describe reads | awk '$1 == "0" {print $2}')
target/release/skein --brokers $brokers topic describe reads | tee "$out/read-latency-describe.txt"
[ -n "$leader" ] || { echo "no leader found for reads/0" >&2; exit 1; }
follower=$(( leader % 3 + 1 ))
echo "leader $leader, reading from follower $follower (rack r$follower)" >&2

e2e() { # name prefer-replica [rack]
  target/release/skein-loadgen e2e --brokers $brokers --topic reads --partitions 1 --replicas 3 \
    --message-size 1024 --acks all --rate "$rate" --duration "${secs}s" --warmup 2s \
    --prefer-replica "$2" ${3:+--rack "$3"} --report "$out/$1.json" | tee "$out/$1.txt"
}
echo "== consumers read from the leader" >&2
e2e read-leader leader
echo "== consumers read from follower $follower" >&2
e2e read-follower closest "r$follower"

python3 - "$out" <<'PY'
import json, sys
d = sys.argv[1]
lead = json.load(open(f"{d}/read-leader.json"))
fol = json.load(open(f"{d}/read-follower.json"))
def row(name, r):
    l, reads = r["latency_us"], r.get("reads") or {}
    n = max(reads.get("fetches", 0), 1)
    print(f"{name:<9} p50 {l['p50']:>6} us  p99 {l['p99']:>6} us  p99.9 {l['p999']:>6} us  "
          f"answers {reads.get('fetches', 0):>7}  from followers {100*reads.get('follower_reads', 0)/n:5.1f} %  "
          f"waited {100*reads.get('waited_share', 0):5.2f} %  redirected {100*reads.get('redirected_share', 0):5.2f} %")
row("leader", lead)
row("follower", fol)
ratio = fol["latency_us"]["p99"] / max(lead["latency_us"]["p99"], 1)
print(f"e2e p99 follower / leader = {ratio:.3f}")
json.dump({"leader_p99_us": lead["latency_us"]["p99"], "follower_p99_us": fol["latency_us"]["p99"],
           "p99_ratio": ratio, "leader_reads": lead.get("reads"), "follower_reads": fol.get("reads")},
          open(f"{d}/read-latency-summary.json", "w"), indent=1)
PY
