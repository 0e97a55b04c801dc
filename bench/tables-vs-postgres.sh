#!/usr/bin/env bash
# Tables against PostgreSQL 15 SERIALIZABLE (issue 20): pgserbench's workloads on a Skein
# table (`skein-loadgen tables`, a local cluster per run, flush.ms=always) and on PostgreSQL
# (/work/shared/peers/postgres/run.sh, synchronous_commit=on), alternating: for each case,
# PostgreSQL first, then every Skein level at r=1, then the serializable levels at r=3.
#
#   bench/tables-vs-postgres.sh            every case, 10 s per run, C=8
#   CASES="transfer10" LEVELS="serial ssi" R3_LEVELS= SECS=5 bench/tables-vs-postgres.sh
#   bench/tables-vs-postgres.sh summary     markdown tables of $OUT (as in bench/RESULTS.md)
#
# Env: SECS (10), CLIENTS (8), CASES ("transfer10 transfer10k append100"), LEVELS (r=1 levels),
# R3_LEVELS (r=3 levels), R3_FSYNC (the r=3 runs' flush.ms: `always`, a commit waits for the
# fdatasync on every replica; or milliseconds, Kafka's model: acks=all makes a commit durable
# by replication, each replica syncs on its interval), OUT (bench/results/tables-pg), PG_DIR
# (/work/shared/peers/postgres),
# WARM_MIB (4096; 0: no page cache warm-up), SKIP_PG=1 (Skein only), BROKER_ARGS (extra
# loadgen arguments for the local brokers, e.g. "--broker-arg=--cores --broker-arg=1").
# Reports: $OUT/skein-CASE-LEVEL-rR.json, $OUT/pg-CASE.json (copied from run.sh's results).
# Build first: cargo build --release --locked -p skein-broker -p skein-loadgen
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SECS=${SECS:-10}
CLIENTS=${CLIENTS:-8}
CASES=${CASES:-"transfer10 transfer10k append100"}
LEVELS=${LEVELS:-"serial serializable ssi 2pl snapshot read-committed"}
R3_LEVELS=${R3_LEVELS-"serial serializable ssi 2pl"}
OUT=${OUT:-$ROOT/bench/results/tables-pg}
PG_DIR=${PG_DIR:-/work/shared/peers/postgres}
LOADGEN=$ROOT/target/release/skein-loadgen
BROKER=$ROOT/target/release/skein-broker
mkdir -p "$OUT"

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }

case_args() {
  case $1 in
    transfer10) echo "--workload transfer --accounts 10" ;;
    transfer10k) echo "--workload transfer --accounts 10000" ;;
    append100) echo "--workload append --keys 100" ;;
    *) log "unknown case $1"; return 1 ;;
  esac
}

warm() {
  [ "${WARM_MIB:-4096}" -gt 0 ] || return 0
  sync
  dd if=/dev/zero of=/tmp/tables-warm bs=1M count="${WARM_MIB:-4096}" status=none
  rm -f /tmp/tables-warm
  sync
}

skein() { # skein CASE LEVEL REPLICAS [FLUSH_MS]
  local fsync=${4:-always} suffix=
  [ "$fsync" = always ] || suffix=-flush$fsync
  local out=$OUT/skein-$1-$2-r$3$suffix.json
  log "skein $1 $2 r=$3 flush.ms=$fsync"
  # shellcheck disable=SC2046
  "$LOADGEN" tables --broker-bin "$BROKER" --replicas "$3" --isolation "$2" --clients "$CLIENTS" \
    --seconds "$SECS" --fsync "$fsync" --report "$out" $(case_args "$1") ${BROKER_ARGS:-} | sed -n 1p ||
    log "skein $1 $2 r=$3 failed"
}

pg() { # pg CASE
  [ -z "${SKIP_PG:-}" ] || return 0
  log "postgres $1"
  (cd "$PG_DIR" && SECS=$SECS VARIANTS=on CLIENTS=$CLIENTS CASES=$1 ./run.sh > /dev/null 2>&1) ||
    log "postgres $1: run.sh failed"
  cp /tmp/pgbench-anchor/results/latest/scon-"$1"-c"$CLIENTS".json "$OUT/pg-$1.json" 2> /dev/null || true
  python3 - "$OUT/pg-$1.json" "$1" << 'EOF' || true
import json, sys
r = json.load(open(sys.argv[1]))
l = r["latency_us"]
print(f"postgres  {sys.argv[2]:<24} C={r['clients']} {r['commits_per_sec']:>9.1f} commits/s "
      f"{100 * r['abort_rate']:>6.2f}% aborts  p50 {l['p50'] / 1000:.2f} p99 {l['p99'] / 1000:.2f} ms  "
      f"invariant {r['invariant_ok']}  other CPU {r['cpu']['other_pct_of_one_core']}%")
EOF
}

summary() { # markdown tables of $OUT, one per case (as in bench/RESULTS.md)
  python3 - "$OUT" << 'PY'
import glob, json, os, sys
d = sys.argv[1]
order = ["serial", "serializable", "ssi", "2pl", "snapshot", "read-committed"]
for case, title in [("transfer10", "transfer, 10 accounts"), ("transfer10k", "transfer, 10,000 accounts"),
                    ("append100", "list append, 100 keys")]:
    pg_path = os.path.join(d, f"pg-{case}.json")
    pg = json.load(open(pg_path)) if os.path.exists(pg_path) else None
    runs = [json.load(open(p)) for p in glob.glob(os.path.join(d, f"skein-{case}-*.json"))]
    runs.sort(key=lambda r: (r["replicas"], r["fsync"] != "flush.ms=always", order.index(r["level"])))
    if not runs and not pg:
        continue
    print(f"\n{title}, C={(pg or runs[0])['clients']}:\n")
    # Steal: the share of the machine's time the host took from the guest during the run;
    # more than a few percent and the run's figure says more about the host than the system.
    print("| system | level | replicas | durability | commits/s | ratio to PG | abort share | p50 ms | p99 ms | invariant | other CPU % | steal % |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
    rows = ([("PostgreSQL 15", "SERIALIZABLE", "1", "synchronous_commit=on", pg)] if pg else []) + \
           [("Skein", r["level"], str(r["replicas"]), r["fsync"], r) for r in runs]
    for system, level, rep, durability, r in rows:
        l = r["latency_us"]
        ratio = f"{r['commits_per_sec'] / pg['commits_per_sec']:.2f}x" if pg else "-"
        inv = "ok" if r["invariant_ok"] else "**FAIL**"
        if r.get("errors"):
            inv += f" ({r['errors']} unknown)"
        print(f"| {system} | {level} | {rep} | {durability} | {r['commits_per_sec']:.0f} | {ratio} | {100 * r['abort_rate']:.1f}% | "
              f"{l['p50'] / 1000:.2f} | {l['p99'] / 1000:.2f} | {inv} | {r['cpu']['other_pct_of_one_core']:.0f} | "
              f"{r['cpu'].get('machine_steal_pct', float('nan')):.0f} |")
PY
}

if [ "${1:-}" = summary ]; then
  summary
  exit 0
fi

warm
for c in $CASES; do
  pg "$c"
  for l in $LEVELS; do skein "$c" "$l" 1; done
  for l in $R3_LEVELS; do skein "$c" "$l" 3 "${R3_FSYNC:-always}"; done
done
summary
