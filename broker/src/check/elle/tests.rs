//! Tests of the Elle-style checker: one hand-made history per anomaly (each must be reported
//! under its name), clean and randomly generated serial histories (which must pass), soundness
//! with `info` transactions and unknown register orders, levels, real time, the JSON forms, and
//! malformed input (an error with its line, never a panic).

use std::collections::HashMap;
use std::time::Instant;

use super::*;

/// A history from JSON lines.
fn hist(lines: &[&str]) -> History {
    parse_history(&lines.join("\n")).expect("a valid history")
}

fn found(report: &Report) -> Vec<&str> {
    report.counts.keys().map(String::as_str).collect()
}

/// Asserts that `report` found exactly the anomalies `names` and is invalid (or valid when
/// `names` is empty).
fn expect(report: &Report, names: &[&str]) {
    assert_eq!(found(report), names, "{report}");
    assert_eq!(report.valid, names.is_empty(), "{report}");
}

fn la(lines: &[&str]) -> Report {
    check_list_append(&hist(lines))
}

fn la_with(lines: &[&str], level: &str, realtime: bool) -> Report {
    check_list_append_with(&hist(lines), &CheckOptions { realtime, level: level.to_owned() })
}

#[test]
fn g0_write_cycle() {
    let r = la(&[
        r#"{"process":1,"type":"ok","ops":[["append","x",1],["append","y",1]]}"#,
        r#"{"process":2,"type":"ok","ops":[["append","x",2],["append","y",2]]}"#,
        r#"{"process":3,"type":"ok","ops":[["r","x",[1,2]],["r","y",[2,1]]]}"#,
    ]);
    expect(&r, &[G0]);
    let cycle = &r.anomalies[G0][0].cycle;
    assert_eq!(cycle.len(), 2);
    assert!(cycle.iter().all(|e| e.kind == EdgeKind::Ww));
    assert_eq!(cycle[0].to, cycle[1].from);
    assert_eq!(cycle[1].to, cycle[0].from);
    let mut keys = r.anomalies[G0][0].keys.clone();
    keys.sort();
    assert_eq!(keys, ["x", "y"]);
}

#[test]
fn g1a_aborted_read() {
    let r = la(&[
        r#"{"process":1,"type":"fail","ops":[["append","x",9]]}"#,
        r#"{"process":2,"type":"ok","ops":[["r","x",[9]]]}"#,
    ]);
    expect(&r, &[G1A]);
    let a = &r.anomalies[G1A][0];
    assert_eq!(a.txns.iter().map(|t| t.index).collect::<Vec<_>>(), [0, 1]);
    assert!(a.detail.contains("failed"), "{}", a.detail);
    // A failed transaction nobody read is no anomaly.
    expect(
        &la(&[
            r#"{"process":1,"type":"fail","ops":[["append","x",9]]}"#,
            r#"{"process":2,"type":"ok","ops":[["r","x",[]]]}"#,
        ]),
        &[],
    );
}

#[test]
fn g1b_intermediate_read() {
    let r = la(&[
        r#"{"process":1,"type":"ok","ops":[["append","x",8],["append","x",9]]}"#,
        r#"{"process":2,"type":"ok","ops":[["r","x",[8]]]}"#,
    ]);
    expect(&r, &[G1B]);
    // Reading both, or a transaction reading its own intermediate state, is fine.
    expect(
        &la(&[
            r#"{"process":1,"type":"ok","ops":[["append","x",8],["r","x",[8]],["append","x",9]]}"#,
            r#"{"process":2,"type":"ok","ops":[["r","x",[8,9]]]}"#,
        ]),
        &[],
    );
}

#[test]
fn g1c_circular_information_flow() {
    let r = la(&[
        r#"{"process":1,"type":"ok","ops":[["append","x",1],["r","y",[1]]]}"#,
        r#"{"process":2,"type":"ok","ops":[["append","y",1],["r","x",[1]]]}"#,
    ]);
    expect(&r, &[G1C]);
    assert!(r.anomalies[G1C][0].cycle.iter().all(|e| e.kind == EdgeKind::Wr));
}

