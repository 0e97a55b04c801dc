#!/usr/bin/env bash
# Skein against Apache Iggy, single node, the same workload on both, one run on this machine:
# 1 producer, 1 partition, 1000-byte messages, 1000 messages (~1 MB) per batch, 4,000,000
# messages (4 GB), no fsync per write (Iggy: its topic default; Skein: acks=leader and the
# topic created with flush.ms=never, FLUSH_MS to change it: with the broker's default
# flush.ms=always every record is fsynced before consumers see it, and the run is bounded by
# the disk's write bandwidth); then 1 consumer reading the same 4 GB back from the start.
#   Iggy:  iggy-server --fresh (2 shards here), then
#          iggy-bench -m 1000 -P 1000 -b 4000 pinned-producer -p 1 tcp --nodelay and
#          iggy-bench ... --reuse-streams pinned-consumer -c 1 tcp --nodelay
#   Skein: skein-broker (single node, all cores), then skein-loadgen produce --partitions 1
#          --message-size 1000 --batch-bytes 1000000 --acks leader --messages 4000000
#          --warmup 0s, and skein-loadgen consume --messages 4000000 --warmup 0s
#   Skein1: the same produce run with --max-in-flight-per-partition 1: iggy-bench's producer
#          awaits each batch's answer before sending the next, the loadgen keeps 5 in flight;
#          this run shows how much of the difference is that pipelining (produce only).
# Each server's CPU seconds are read alike for both, from /proc/PID/stat (utime + stime) just
# before and just after each client run, and divided by the GB (1e9 bytes of message values)
# written or read (Iggy's io_uring io-wq workers, which do its page-cache copies, are threads
# of its process and are counted). Before each server starts, WARM_MIB (6 GiB) are written and
# deleted on the data directory's filesystem: on this VM (virtio balloon), page-cache pages the
# guest has not used lately are slow to touch, so a run into cold pages costs more CPU than one
# into pages freed a moment before. A run writes 4 GB; with 3 GiB warmed, the rest went to
# cold pages and both servers' figures varied 2x between script runs minutes apart
# (bench/results/vs-iggy.md). Every run gets a fresh data directory and a fresh server.
# Runs alternate Iggy, Skein, Skein1, Iggy, Skein, Skein1... for ROUNDS rounds so all see the
# same machine.
# Output: a table per round. "MB/s" is 1e6 bytes of message values per second over each
# client's own measured time (Iggy: messages x 1000 / its "total time"; Skein: the loadgen
# report's bytes_per_sec); "iggy-own" is iggy-bench's own "Total throughput" (the mean of its
# 10 ms samples, for reference). "ratio" is Skein MB/s / Iggy MB/s of that round. "cpu s/GB" is
# the server's CPU per GB produced ("cons": read). The line under the table gives the ratio
# of the rounds' mean MB/s too. Issue 17's target: ratio >= 1.5 and Skein cpu s/GB <= Iggy's
# (the last line checks it in every round).
# Writes bench/results/vs-iggy-summary.json and raw client outputs bench/results/vs-iggy-*.
# Usage: [SKIP_BUILD=1] [MESSAGES=4000000] [WARM_MIB=6144] [FLUSH_MS=never] bench/vs-iggy.sh IGGY_RELEASE_DIR [ROUNDS]
# (IGGY_RELEASE_DIR holds iggy-server and iggy-bench; ../shared/peers/README.md says how to
# build them.) Iggy listens on its default ports (8090, 3000, 8080, 8092): they must be free.
set -euo pipefail
iggy_dir=$(realpath "${1:?usage: bench/vs-iggy.sh IGGY_RELEASE_DIR [ROUNDS]}")
rounds=${2:-2}
cd "$(dirname "$0")/.."
out=bench/results
mkdir -p "$out"
for b in iggy-server iggy-bench; do
  [ -x "$iggy_dir/$b" ] || { echo "no $iggy_dir/$b" >&2; exit 1; }
done
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  nice -n 10 cargo build --release -q -p skein-broker -p skein-loadgen
fi

messages=${MESSAGES:-4000000}
flush_ms=${FLUSH_MS:-never}
skein_addr=127.0.0.1:19611
iggy_addr=127.0.0.1:8090
data=$(mktemp -d /var/tmp/skein-vs-iggy.XXXXXX)
server_pid=
. bench/lib.sh
trap 'stop_server; rm -rf "$data"' EXIT

