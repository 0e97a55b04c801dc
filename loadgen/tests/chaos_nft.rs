//! The nft rules of `skein_loadgen::chaos` really cut loopback TCP between two bound
//! addresses, only the intended links, and healing restores them. Needs root and nftables
//! (`tests/run` installs nftables; CI runs as root): without `nft` this test fails, it does
//! not skip.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use skein_loadgen::chaos::{nft, nft_available, NetChaos};

const A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);
const B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 12);
const C: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 13);
const CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const TABLE: &str = "skein_chaos_test";

/// Whether a socket bound to `from` connects to `to` within 500 ms (a dropped SYN is
/// retransmitted after 1 s, so a cut shows as a timeout).
fn connects(from: Ipv4Addr, to: SocketAddr) -> bool {
    compio::runtime::Runtime::new().expect("runtime").block_on(async {
        let socket = compio::net::TcpSocket::new_v4().await.expect("socket");
        socket.bind(SocketAddr::from((from, 0))).await.expect("bind the source address");
        compio::time::timeout(Duration::from_millis(500), socket.connect(to)).await.is_ok_and(|r| r.is_ok())
    })
}

#[test]
fn nft_rules_cut_exactly_the_chosen_loopback_links_and_heal() {
    assert!(
        nft_available(),
        "this test needs the `nft` command (nftables) and root: install nftables (tests/run does) and run as root"
    );
    let listener = TcpListener::bind((B, 0)).expect("listen on 127.0.0.12");
    let to_b = listener.local_addr().expect("addr");
    assert!(connects(A, to_b), "127.0.0.11 reaches 127.0.0.12 before any rule");

    let mut chaos = NetChaos::with_table(TABLE, vec![(1, A), (2, B), (3, C)]).expect("nft table (needs root)");
    chaos.one_way(1, 2).expect("one-way rule");
    assert!(!connects(A, to_b), "one-way 1 -> 2 drops 127.0.0.11 -> 127.0.0.12");
    assert!(connects(C, to_b), "one-way 1 -> 2 leaves 127.0.0.13 -> 127.0.0.12 alone");
    chaos.heal().expect("heal");
    assert!(connects(A, to_b), "healed");

    chaos.cut_from_brokers(2).expect("cut rule");
    assert!(!connects(A, to_b), "broker 1 is cut from broker 2");
    assert!(!connects(C, to_b), "broker 3 is cut from broker 2");
    assert!(connects(CLIENT, to_b), "a client on 127.0.0.1 still reaches broker 2");
    chaos.heal().expect("heal");

    chaos.isolate(2).expect("isolate rule");
    assert!(!connects(CLIENT, to_b), "an isolated broker is cut from clients too");
    assert!(!connects(A, to_b), "and from brokers");
    assert_eq!(chaos.active().len(), 1);
    drop(chaos);
    assert!(connects(A, to_b), "dropping the NetChaos removes every rule");
    assert!(nft(&format!("list table inet {TABLE}\n")).is_err(), "the table is deleted on drop");
}
