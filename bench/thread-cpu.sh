#!/usr/bin/env bash
# Usage: bench/thread-cpu.sh CORES  (from the repository root, after cargo build --release;
#        BIN_DIR=DIR takes skein-broker and skein-loadgen from DIR instead of target/release)
# One vs-iggy-style produce run (4,000,000 x 1000 B, 1 partition, acks=leader) against a fresh
# broker with --cores CORES, then the CPU seconds of each of its threads by name (shard 0 is
# the main thread; compio's blocking-pool threads, which run syncs that reserve space, and the
# kernel's io_uring workers (iou-wrk), which run the log's writes and fdatasyncs, are each shown
# together).
# per-thread CPU of a broker during one produce run
set -eu
cores=$1
bin=${BIN_DIR:-target/release}
d=$(mktemp -d /var/tmp/skein-thr.XXXX)
dd if=/dev/zero of=$d/warm bs=1M count=6144 status=none; rm $d/warm; sync
$bin/skein-broker --data-dir $d/b --listen 127.0.0.1:19613 --cores $cores > $d/out 2>$d/err &
pid=$!
for _ in $(seq 100); do grep -q ready $d/out && break; sleep 0.1; done
$bin/skein-loadgen produce --brokers 127.0.0.1:19613 --topic t --partitions 1 --message-size 1000 --messages 4000000 --warmup 0s --batch-bytes 1000000 --acks leader --report $d/r.json > /dev/null 2>&1
tck=$(getconf CLK_TCK)
for t in /proc/$pid/task/*; do
  # The main thread (tid = pid) is shard 0; other threads named like the process are compio's
  # blocking pool (fdatasyncs, peer connects).
  awk -v tck=$tck -v pid=$pid '{ n=$0; sub(/^[0-9]+ \(/, "", n); name=substr(n,1,index(n,") ")-1);
    if (name == "skein-broker") name = ($1 == pid) ? "shard-0" : "blocking-pool";
    if (name ~ /^iou-wrk-/) name = "iou-wrk";
    s=substr($0, index($0, ") ") + 2); split(s, f, " "); printf "%s %.2f\n", name, (f[12]+f[13])/tck }' $t/stat
done | awk '{a[$1]+=$2} END {for (k in a) printf "%-16s %6.2f s\n", k, a[k]}' | sort
python3 -c "import json;d=json.load(open('$d/r.json'));print('MB/s', round(d['bytes_per_sec']/1e6,1))"
kill $pid; wait $pid || true; rm -rf $d
