//! Simulator seeds as tests: planted bugs are caught (naming the violated property), seeds
//! that once found real bugs stay green, and a block of seeds passes.

use skein_broker::core::replica::Plant;
use skein_broker::sim::{run, SimConfig};

/// Runs seeds from 0 until one fails naming one of `expected_any` (up to `budget` seeds);
/// returns that seed and all its failed properties, and every other property seen failing.
fn first_catch(plant: Plant, budget: u64, expected_any: &[&str]) -> (Option<(u64, Vec<String>)>, Vec<String>) {
    let mut seen = Vec::new();
    for seed in 0..budget {
        let out = run(&SimConfig { plant, ..SimConfig::new(seed) });
        let props = out.failed_properties();
        if props.iter().any(|p| expected_any.contains(&p.as_str())) {
            return (Some((seed, props)), seen);
        }
        seen.extend(props);
    }
    (None, seen)
}

fn assert_caught(plant: Plant, expected_any: &[&str]) {
    let (caught, seen) = first_catch(plant, 50, expected_any);
    assert!(caught.is_some(), "{plant:?} not caught as any of {expected_any:?} in 50 seeds (other failures: {seen:?})");
}

#[test]
fn planted_early_ack_is_caught_as_lost_acknowledged_writes() {
    assert_caught(Plant::named("early-ack").expect("known"), &["unread-ack", "lost-write"]);
}

#[test]
fn planted_no_truncation_is_caught_as_diverging_committed_logs() {
    assert_caught(Plant::named("no-truncation").expect("known"), &["committed-prefix", "inconsistent-offset"]);
}

#[test]
fn planted_no_fencing_is_caught_as_split_brain() {
    assert_caught(Plant::named("no-fencing").expect("known"), &["split-brain", "inconsistent-offset", "lost-write"]);
}

#[test]
fn planted_no_idempotence_is_caught_as_duplicates() {
    assert_caught(Plant::named("no-idempotence").expect("known"), &["duplicate"]);
}

/// Seeds that found real bugs while the core was written; each must keep passing.
const REGRESSION_SEEDS: &[(u64, &str)] = &[
    (465, "a leader restarted within its session resumed its old epoch and re-used offsets its followers held"),
    (150, "a late duplicate Diverging answer truncated records fetched (and committed) since"),
    (102, "a new leader served reads with a high watermark below the one readers had seen"),
    (391, "a disk fault armed before a crash fired during recovery and was reported as corruption"),
    (89, "a follower's high watermark moved backwards (stale fetch answer)"),
    (767, "a replaced (corrupt) log was wiped for every partition and its broker led with an empty log"),
    (1147, "acks=all committed on the last ISR member alone, which then restarted without it (KIP-966)"),
    (2719, "a lost fsync undid a truncation; the epoch cache did not describe the returned batches"),
    (2472, "a late heartbeat of a dead process looked like a restart: a second leader while the first held its lease"),
    (1969, "a new active controller committed a tick before restarting sessions and fenced every broker"),
    (8919, "a deposed leader without a lease served a reader an older high watermark"),
    (12938, "a lying replica rejoined the ISR on a lie, then was elected with the records it lost"),
];

#[test]
fn regression_seeds_pass() {
    for &(seed, bug) in REGRESSION_SEEDS {
        let out = run(&SimConfig::new(seed));
        assert!(out.passed(), "regression seed {seed} ({bug}) fails again: {:?}\n{}", out.violations, out.report);
    }
}

#[test]
fn a_block_of_seeds_passes_with_faults_happening() {
    let (mut faults, mut ops) = (0, 0);
    for seed in 1000..1020 {
        let out = run(&SimConfig::new(seed));
        assert!(out.passed(), "seed {seed}: {:?}\n{}", out.violations, out.report);
        faults += out.faults;
        ops += out.ops;
    }
    assert!(faults >= 100, "faults were injected: {faults}");
    assert!(ops >= 20 * 1000, "the workload ran: {ops} ops");
}