wait_port() { # host:port
  for _ in $(seq 150); do
    ss -ltn | awk '{print $4}' | grep -qx "$1" && return
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  exit 1
}
port_free() {
  if ss -ltn | awk '{print $4}' | grep -qx "$1"; then echo "$1 is already in use" >&2; exit 1; fi
}
# Runs a client between two CPU readings of the server; prints "cpu_seconds".
measured() { # log command...
  local log=$1 before after
  shift
  before=$(cpu_seconds "$server_pid")
  "$@" > "$log" 2>&1 || { echo "failed: $* (see $log)" >&2; tail -5 "$log" >&2; exit 1; }
  after=$(cpu_seconds "$server_pid")
  echo "$before $after" | awk '{ printf "%.2f\n", $2 - $1 }'
}

run_iggy() { # round
  local r=$1 dir="$data/iggy-$1" pc cc
  port_free "$iggy_addr"
  warm_page_cache
  IGGY_SYSTEM_PATH="$dir" "$iggy_dir/iggy-server" --fresh --with-default-root-credentials \
    > "$data/iggy-$r-server.log" 2>&1 &
  server_pid=$!
  wait_port "$iggy_addr"
  echo "== iggy, round $r: produce" >&2
  pc=$(measured "$out/vs-iggy-iggy-$r-produce.txt" "$iggy_dir/iggy-bench" -m 1000 -P 1000 -b $((messages / 1000)) \
    pinned-producer -p 1 tcp --server-address "$iggy_addr" --nodelay)
  echo "== iggy, round $r: consume" >&2
  cc=$(measured "$out/vs-iggy-iggy-$r-consume.txt" "$iggy_dir/iggy-bench" -m 1000 -P 1000 -b $((messages / 1000)) \
    --reuse-streams pinned-consumer -c 1 tcp --server-address "$iggy_addr" --nodelay)
  echo "{\"produce_cpu_seconds\": $pc, \"consume_cpu_seconds\": $cc, \"server_pid\": $server_pid}" \
    > "$out/vs-iggy-iggy-$r-cpu.json"
  stop_server
  rm -rf "$dir"
}

run_skein() { # side round; side: skein (loadgen default, 5 requests in flight) or skein1 (1 in flight)
  local side=$1 r=$2 dir="$data/$1-$2" pc cc=null inflight=5
  [ "$side" = skein1 ] && inflight=1
  port_free "$skein_addr"
  warm_page_cache
  target/release/skein-broker --data-dir "$dir" --listen "$skein_addr" > "$data/$side-$r-broker.log" 2>&1 &
  server_pid=$!
  wait_port "$skein_addr"
  local common=(--brokers "$skein_addr" --topic t --partitions 1 --message-size 1000 --messages "$messages"
    --warmup 0s --broker-pid "$server_pid")
  echo "== $side ($inflight in flight), round $r: produce" >&2
  pc=$(measured "$out/vs-iggy-$side-$r-produce.txt" target/release/skein-loadgen produce "${common[@]}" \
    --batch-bytes 1000000 --acks leader --max-in-flight-per-partition "$inflight" \
    --topic-config "flush.ms=$flush_ms" --report "$out/vs-iggy-$side-$r-produce.json")
  # The read side does not depend on the producer's pipelining: only the default run reads.
  if [ "$side" = skein ]; then
    echo "== $side, round $r: consume" >&2
    cc=$(measured "$out/vs-iggy-$side-$r-consume.txt" target/release/skein-loadgen consume "${common[@]}" \
      --report "$out/vs-iggy-$side-$r-consume.json")
  fi
  echo "{\"produce_cpu_seconds\": $pc, \"consume_cpu_seconds\": $cc, \"server_pid\": $server_pid}" \
    > "$out/vs-iggy-$side-$r-cpu.json"
  stop_server
  rm -rf "$dir"
}

for r in $(seq "$rounds"); do
  run_iggy "$r"
  run_skein skein "$r"
  run_skein skein1 "$r"
done

python3 - "$out" "$rounds" "$messages" "$(git rev-parse --short HEAD)" <<'PY'
import json, re, sys
d, rounds, messages, commit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ansi = re.compile(r"\x1b\[[0-9;]*m")

def iggy(path):
    text = ansi.sub("", open(path).read())
    m = re.search(r"Results: Total throughput: ([0-9.]+) MB/s.*?total time: ([0-9.]+) s", text)
    n = re.search(r", (\d+) messages, \d+ messages per batch", text)
    count = int(n.group(1)) if n else messages
    secs = float(m.group(2))
    return {"messages": count, "seconds": secs, "mb_per_s": count * 1000 / 1e6 / secs,
            "mb_per_s_own": float(m.group(1))}

def skein(path):
    rep = json.load(open(path))
    return {"messages": rep["messages"], "seconds": rep["seconds"], "mb_per_s": rep["bytes_per_sec"] / 1e6,
            "broker_cpu_seconds_loadgen": rep.get("broker_cpu_seconds")}

