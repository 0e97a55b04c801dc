#!/usr/bin/env bash
# Measures the loadgen issue's figures in one run on this machine and writes JSON reports,
# HdrHistogram logs and SVG plots into bench/results/. Each figure is a ratio of numbers from
# this same run (the machine is shared and noisy). Usage: bench/loadgen-figures.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
out=bench/results
mkdir -p "$out"
cargo build --release -q -p skein-broker -p skein-loadgen -p skein-client
lg=target/release/skein-loadgen
data=$(mktemp -d /var/tmp/skein-figures.XXXXXX)
trap 'pkill -f "skein-broker --data-dir $data" || true; rm -rf "$data"' EXIT

start_broker() { # cores port
  rm -rf "$data/b$1"
  target/release/skein-broker --cores "$1" --listen "127.0.0.1:$2" --data-dir "$data/b$1" > "$data/ready$1" 2>/dev/null &
  for _ in $(seq 100); do grep -q ready "$data/ready$1" 2>/dev/null && break; sleep 0.1; done
  pgrep -f "skein-broker --cores $1 --listen 127.0.0.1:$2" | head -1
}
run() { # name args... (args must start with --brokers B --topic T)
  local name=$1; shift
  echo "== $name: $*" >&2
  recycle
  "$lg" "$@" --duration "${secs}s" --warmup 2s --report "$out/$name.json" --hdr "$out/$name.hlog" | tee "$out/$name.txt"
  # Delete the run's data so the next run writes into recycled (warm) pages, as every run does.
  target/release/skein --brokers "$3" topic delete "$5" >/dev/null
}

# This VM pays a large cost the first time the guest touches a page of memory (the host
# faults it in): writes into never-touched page cache run at about a third of the speed of
# writes into recycled pages. A long-running server recycles pages; a fresh VM does not. So
# touch the memory the run will use first (write and delete a file), for the ceilings and the
# broker alike. Set PREWARM_GIB=0 to skip.
prewarm=${PREWARM_GIB:-12}
# The host takes freed guest memory back within seconds (not always), so pages a run freed can
# be cold again by the next run: every run first writes and deletes RECYCLE_GIB (default 6) so
# it starts on recycled pages, as a long-running server does. RECYCLE_GIB=0 skips this.
recycle() {
  if [ "${RECYCLE_GIB:-6}" -gt 0 ]; then
    dd if=/dev/zero of="$data/recycle" bs=1M count=$((${RECYCLE_GIB:-6} * 1024)) status=none
    rm -f "$data/recycle"
  fi
}
if [ "$prewarm" -gt 0 ]; then
  echo "== pre-warming ${prewarm} GiB of page cache" >&2
  dd if=/dev/zero of="$data/prewarm" bs=1M count=$((prewarm * 1024)) status=none
  rm -f "$data/prewarm"
fi

echo "== limits" >&2
"$lg" limits --data-dir "$data" --batch-bytes 65536 --duration 3s --report "$out/limits.json" | tee "$out/limits.txt"

pid=$(start_broker 2 19301)
run f1-produce-1p-leader produce --brokers 127.0.0.1:19301 --topic f1 --partitions 1 --message-size 1024 \
  --batch-bytes 65536 --acks leader --producers 1 --broker-pid "$pid"
run f3-produce-8p-leader-8prod produce --brokers 127.0.0.1:19301 --topic f3l --partitions 8 --message-size 1024 \
  --batch-bytes 65536 --acks leader --producers 8 --broker-pid "$pid"
run f3-produce-8p-all-8prod produce --brokers 127.0.0.1:19301 --topic f3a --partitions 8 --message-size 1024 \
  --batch-bytes 65536 --acks all --producers 8 --broker-pid "$pid"
run f4-e2e-max e2e --brokers 127.0.0.1:19301 --topic f4m --partitions 1 --message-size 1024 \
  --batch-bytes 65536 --linger-ms 1 --acks leader
max=$(python3 -c "import json;print(json.load(open('$out/f4-e2e-max.json'))['messages_per_sec'])")
half=$(python3 -c "print(int($max/2))")
run f4-e2e-half-rate e2e --brokers 127.0.0.1:19301 --topic f4 --partitions 1 --message-size 1024 \
  --batch-bytes 65536 --linger-ms 1 --acks leader --rate "$half" --plot "$out/f4-e2e-half-rate.svg"
pkill -f "skein-broker --cores 2 --listen 127.0.0.1:19301" || true

# f4 again on a one-shard broker: a one-partition topic lives on one shard either way, and the
# second core is left to the load generator.
pid=$(start_broker 1 19302)
run f4-e2e-max-cores1 e2e --brokers 127.0.0.1:19302 --topic f4m --partitions 1 --message-size 1024 \
  --batch-bytes 65536 --linger-ms 1 --acks leader
max=$(python3 -c "import json;print(json.load(open('$out/f4-e2e-max-cores1.json'))['messages_per_sec'])")
half=$(python3 -c "print(int($max/2))")
run f4-e2e-half-rate-cores1 e2e --brokers 127.0.0.1:19302 --topic f4 --partitions 1 --message-size 1024 \
  --batch-bytes 65536 --linger-ms 1 --acks leader --rate "$half" --plot "$out/f4-e2e-half-rate-cores1.svg"