#[test]
fn acks_leader_loses_only_records_acknowledged_in_the_window_before_a_leader_stops() {
    let mut lost = 0;
    for seed in 0..20 {
        let out = run(&SimConfig { acks: skein_broker::core::Acks::Leader, ..SimConfig::new(seed) });
        assert!(
            out.passed(),
            "seed {seed}: a loss outside the window, or another violation: {:?}\n{}",
            out.violations,
            out.report
        );
        lost += out.lost_in_window;
    }
    assert!(lost > 0, "acks=leader does lose records when leaders stop: the window is real");
}

/// The consumer group workload's config for a seed.
fn with_groups(seed: u64) -> SimConfig {
    SimConfig { groups: true, ..SimConfig::new(seed) }
}

#[test]
fn planted_no_generation_fencing_is_caught_as_a_committed_offset_going_backwards() {
    // A paused member resumes as a zombie and commits its stale positions with its old id
    // and epoch; without generation fencing the coordinator accepts them.
    let plant = Plant::named("no-generation-fencing").expect("known");
    let expected = ["group-exclusive-ownership", "group-offset-regression", "group-lost-commit"];
    let mut seen = Vec::new();
    let caught = (0..20).find(|&seed| {
        let props = run(&SimConfig { plant, ..with_groups(seed) }).failed_properties();
        let hit = props.iter().any(|p| expected.contains(&p.as_str()));
        seen.extend(props);
        hit
    });
    assert!(caught.is_some(), "no-generation-fencing not caught in 20 seeds (other failures: {seen:?})");
}

#[test]
fn a_block_of_seeds_passes_with_the_group_workload() {
    let (mut group_ops, mut faults) = (0, 0);
    for seed in 2000..2020 {
        let out = run(&with_groups(seed));
        assert!(out.passed(), "seed {seed}: {:?}\n{}\n{}", out.violations, out.report, out.group_report);
        group_ops += out.group_ops;
        faults += out.faults;
    }
    assert!(faults >= 100, "faults were injected: {faults}");
    assert!(group_ops >= 20 * 300, "the group workload ran: {group_ops} group operations");
}

/// The transaction workload's config for a seed.
fn with_transactions(seed: u64) -> SimConfig {
    SimConfig { transactions: true, ..SimConfig::new(seed) }
}

/// Every failing transaction check.
const TXN_CHECKS: &[&str] = &[
    "txn-aborted-read",
    "txn-intermediate-read",
    "txn-torn",
    "txn-lost-write",
    "txn-duplicate",
    "txn-exactly-once",
    "txn-offset-atomicity",
];
/// The exactly-once pipelines' checks.
const PIPELINE_CHECKS: &[&str] = &["txn-exactly-once", "txn-offset-atomicity"];

/// The first seed in `0..budget` whose transaction checks catch `plant`, and what failed.
fn first_txn_catch(plant: &str, budget: u64) -> (Option<u64>, Vec<String>) {
    first_catch_by(plant, budget, TXN_CHECKS)
}

/// The first seed in `0..budget` where one of `expected` catches `plant`, and what failed.
fn first_catch_by(plant: &str, budget: u64, expected: &[&str]) -> (Option<u64>, Vec<String>) {
    let plant = Plant::named(plant).expect("known");
    let mut seen = Vec::new();
    let caught = (0..budget).find(|&seed| {
        let props = run(&SimConfig { plant, ..with_transactions(seed) }).failed_properties();
        let hit = props.iter().any(|p| expected.contains(&p.as_str()));
        seen.extend(props);
        hit
    });
    (caught, seen)
}

#[test]
fn planted_no_txn_epoch_bump_is_caught_by_the_transaction_checks() {
    // Without an epoch per transaction, a late end or write of one lands on the next
    // (KAFKA-17754, what KIP-890 part 2 fixed).
    let (caught, seen) = first_txn_catch("no-txn-epoch-bump", 100);
    assert!(caught.is_some(), "no-txn-epoch-bump not caught in 100 seeds (other failures: {seen:?})");
}

