#!/usr/bin/env bash
# /tmp/ab.sh BROKER LABEL SECS RATE: 3 brokers (127.0.0.31-33), topic of 2 partitions x 3 replicas, acks=all at RATE/s, 1 KiB
set -euo pipefail
B=$1; L=$2; secs=${3:-15}; rate=${4:-2000}
M=/work/main/target/release
data=$(mktemp -d /var/tmp/ab.XXXXXX)
voters=1@127.0.0.31:19603,2@127.0.0.32:19603,3@127.0.0.33:19603
brokers=127.0.0.31:19603,127.0.0.32:19603,127.0.0.33:19603
for i in 1 2 3; do
  "$B" --node-id $i --listen 127.0.0.3$i:19603 --data-dir "$data/n$i" --voters $voters > "$data/n$i.out" 2> "$data/n$i.err" &
done
for i in 1 2 3; do for _ in $(seq 100); do grep -q ready "$data/n$i.out" 2>/dev/null && break; sleep 0.1; done; done
$M/skein --brokers $brokers topic create ab --partitions 2 --replicas 3 --config min.insync.replicas=2 > /dev/null
sleep 2
$M/skein-loadgen produce --brokers $brokers --topic ab --partitions 2 --replicas 3 --message-size 1024 --acks all \
  --rate "$rate" --duration "${secs}s" --warmup 2s --linger-ms 0 --report /tmp/ab-$L.json > /tmp/ab-$L.txt
pkill -f -- "--data-dir $data" || true
for _ in $(seq 150); do pgrep -f -- "--data-dir $data" > /dev/null || break; sleep 0.2; done
rm -rf "$data"; sync
python3 -c "
import json;r=json.load(open('/tmp/ab-$L.json'));l=r['latency_us'];c=r.get('cpu',{})
print('$L', 'msg/s %.0f'%r['messages_per_sec'], 'p50',l['p50'],'p99',l['p99'],'p999',l.get('p999'),'max',l['max'],'errors',r.get('errors'),'steal',c.get('machine_steal_pct'))"