pkill -f "skein-broker --cores 1 --listen 127.0.0.1:19302" || true

# f2: how much the memory the run writes into was recently touched moves the broker's CPU per GB
# by up to 2x on this VM (see RESULTS.md), so the two broker configurations alternate, each run
# on a fresh broker, in ABBA order (cores 1, 2, 2, 1) per round; the figure is the median of the
# rounds' ratios.
rounds=${F2_ROUNDS:-2}
rm -f "$out"/f2-r*
for r in $(seq "$rounds"); do
  for c in 1 2 2 1; do
    n=0; [ -e "$out/f2-r$r-cores$c-0.json" ] && n=1
    pid=$(start_broker "$c" $((19310 + c)))
    run f2-r"$r"-cores"$c"-"$n" produce --brokers 127.0.0.1:$((19310 + c)) --topic f2 --partitions 8 --message-size 1024 \
      --batch-bytes 65536 --acks leader --producers 2 --broker-pid "$pid"
    pkill -f "skein-broker --cores $c --listen 127.0.0.1:$((19310 + c))" || true
    sleep 0.5
  done
done

"$lg" plot "$out/f1-produce-1p-leader.json" "$out/f3-produce-8p-leader-8prod.json" "$out/f3-produce-8p-all-8prod.json" \
  "$out/f4-e2e-half-rate.json" -o "$out/latency.svg"
python3 - "$out" "$rounds" <<'PY'
import json, sys, statistics
d, rounds = sys.argv[1], int(sys.argv[2])
j = lambda n: json.load(open(f"{d}/{n}.json"))
lim, f1 = j("limits"), j("f1-produce-1p-leader")
lead, all_ = j("f3-produce-8p-leader-8prod"), j("f3-produce-8p-all-8prod")
e2e, e2e1 = j("f4-e2e-half-rate"), j("f4-e2e-half-rate-cores1")
cpu_gb = lambda r: r["broker_cpu_seconds"] / (r["bytes"] / 1e9)
tp, cpu, lg = [], [], []
for r in range(1, rounds + 1):
    # ABBA: the first cores-1 run pairs with the first cores-2 run, the second with the second.
    for n in (0, 1):
        c1, c2 = j(f"f2-r{r}-cores1-{n}"), j(f"f2-r{r}-cores2-{n}")
        tp.append(c2["bytes_per_sec"] / c1["bytes_per_sec"])
        cpu.append(cpu_gb(c2) / cpu_gb(c1))
        lg.extend(r["loadgen_cpu_seconds"] / (r["bytes"] / 1e9) for r in (c1, c2))
rows = [
  ("f1 1 producer, acks=leader / loopback TCP", f1["bytes_per_sec"] / lim["tcp_bytes_per_sec"], ">= 0.5"),
  ("f1 1 producer, acks=leader / disk write", f1["bytes_per_sec"] / lim["disk_write_bytes_per_sec"], "(context)"),
  ("f2 throughput --cores 2 / --cores 1 (median)", statistics.median(tp), ">= 1.25"),
  ("f2 broker CPU per GB, cores 2 / cores 1 (median)", statistics.median(cpu), "<= 1.15"),
  ("f3 acks=all / acks=leader, 8 producers", all_["bytes_per_sec"] / lead["bytes_per_sec"], ">= 0.6"),
  ("f4 --cores 2: e2e max rate (records/s)", j("f4-e2e-max")["messages_per_sec"], "(context)"),
  ("f4 --cores 2: e2e p99 at half max (ms)", e2e["latency_us"]["p99"] / 1000, "<= 1"),
  ("f4 --cores 2: e2e p99.9 at half max (ms)", e2e["latency_us"]["p999"] / 1000, "<= 5"),
  ("f4 --cores 2: steal during it (ms, both CPUs)", 1000 * (e2e.get("steal_seconds") or 0), "(context)"),
  ("f4 --cores 1: e2e max rate (records/s)", j("f4-e2e-max-cores1")["messages_per_sec"], "(context)"),
  ("f4 --cores 1: e2e p99 at half max (ms)", e2e1["latency_us"]["p99"] / 1000, "<= 1"),
  ("f4 --cores 1: e2e p99.9 at half max (ms)", e2e1["latency_us"]["p999"] / 1000, "<= 5"),
  ("f4 --cores 1: steal during it (ms, both CPUs)", 1000 * (e2e1.get("steal_seconds") or 0), "(context)"),
  ("f2 loadgen CPU per GB, median of all runs", statistics.median(lg), "(context)"),
]
for i, (a, b) in enumerate(zip(tp, cpu)):
    print(f"f2 pair {i + 1}: throughput {a:.3f}, CPU per GB {b:.3f}")
summary = {name: round(v, 3) for name, v, _ in rows}
summary["f2 pairs [throughput, CPU per GB]"] = [[round(a, 3), round(b, 3)] for a, b in zip(tp, cpu)]
json.dump(summary, open(f"{d}/summary.json", "w"), indent=2)
for name, v, goal in rows:
    print(f"{name:<45} {v:>9.3f}   goal {goal}")
PY