#[test]
fn planted_no_partition_check_is_caught_by_the_transaction_checks() {
    // Without the partition check, a late write joins no transaction and is read at once
    // (what KIP-890 part 1 fixed).
    let (caught, seen) = first_txn_catch("no-partition-check", 100);
    assert!(caught.is_some(), "no-partition-check not caught in 100 seeds (other failures: {seen:?})");
}

#[test]
fn a_block_of_seeds_passes_with_the_transaction_workload() {
    for seed in 3000..3010 {
        let out = run(&with_transactions(seed));
        assert!(out.passed(), "seed {seed}: {:?}\n{}", out.violations, out.txn_report);
    }
}

#[test]
fn planted_no_txn_epoch_bump_is_caught_by_the_pipeline_checks() {
    // A late TxnOffsetCommit or end of an earlier transaction lands in the next one: an
    // input is transformed twice, or an offset commits without its outputs.
    let (caught, seen) = first_catch_by("no-txn-epoch-bump", 100, PIPELINE_CHECKS);
    assert!(
        caught.is_some(),
        "no-txn-epoch-bump not caught by {PIPELINE_CHECKS:?} in 100 seeds (other failures: {seen:?})"
    );
}

#[test]
fn planted_no_partition_check_is_caught_by_the_pipeline_checks() {
    // A late TxnOffsetCommit joins no transaction: its stale offset takes effect at the
    // pipeline's next commit and inputs are transformed again.
    let (caught, seen) = first_catch_by("no-partition-check", 100, PIPELINE_CHECKS);
    assert!(
        caught.is_some(),
        "no-partition-check not caught by {PIPELINE_CHECKS:?} in 100 seeds (other failures: {seen:?})"
    );
}

#[test]
fn exactly_once_pipelines_run_and_pass() {
    use skein_broker::check::txn::TxnCheck;
    let (mut inputs, mut offsets) = (0, 0);
    for seed in 3010..3015 {
        let out = run(&with_transactions(seed));
        assert!(out.passed(), "seed {seed}: {:?}\n{}", out.violations, out.txn_report);
        let judged = |c: TxnCheck| out.txn_report.results.iter().find(|r| r.check == c).map_or(0, |r| r.counted);
        inputs += judged(TxnCheck::TxnExactlyOnce);
        offsets += judged(TxnCheck::TxnOffsetAtomicity);
    }
    assert!(inputs >= 5 * 20, "the pipelines transformed inputs: {inputs} judged");
    assert!(offsets >= 5 * 10, "committed offsets were read: {offsets} judged");
}

/// The table workload's config for a seed (its level: `skein_broker::sim::table_level`).
fn with_tables(seed: u64) -> SimConfig {
    SimConfig { tables: true, ..SimConfig::new(seed) }
}

/// The Elle anomalies a serializable table history must not show.
const TABLE_CYCLES: &[&str] = &["elle-G0", "elle-G1c", "elle-G-single", "elle-G2-item"];

/// The first seed in `0..budget` whose table history shows one of `expected` with `plant`.
fn first_table_catch(plant: &str, budget: u64, expected: &[&str]) -> (Option<u64>, Vec<String>) {
    let plant = Plant::named(plant).expect("known");
    let mut seen = Vec::new();
    let caught = (0..budget).find(|&seed| {
        let props = run(&SimConfig { plant, ..with_tables(seed) }).failed_properties();
        let hit = props.iter().any(|p| expected.contains(&p.as_str()));
        seen.extend(props);
        hit
    });
    (caught, seen)
}

#[test]
fn a_block_of_seeds_passes_with_the_table_workload() {
    // Four seeds: one per level (serializable, ssi, 2pl, serial).
    for seed in 4000..4004 {
        let out = run(&with_tables(seed));
        assert!(out.passed(), "table seed {seed} failed: {:?} {:?}", out.violations, out.table_report);
        assert!(out.table_ops >= 20, "table seed {seed}: the workload ran ({} transactions)", out.table_ops);
    }
}