#[test]
fn g_single_read_skew() {
    // T0 saw x before T1 but y after it.
    let lines = [
        r#"{"process":1,"type":"ok","ops":[["r","x",[]],["r","y",[1]]]}"#,
        r#"{"process":2,"type":"ok","ops":[["append","x",1],["append","y",1]]}"#,
    ];
    let r = la(&lines);
    expect(&r, &[G_SINGLE]);
    let cycle = &r.anomalies[G_SINGLE][0].cycle;
    assert_eq!(cycle.iter().filter(|e| e.kind == EdgeKind::Rw).count(), 1);
    assert_eq!(cycle[0].kind, EdgeKind::Rw);
    assert_eq!(cycle[0].key.as_deref(), Some("x"));
    // Snapshot isolation forbids it; read committed allows it.
    assert!(!la_with(&lines, "snapshot", false).valid);
    let rc = la_with(&lines, "read-committed", false);
    assert!(rc.valid && rc.count(G_SINGLE) == 1, "{rc}");
}

#[test]
fn g2_item_write_skew() {
    let lines = [
        r#"{"process":1,"type":"ok","ops":[["r","x",[]],["r","y",[]],["append","x",1]]}"#,
        r#"{"process":2,"type":"ok","ops":[["r","x",[]],["r","y",[]],["append","y",2]]}"#,
        r#"{"process":3,"type":"ok","ops":[["r","x",[1]],["r","y",[2]]]}"#,
    ];
    let r = la(&lines);
    expect(&r, &[G2_ITEM]);
    let cycle = &r.anomalies[G2_ITEM][0].cycle;
    assert_eq!(cycle.len(), 2);
    assert!(cycle.iter().all(|e| e.kind == EdgeKind::Rw));
    // Snapshot isolation allows write skew.
    let si = la_with(&lines, "snapshot", false);
    assert!(si.valid && si.count(G2_ITEM) == 1, "{si}");
}

#[test]
fn g2_two_edges_read_only_anomaly() {
    // Fekete's read-only anomaly (isolation_cases.md, G2-two-edges) in list-append form.
    let lines = [
        r#"{"process":1,"type":"ok","ops":[["r","x",[]],["r","y",[]],["append","x",1]]}"#,
        r#"{"process":2,"type":"ok","ops":[["append","y",5]]}"#,
        r#"{"process":3,"type":"ok","ops":[["r","x",[]],["r","y",[5]]]}"#,
        r#"{"process":4,"type":"ok","ops":[["r","x",[1]],["r","y",[5]]]}"#,
    ];
    let r = la(&lines);
    expect(&r, &[G2_ITEM]);
    assert!(la_with(&lines, "snapshot", false).valid);
}

#[test]
fn lost_append() {
    let lines = [
        r#"{"process":1,"type":"ok","ops":[["append","x",1]],"start_us":0,"end_us":10}"#,
        r#"{"process":2,"type":"ok","ops":[["append","x",2]],"start_us":20,"end_us":30}"#,
        r#"{"process":3,"type":"ok","ops":[["r","x",[2]]],"start_us":40,"end_us":50}"#,
    ];
    let r = la(&lines);
    expect(&r, &[LOST_APPEND]);
    assert_eq!(r.anomalies[LOST_APPEND][0].txns[0].index, 0);
    // Concurrent appends prove nothing: the unread one may come later.
    expect(
        &la(&[
            r#"{"process":1,"type":"ok","ops":[["append","x",1]],"start_us":0,"end_us":30}"#,
            r#"{"process":2,"type":"ok","ops":[["append","x",2]],"start_us":20,"end_us":40}"#,
            r#"{"process":3,"type":"ok","ops":[["r","x",[2]]],"start_us":50,"end_us":60}"#,
        ]),
        &[],
    );
    // Nor does an unacknowledged one.
    expect(
        &la(&[
            r#"{"process":1,"type":"info","ops":[["append","x",1]],"start_us":0,"end_us":10}"#,
            r#"{"process":2,"type":"ok","ops":[["append","x",2]],"start_us":20,"end_us":30}"#,
            r#"{"process":3,"type":"ok","ops":[["r","x",[2]]],"start_us":40,"end_us":50}"#,
        ]),
        &[],
    );
}

