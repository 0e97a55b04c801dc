//! Hostile input against cluster brokers (issue 16): a request echoing a 65,535-byte topic
//! name must not kill the broker, and inter-broker frames from outside `--voters` must not
//! reach the controller.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::block_on;
use common::cluster::{settled, Cluster};
use common::Broker;
use skein_client::wire::{request_frame, ApiKey, DecodeError, ErrorCode, Reader, RequestHeader, Wire, Writer};
use skein_client::{Client, ClientError};

#[test]
fn a_65535_byte_topic_name_is_refused_and_the_cluster_broker_keeps_serving() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start_one_voter_cluster(tmp.path(), &[]);
    let long = "a".repeat(65_535);
    block_on(async {
        let client = Client::connect(&broker.addr).await.expect("connect");
        let created = client.create_topic(&long, 1, 1, &[]).await;
        assert!(matches!(created, Err(ClientError::Broker(ErrorCode::INVALID_TOPIC, _))), "{created:?}");
        let deleted = client.delete_topic(&long).await;
        assert!(matches!(deleted, Err(ClientError::Broker(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION, _))), "{deleted:?}");
        let configs = [("k".repeat(40_000), "v".repeat(40_000))];
        let bad_config = client.create_topic("fine", 1, 1, &configs).await;
        assert!(matches!(bad_config, Err(ClientError::Broker(ErrorCode::INVALID_CONFIG, _))), "{bad_config:?}");
        client.create_topic("after", 1, 1, &[]).await.expect("still serving");
    });
    // The CLI, as the issue ran it.
    let cli = common::sibling("skein", &["--bin", "skein"]);
    let out = std::process::Command::new(cli)
        .args(["--brokers", &broker.addr, "topic", "create", &long])
        .output()
        .expect("run skein");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("INVALID_TOPIC") && err.len() < 1_000, "a short error: {} bytes", err.len());
    block_on(async {
        let client = Client::connect(&broker.addr).await.expect("the broker is alive");
        assert_eq!(client.list_topics().await.expect("list"), vec!["after".to_owned()]);
    });
}

/// Bytes sent as they are (a hand-built inter-broker frame body).
struct Raw(Vec<u8>);

impl Wire for Raw {
    fn encode(&self, w: &mut Writer) {
        w.buf.extend_from_slice(&self.0);
    }
    fn decode(_: &mut Reader) -> Result<Self, DecodeError> {
        Err(DecodeError::Invalid("raw bytes are only sent"))
    }
}

/// A peer frame claiming to come from broker `from`'s controller voter: CreateTopic `name`
/// with `partitions` partitions (the encoding of `cluster::peer::PeerFrame`).
fn forged_create_topic(from: u32, name: &str, partitions: u32) -> Vec<u8> {
    let mut w = Writer::default();
    from.encode(&mut w);
    true.encode(&mut w);
    9u8.encode(&mut w); // Message::CreateTopic
    name.to_owned().encode(&mut w);
    partitions.encode(&mut w);
    1u16.encode(&mut w); // replication
    0u32.encode(&mut w); // no configs
    let header = RequestHeader { api_key: ApiKey::Cluster, api_version: 0, correlation_id: 1, client_id: "x".into() };
    request_frame(&header, &Raw(w.buf))
}

#[test]
fn inter_broker_frames_from_outside_the_voters_are_refused() {
    let c = Cluster::start(94, 19594);
    block_on(settled(&c));
    // From 127.0.0.1, which is no voter's address, claiming to be broker 2, to every broker:
    // once with a topic the client API would allow and once with one it would refuse.
    for addr in &c.addrs {
        for (name, partitions) in [("forged", 3), ("forged-big", 12_000)] {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
            socket.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().expect("addr").into()).expect("bind");
            socket.connect(&addr.parse::<std::net::SocketAddr>().expect("addr").into()).expect("connect");
            let mut stream: TcpStream = socket.into();
            stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
            stream.write_all(&forged_create_topic(2, name, partitions)).expect("send");
            let closed = stream.read(&mut [0u8; 16]).map(|n| n == 0).unwrap_or(true);
            assert!(closed, "{addr} closes a connection that forges a peer frame");
        }
    }
    // Give a forged command the time it would take to commit, then look.
    let deadline = Instant::now() + Duration::from_secs(2);
    block_on(async {
        let client = Client::connect(&c.addrs.join(",")).await.expect("connect");
        while Instant::now() < deadline {
            let topics = client.list_topics().await.expect("list");
            assert_eq!(topics, vec!["t".to_owned()], "no forged topic");
            compio::time::sleep(Duration::from_millis(200)).await;
        }
        client.create_topic("real", 2, 3, &[]).await.expect("the cluster still serves its clients");
    });
}