#[test]
fn table_regression_seeds_pass() {
    // 2: a new leader held no lock for a part prepared under the old one (2pl read around it).
    // 10, 22: wound-wait wounded a transaction whose part was being appended (2pl).
    // 12: a read-only part of a multi-partition transaction committed at once (write skew
    // across partitions, serializable).
    // 50: the driver rebuilt the leader-side state at the same epoch after a lease blip (2pl).
    for seed in [2, 10, 12, 22, 50] {
        let out = run(&with_tables(seed));
        assert!(out.passed(), "table seed {seed} failed: {:?} {:?}", out.violations, out.table_report);
    }
}

#[test]
fn planted_no_read_validation_is_caught_as_a_dependency_cycle() {
    let (caught, seen) = first_table_catch("no-read-validation", 8, TABLE_CYCLES);
    assert!(caught.is_some(), "no-read-validation not caught in 8 seeds (other failures: {seen:?})");
}

#[test]
fn planted_snapshot_as_serializable_is_caught_as_write_skew() {
    let (caught, seen) = first_table_catch("snapshot-as-serializable", 8, &["elle-G2-item"]);
    assert!(caught.is_some(), "snapshot-as-serializable not caught as G2-item in 8 seeds (other failures: {seen:?})");
}

/// The split workload's config for a seed.
fn with_splits(seed: u64) -> SimConfig {
    SimConfig { splits: true, ..SimConfig::new(seed) }
}

/// Runs split-workload seeds from 0 with `plant` until one fails naming `expected`.
fn first_split_catch(plant: &str, budget: u64, expected: &str) -> (Option<u64>, Vec<String>) {
    let plant = Plant::named(plant).expect("known");
    let mut seen = Vec::new();
    for seed in 0..budget {
        let props = run(&SimConfig { plant, ..with_splits(seed) }).failed_properties();
        if props.iter().any(|p| p == expected) {
            return (Some(seed), seen);
        }
        seen.extend(props);
    }
    (None, seen)
}

/// Splits and merges among the faults: even seeds by operator commands over the faulty
/// network, odd ones by the controller's automatic resizing from leaders' load reports.
#[test]
fn a_block_of_seeds_passes_with_splits_and_merges_among_the_faults() {
    let (mut resized, mut automatic, mut faults, mut keyed_reads) = (0, 0, 0, 0);
    for seed in 4000..4020 {
        let out = run(&with_splits(seed));
        assert!(out.passed(), "seed {seed}: {:?}\n{}", out.violations, out.report);
        resized += out.resized_partitions;
        // Odd seeds: no operator commands, the controller resizes by the leaders' load reports.
        if seed % 2 == 1 {
            automatic += out.resized_partitions;
        }
        faults += out.faults;
        let key_order = out.report.result(skein_broker::check::Check::KeyOrder).map_or(0, |r| r.counted);
        keyed_reads += key_order;
    }
    assert!(faults >= 100, "faults were injected: {faults}");
    assert!(resized >= 20 * 4, "splits and merges happened: {resized} partitions made");
    assert!(automatic >= 10 * 3, "automatic splits and merges happened: {automatic} partitions made");
    assert!(keyed_reads >= 20 * 500, "the consumers read keyed values: {keyed_reads}");
}

#[test]
fn planted_ignore_lineage_is_caught_as_keys_read_out_of_order() {
    let (caught, seen) = first_split_catch("ignore-lineage", 60, "key-order");
    assert!(caught.is_some(), "not caught in 60 seeds (other failures: {seen:?})");
}

#[test]
fn planted_seal_before_dedup_is_caught_as_duplicates() {
    let (caught, seen) = first_split_catch("seal-before-dedup", 60, "duplicate");
    assert!(caught.is_some(), "not caught in 60 seeds (other failures: {seen:?})");
}
