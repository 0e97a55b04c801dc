//! Test helper for `log/tests/crash.rs`: appends to a log until killed, printing
//! `durable N` each time the durable offset advances. Record values encode their offset, so
//! the parent can check every record after recovery. Not a user-facing tool.
//!
//! Usage: `skein-log-crash-child DIR always|interval SEED`

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use skein_log::batch::BatchBuilder;
use skein_log::storage::{splitmix, FileStorage};
use skein_log::types::{LeaderEpoch, Timestamp};
use skein_log::{Durability, Log, LogConfig};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: skein-log-crash-child DIR always|interval SEED");
        std::process::exit(2);
    }
    let durability = if args[2] == "always" { Durability::Always } else { Durability::IntervalMs(5) };
    let mut rng: u64 = args[3].parse().unwrap_or(1);
    let config = LogConfig { segment_bytes: 256 * 1024, durability, ..LogConfig::default() };
    let storage = FileStorage::new(&args[1]).unwrap_or_else(|e| fail(&e));
    let mut log = Log::open(storage, config, now()).unwrap_or_else(|e| fail(&e));
    let epoch = log.epochs().latest().map_or(LeaderEpoch(0), |e| e.epoch);
    let out = std::io::stdout();
    let mut reported = log.durable_offset();
    loop {
        let group = 1 + splitmix(&mut rng) % 4;
        for _ in 0..group {
            let count = 1 + splitmix(&mut rng) % 8;
            let value_bytes = 100 + (splitmix(&mut rng) % 2000) as usize;
            let mut b = BatchBuilder::new();
            for i in 0..count {
                let offset = log.log_end_offset().get() + i;
                b.push(None, &value(offset, value_bytes), &[], now());
            }
            let mut batch = b.build();
            batch.set_leader_epoch(epoch);
            log.append(batch, now()).unwrap_or_else(|e| fail(&e));
        }
        if log.sync_due(now()) {
            log.sync(now()).unwrap_or_else(|e| fail(&e));
        }
        if log.durable_offset() > reported {
            reported = log.durable_offset();
            let _ = writeln!(out.lock(), "durable {}", reported.get());
        }
    }
}

/// Record values: the offset, then filler derived from it (as `tests/common` expects).
fn value(id: u64, value_bytes: usize) -> Vec<u8> {
    let mut v = id.to_le_bytes().to_vec();
    v.extend((0..value_bytes.saturating_sub(8)).map(|i| (id as usize).wrapping_add(i) as u8));
    v
}

fn now() -> Timestamp {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    Timestamp(i64::try_from(ms).unwrap_or(i64::MAX))
}

fn fail(e: &dyn std::fmt::Display) -> ! {
    eprintln!("crash child: {e}");
    std::process::exit(1);
}