#[test]
fn duplicate_elements() {
    let r = la(&[
        r#"{"process":1,"type":"ok","ops":[["append","x",1]]}"#,
        r#"{"process":2,"type":"ok","ops":[["r","x",[1,1]]]}"#,
    ]);
    expect(&r, &[DUPLICATE_ELEMENTS]);
    assert!(!la_with(&[r#"{"process":2,"type":"ok","ops":[["r","x",[1,1]]]}"#], "read-uncommitted", false).valid);
}

#[test]
fn incompatible_order() {
    let r = la(&[
        r#"{"process":1,"type":"ok","ops":[["append","x",1]]}"#,
        r#"{"process":2,"type":"ok","ops":[["append","x",2]]}"#,
        r#"{"process":3,"type":"ok","ops":[["r","x",[1,2]]]}"#,
        r#"{"process":4,"type":"ok","ops":[["r","x",[2,1]]]}"#,
    ]);
    expect(&r, &[INCOMPATIBLE_ORDER]);
    let detail = &r.anomalies[INCOMPATIBLE_ORDER][0].detail;
    assert!(detail.contains("index 0"), "{detail}");
}

#[test]
fn clean_histories_pass() {
    expect(&la(&[]), &[]);
    expect(
        &la(&[
            r#"{"process":1,"type":"ok","ops":[["r","x",null],["append","x",1]],"start_us":0,"end_us":5}"#,
            r#"{"process":2,"type":"ok","ops":[["r","x",[1]],["append","x",2],["append","y",1]],"start_us":10,"end_us":15}"#,
            r#"{"process":1,"type":"fail","ops":[["append","y",7]],"start_us":20,"end_us":25}"#,
            r#"{"process":3,"type":"ok","ops":[["r","x",[1,2]],["r","y",[1]]],"start_us":30,"end_us":35}"#,
        ]),
        &[],
    );
}

#[test]
fn info_transactions_are_handled_soundly() {
    // T1's outcome is unknown and its read is not to be trusted: treating it as committed with
    // that read would close an rw cycle (T0 -rw(x)-> T1 -rw(y)-> T0).
    let base = [
        r#"{"process":1,"type":"ok","ops":[["r","x",[]],["append","y",1]]}"#,
        r#"{"process":2,"type":"info","ops":[["append","x",1],["r","y",[]]]}"#,
    ];
    expect(&la(&base), &[]);
    // Its append seen: it committed, yet its read still proves nothing.
    let mut seen = base.to_vec();
    seen.push(r#"{"process":3,"type":"ok","ops":[["r","x",[1]],["r","y",[1]]]}"#);
    expect(&la(&seen), &[]);
    // A seen info append does take part in real cycles: T2 -rw(y)-> T1 -wr(y)-> T0 -wr(x)-> T2.
    let r = la(&[
        r#"{"process":1,"type":"ok","ops":[["append","x",1],["r","y",[1]]]}"#,
        r#"{"process":2,"type":"info","ops":[["append","y",1]]}"#,
        r#"{"process":3,"type":"ok","ops":[["r","x",[1]],["r","y",[]]]}"#,
    ]);
    expect(&r, &[G_SINGLE]);
    assert!(r.anomalies[G_SINGLE][0].txns.iter().any(|t| t.kind == TxnType::Info));
}

#[test]
fn realtime_edges_catch_stale_reads_only_when_asked() {
    let lines = [
        r#"{"process":1,"type":"ok","ops":[["append","x",1]],"start_us":0,"end_us":10}"#,
        r#"{"process":2,"type":"ok","ops":[["r","x",[]]],"start_us":20,"end_us":30}"#,
    ];
    expect(&la(&lines), &[]);
    let r = la_with(&lines, "serializable", true);
    expect(&r, &[G_SINGLE_REALTIME]);
    assert!(r.anomalies[G_SINGLE_REALTIME][0].cycle.iter().any(|e| e.kind == EdgeKind::Realtime));
    // Strict serializability implies real time.
    assert!(!la_with(&lines, "strict-serializable", false).valid);
    // A future read: T0 read what T1, which started after T0 ended, appended.
    let r = la_with(
        &[
            r#"{"process":1,"type":"ok","ops":[["r","x",[1]]],"start_us":0,"end_us":10}"#,
            r#"{"process":2,"type":"ok","ops":[["append","x",1]],"start_us":20,"end_us":30}"#,
        ],
        "serializable",
        true,
    );
    expect(&r, &[G1C_REALTIME]);
    // Overlapping transactions are not ordered.
    expect(
        &la_with(
            &[
                r#"{"process":1,"type":"ok","ops":[["append","x",1]],"start_us":0,"end_us":20}"#,
                r#"{"process":2,"type":"ok","ops":[["r","x",[]]],"start_us":20,"end_us":30}"#,
            ],
            "serializable",
            true,
        ),
        &[],
    );
}

#[test]
fn forbidden_sets() {
    assert!(forbidden("serializable").contains(&G2_ITEM));
    assert!(!forbidden("serializable").contains(&G_SINGLE_REALTIME));
    assert!(forbidden("strict-serializable").contains(&G_SINGLE_REALTIME));
    assert!(!forbidden("snapshot").contains(&G2_ITEM));
    assert!(forbidden("snapshot").contains(&G_SINGLE));
    assert_eq!(forbidden("read-committed").iter().filter(|n| n.starts_with('G')).count(), 4);
    assert_eq!(forbidden("no-such-level"), forbidden("strict-serializable"));
    for level in LEVELS {
        assert!(forbidden(level).contains(&G0), "{level}");
    }
}

// Registers.

fn reg(lines: &[&str]) -> Report {
    check_rw_register(&hist(lines))
}

#[test]
fn register_anomalies() {
    expect(
        &reg(&[
            r#"{"process":1,"type":"fail","ops":[["w","x",1]]}"#,
            r#"{"process":2,"type":"ok","ops":[["r","x",1]]}"#,
        ]),
        &[G1A],
    );
    expect(
        &reg(&[
            r#"{"process":1,"type":"ok","ops":[["w","x",1],["w","x",2]]}"#,
            r#"{"process":2,"type":"ok","ops":[["r","x",1]]}"#,
        ]),
        &[G1B],
    );
    expect(
        &reg(&[
            r#"{"process":1,"type":"ok","ops":[["w","x",1],["r","y",1]]}"#,
            r#"{"process":2,"type":"ok","ops":[["w","y",1],["r","x",1]]}"#,
        ]),
        &[G1C],
    );
    // T1 read x = 1 and wrote 2, so 1 < 2; T2 saw T1's x but the older y.
    let r = reg(&[
        r#"{"process":1,"type":"ok","ops":[["w","x",1],["w","y",1]]}"#,
        r#"{"process":2,"type":"ok","ops":[["r","x",1],["w","x",2],["r","y",1],["w","y",2]]}"#,
        r#"{"process":3,"type":"ok","ops":[["r","x",2],["r","y",1]]}"#,
    ]);
    expect(&r, &[G_SINGLE]);
    // Write skew from the initial nil.
    expect(
        &reg(&[
            r#"{"process":1,"type":"ok","ops":[["r","x",null],["r","y",null],["w","x",1]]}"#,
            r#"{"process":2,"type":"ok","ops":[["r","x",null],["r","y",null],["w","y",1]]}"#,
        ]),
        &[G2_ITEM],
    );
    // A cyclic version order: T1 read 1 and wrote 2, T2 read 2 and wrote 1.
    expect(
        &reg(&[
            r#"{"process":1,"type":"ok","ops":[["r","x",1],["w","x",2]]}"#,
            r#"{"process":2,"type":"ok","ops":[["r","x",2],["w","x",1]]}"#,
        ]),
        &[G0, G1C],
    );
}

#[test]
fn register_orders_are_never_guessed() {
    // Serializable as T0, T2, T1 (x ends at 1). Ordering x's versions by value (1 < 2) would
    // give T1 -ww-> T0 -wr-> T2 -rw(y)-> T1, a cycle that is not there.
    let r = reg(&[
        r#"{"process":1,"type":"ok","ops":[["w","x",2]]}"#,
        r#"{"process":2,"type":"ok","ops":[["w","x",1],["w","y",1]]}"#,
        r#"{"process":3,"type":"ok","ops":[["r","x",2],["r","y",null]]}"#,
    ]);
    expect(&r, &[]);
    // Nor from history order: blind writes in either order.
    expect(
        &reg(&[
            r#"{"process":1,"type":"ok","ops":[["w","x",1]]}"#,
            r#"{"process":2,"type":"ok","ops":[["w","x",2]]}"#,
            r#"{"process":3,"type":"ok","ops":[["r","x",2]]}"#,
            r#"{"process":4,"type":"ok","ops":[["r","x",1]]}"#,
        ]),
        &[],
    );
}

// Random serial executions.

/// xorshift64*: a seeded generator, enough for test data.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// A serial list-append execution of `n` transactions over `keys` keys: each transaction runs
/// alone in its own time slot; 5% fail (no effect), 5% are info (half of them take effect,
/// their reads recorded as null).
fn serial_list_append(n: usize, keys: u64, seed: u64) -> Vec<String> {
    let mut rng = Rng(seed);
    let mut state: HashMap<String, Vec<i64>> = HashMap::new();
    let mut next = 0i64;
    let mut lines = Vec::new();
    for i in 0..n {
        let kind = match rng.below(20) {
            0 => "fail",
            1 => "info",
            _ => "ok",
        };
        let applies = kind == "ok" || (kind == "info" && rng.below(2) == 0);
        let mut local = state.clone();
        let mut ops = Vec::new();
        for _ in 0..1 + rng.below(4) {
            let key = format!("k{}", rng.below(keys));
            if rng.below(2) == 0 {
                next += 1;
                local.entry(key.clone()).or_default().push(next);
                ops.push(serde_json::json!(["append", key, next]));
            } else if kind == "info" {
                ops.push(serde_json::json!(["r", key, null]));
            } else {
                ops.push(serde_json::json!(["r", key, local.get(&key).cloned().unwrap_or_default()]));
            }
        }
        if applies {
            state = local;
        }
        let start = 10 * i as u64;
        lines.push(
            serde_json::json!({"process": i % 7, "type": kind, "ops": ops, "start_us": start, "end_us": start + 5})
                .to_string(),
        );
    }
    lines
}

#[test]
fn random_serial_list_append_history_passes() {
    let lines = serial_list_append(5_000, 20, 0x5eed);
    let h = parse_history(&lines.join("\n")).expect("parses");
    let began = Instant::now();
    let r = check_list_append_with(&h, &CheckOptions { realtime: true, level: "strict-serializable".to_owned() });
    expect(&r, &[]);
    assert_eq!(r.txns, 5_000);
    eprintln!("5000 serial list-append transactions checked in {:?}", began.elapsed());
}

#[test]
fn planted_write_skew_in_a_large_history_is_found() {
    let mut lines = serial_list_append(5_000, 20, 7);
    // The final state of k0 and k1, from a fresh read at the end.
    let h = parse_history(&lines.join("\n")).expect("parses");
    let last = |key: &str| -> Vec<i64> {
        let mut longest: Vec<i64> = Vec::new();
        for txn in &h.txns {
            for op in &txn.ops {
                if let Mop::Read { key: k, value: ReadValue::List(v) } = op {
                    if k == key && v.len() > longest.len() && txn.kind == TxnType::Ok {
                        longest = v.clone();
                    }
                }
            }
        }
        longest
    };
    let (x, y) = (last("k0"), last("k1"));
    let at = 10 * lines.len() as u64 + 100;
    for (i, (mine, other)) in [("k0", "k1"), ("k1", "k0")].into_iter().enumerate() {
        let value = 1_000_000 + i as i64;
        let (reads_x, reads_y) = (&x, &y);
        lines.push(
            serde_json::json!({"process": 100 + i, "type": "ok", "start_us": at, "end_us": at + 5,
                "ops": [["r", "k0", reads_x], ["r", "k1", reads_y], ["append", mine, value]]})
            .to_string(),
        );
        let _ = other;
    }
    let mut x_final = x.clone();
    x_final.push(1_000_000);
    let mut y_final = y.clone();
    y_final.push(1_000_001);
    lines.push(
        serde_json::json!({"process": 200, "type": "ok", "start_us": at + 10, "end_us": at + 15,
            "ops": [["r", "k0", x_final], ["r", "k1", y_final]]})
        .to_string(),
    );
    let h = parse_history(&lines.join("\n")).expect("parses");
    let r = check_list_append(&h);
    expect(&r, &[G2_ITEM]);
    assert!(check_list_append_with(&h, &CheckOptions { realtime: true, level: "snapshot".to_owned() }).valid);
}

#[test]
fn random_serial_register_history_passes() {
    let mut rng = Rng(42);
    let mut state: HashMap<String, i64> = HashMap::new();
    let mut next = 0i64;
    let mut lines = Vec::new();
    for i in 0..5_000u64 {
        let ok = rng.below(20) != 0;
        let mut local = state.clone();
        let mut ops = Vec::new();
        for _ in 0..1 + rng.below(4) {
            let key = format!("k{}", rng.below(20));
            if rng.below(2) == 0 {
                next += 1;
                local.insert(key.clone(), next);
                ops.push(serde_json::json!(["w", key, next]));
            } else {
                ops.push(serde_json::json!(["r", key, local.get(&key)]));
            }
        }
        if ok {
            state = local;
        }
        let kind = if ok { "ok" } else { "fail" };
        lines.push(
            serde_json::json!({"process": i % 5, "type": kind, "ops": ops, "start_us": 10 * i, "end_us": 10 * i + 5})
                .to_string(),
        );
    }
    let h = parse_history(&lines.join("\n")).expect("parses");
    let r = check_rw_register_with(&h, &CheckOptions { realtime: true, level: "strict-serializable".to_owned() });
    expect(&r, &[]);
}

// Formats.

#[test]
fn report_json_carries_the_explanation() {
    let r = la(&[
        r#"{"process":1,"type":"ok","ops":[["r","x",[]],["r","y",[1]]]}"#,
        r#"{"process":2,"type":"ok","ops":[["append","x",1],["append","y",1]]}"#,
    ]);
    let json = serde_json::to_value(&r).expect("serialises");
    assert_eq!(json["valid"], false);
    assert_eq!(json["counts"]["G-single"], 1);
    assert_eq!(json["forbidden_found"], serde_json::json!(["G-single"]));
    let example = &json["anomalies"]["G-single"][0];
    assert_eq!(example["cycle"][0]["kind"], "rw");
    assert_eq!(example["cycle"][1]["kind"], "wr");
    assert_eq!(example["txns"][1]["ops"][0], serde_json::json!(["append", "x", 1]));
    assert_eq!(example["txns"][0]["type"], "ok");
    let back: Report = serde_json::from_value(json).expect("deserialises");
    assert_eq!(back, r);
    let text = r.to_string();
    assert!(text.contains("G-single") && text.contains("invalid: G-single"), "{text}");
}

#[test]
fn parse_errors_name_their_line() {
    let cases: &[(&str, usize, &str)] = &[
        ("{\"process\":1,\"type\":\"ok\",\"ops\":[]}\nnot json", 2, "not a transaction"),
        ("\n\n{\"process\":1,\"type\":\"invoke\",\"ops\":[]}", 3, "not a transaction"),
        (r#"{"process":1,"type":"ok","ops":[["cas","x",1]]}"#, 1, "unknown operation"),
        (r#"{"process":1,"type":"ok","ops":[["append","x"]]}"#, 1, "not a transaction"),
        (r#"{"process":1,"type":"ok","ops":[["append","x",1,2]]}"#, 1, "not a transaction"),
        (r#"{"process":1,"type":"ok","ops":[],"colour":"red"}"#, 1, "not a transaction"),
        (r#"{"process":1,"type":"ok","ops":[],"start_us":5,"end_us":4}"#, 1, "before it starts"),
        (r#"{"process":1,"type":"ok","ops":[],"level":"eventual"}"#, 1, "unknown level"),
        (
            "{\"process\":1,\"type\":\"ok\",\"ops\":[[\"append\",\"x\",1]]}\n{\"process\":1,\"type\":\"fail\",\"ops\":[[\"append\",\"x\",1]]}",
            2,
            "already written",
        ),
        ("{\"process\":1,\"type\":\"ok\",\"ops\":[[\"append\",\"x\",1]]}\n{\"process\":1,\"type\":\"ok\",\"ops\":[[\"w\",\"y\",1]]}", 2, "list-append history"),
        (r#"{"process":1,"type":"ok","ops":[["r","x",[1,"a"]]]}"#, 1, "not a transaction"),
    ];
    for (text, line, what) in cases {
        let err = parse_history(text).expect_err(text);
        assert_eq!(err.line(), *line, "{text}: {err}");
        assert!(err.to_string().contains(what), "{text}: {err}");
    }
    // Integer keys read as text; a value may repeat across keys.
    let h = parse_history(r#"{"process":1,"type":"ok","ops":[["append",3,1],["append","y",1],["r",3,[1]]]}"#)
        .expect("parses");
    assert_eq!(h.txns[0].ops[0].key(), "3");
    assert_eq!(h.model(), Some(Model::ListAppend));
}

#[test]
fn arbitrary_input_never_panics() {
    let mut rng = Rng(9);
    let pieces = [
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"process\"",
        "\"type\"",
        "\"ok\"",
        "\"info\"",
        "\"ops\"",
        "\"r\"",
        "\"append\"",
        "\"w\"",
        "\"x\"",
        "1",
        "-1",
        "null",
        "18446744073709551615",
        "\n",
        "\"start_us\"",
        "\"end_us\"",
    ];
    for _ in 0..2_000 {
        let text: String = (0..rng.below(40)).map(|_| pieces[rng.below(pieces.len() as u64) as usize]).collect();
        if let Ok(h) = parse_history(&text) {
            let _ = check_list_append_with(&h, &CheckOptions { realtime: true, ..CheckOptions::default() });
            let _ = check_rw_register(&h);
        }
    }
    // Histories built in code skip parse_history's checks: still no panic.
    let txn =
        |kind, ops: Vec<Mop>| Txn { process: 1, kind, ops, start_us: Some(9), end_us: Some(1), level: None, line: 0 };
    let append = |v| Mop::Append { key: "x".into(), value: v };
    let h = History {
        txns: vec![
            txn(TxnType::Ok, vec![append(1), append(1), Mop::Write { key: "x".into(), value: 1 }]),
            txn(TxnType::Ok, vec![Mop::Read { key: "x".into(), value: ReadValue::List(vec![1, 1, 5]) }]),
            txn(TxnType::Ok, vec![Mop::Read { key: "x".into(), value: ReadValue::Int(1) }]),
        ],
    };
    let _ = check_list_append_with(&h, &CheckOptions { realtime: true, ..CheckOptions::default() });
    let _ = check_rw_register_with(&h, &CheckOptions { realtime: true, ..CheckOptions::default() });
}