summary = {"commit": commit, "messages": messages, "message_bytes": 1000, "rounds": []}
rows = []
for r in range(1, rounds + 1):
    row = {"round": r}
    for side, parse, ext in (("iggy", iggy, "txt"), ("skein", skein, "json")):
        cpu = json.load(open(f"{d}/vs-iggy-{side}-{r}-cpu.json"))
        p, c = parse(f"{d}/vs-iggy-{side}-{r}-produce.{ext}"), parse(f"{d}/vs-iggy-{side}-{r}-consume.{ext}")
        gb_p, gb_c = p["messages"] * 1000 / 1e9, c["messages"] * 1000 / 1e9
        row[side] = {"produce": p, "consume": c,
                     "produce_cpu_seconds": cpu["produce_cpu_seconds"], "consume_cpu_seconds": cpu["consume_cpu_seconds"],
                     "produce_cpu_s_per_gb": cpu["produce_cpu_seconds"] / gb_p,
                     "consume_cpu_s_per_gb": cpu["consume_cpu_seconds"] / gb_c}
    cpu1 = json.load(open(f"{d}/vs-iggy-skein1-{r}-cpu.json"))
    p1 = skein(f"{d}/vs-iggy-skein1-{r}-produce.json")
    row["skein1"] = {"produce": p1, "produce_cpu_seconds": cpu1["produce_cpu_seconds"],
                     "produce_cpu_s_per_gb": cpu1["produce_cpu_seconds"] / (p1["messages"] * 1000 / 1e9)}
    row["ratio_produce_skein1"] = p1["mb_per_s"] / row["iggy"]["produce"]["mb_per_s"]
    row["ratio_produce"] = row["skein"]["produce"]["mb_per_s"] / row["iggy"]["produce"]["mb_per_s"]
    row["ratio_consume"] = row["skein"]["consume"]["mb_per_s"] / row["iggy"]["consume"]["mb_per_s"]
    row["target_met"] = (row["ratio_produce"] >= 1.5
                         and row["skein"]["produce_cpu_s_per_gb"] <= row["iggy"]["produce_cpu_s_per_gb"])
    summary["rounds"].append(row)

hdr = ("round", "iggy MB/s", "(iggy-own)", "skein MB/s", "ratio", "iggy cpu s/GB", "skein cpu s/GB",
       "iggy cons MB/s", "skein cons MB/s", "cons ratio", "iggy cons cpu s/GB", "skein cons cpu s/GB",
       "skein1 MB/s", "skein1 ratio", "skein1 cpu s/GB")
print(" | ".join(hdr))
for row in summary["rounds"]:
    i, s = row["iggy"], row["skein"]
    print(" | ".join([str(row["round"]), f"{i['produce']['mb_per_s']:.0f}", f"{i['produce']['mb_per_s_own']:.0f}",
                      f"{s['produce']['mb_per_s']:.0f}", f"{row['ratio_produce']:.2f}",
                      f"{i['produce_cpu_s_per_gb']:.2f}", f"{s['produce_cpu_s_per_gb']:.2f}",
                      f"{i['consume']['mb_per_s']:.0f}", f"{s['consume']['mb_per_s']:.0f}",
                      f"{row['ratio_consume']:.2f}",
                      f"{i['consume_cpu_s_per_gb']:.2f}", f"{s['consume_cpu_s_per_gb']:.2f}",
                      f"{row['skein1']['produce']['mb_per_s']:.0f}", f"{row['ratio_produce_skein1']:.2f}",
                      f"{row['skein1']['produce_cpu_s_per_gb']:.2f}"]))
mean = lambda side, k: sum(r[side][k]["mb_per_s"] for r in summary["rounds"]) / rounds
summary["ratio_produce_of_means"] = mean("skein", "produce") / mean("iggy", "produce")
summary["ratio_consume_of_means"] = mean("skein", "consume") / mean("iggy", "consume")
summary["ratio_produce_skein1_of_means"] = mean("skein1", "produce") / mean("iggy", "produce")
summary["ratio_produce_min"] = min(r["ratio_produce"] for r in summary["rounds"])
json.dump(summary, open(f"{d}/vs-iggy-summary.json", "w"), indent=2)
print(f"produce: Skein/Iggy of the mean MB/s {summary['ratio_produce_of_means']:.2f}, lowest round "
      f"{summary['ratio_produce_min']:.2f}; consume: of the means {summary['ratio_consume_of_means']:.2f}; "
      f"produce with Skein at 1 request in flight (as iggy-bench): {summary['ratio_produce_skein1_of_means']:.2f}")
met = all(r["target_met"] for r in summary["rounds"])
print(f"issue 17 target (Skein >= 1.5 x Iggy MB/s and Skein broker cpu s/GB <= Iggy's, every round): "
      f"{'met' if met else 'not met'}")
PY
