//! Inter-broker messages on the wire: one [`Message`] of the sans-IO core per frame, sent one
//! way (no response) as an `ApiKey::Cluster` request on the broker's listener, and the links
//! that carry them.
//!
//! Decoding never panics: a frame that does not decode closes the connection it came on.
//! Raft's own messages travel in raft-rs's protobuf encoding; a Raft message that does not
//! encode is an error of [`try_encode_frame`] and is not sent (never an empty stand-in, which
//! would decode as another message).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::BytesMut;
use protobuf::Message as _;
use raft::prelude::Message as RaftMessage;
use skein_client::partitioning::Partitioning;
use skein_client::wire::io::write_frames;
use skein_client::wire::{request_frame, ApiKey, DecodeError, Reader, RequestHeader, Wire, Writer};

use crate::core::txn_partition::MarkerKind;
use crate::core::{
    FetchRequest, FetchResponse, IsrVersion, LeaderEpoch, MarkerRequest, MarkerResult, Message, NodeId, Offset,
    PartitionId, PartitionState, ProduceError, ProducerEpoch, ProducerId, Seal, Time,
};

/// One inter-broker frame's body.
#[derive(Debug, PartialEq)]
pub(crate) struct PeerFrame {
    /// The sending broker.
    pub from: NodeId,
    /// Sent by the sender's controller voter (not its broker).
    pub from_controller: bool,
    /// The message.
    pub msg: Message,
}

fn put<T: Wire>(w: &mut Writer, v: T) {
    v.encode(w);
}

fn bytes(w: &mut Writer, b: &[u8]) {
    (b.len() as u32).encode(w);
    w.buf.extend_from_slice(b);
}

fn get<T: Wire>(r: &mut Reader) -> Result<T, DecodeError> {
    T::decode(r)
}

fn marker_code(k: MarkerKind) -> u8 {
    match k {
        MarkerKind::Abort => 0,
        MarkerKind::Commit => 1,
        MarkerKind::Begin => 2,
    }
}

fn marker_kind(code: u8) -> Result<MarkerKind, DecodeError> {
    Ok(match code {
        0 => MarkerKind::Abort,
        1 => MarkerKind::Commit,
        2 => MarkerKind::Begin,
        _ => return Err(DecodeError::Invalid("transaction marker kind")),
    })
}

/// Marker outcomes on the wire: 0 success, else the error's number.
const RESULTS: [ProduceError; 10] = [
    ProduceError::NotLeader,
    ProduceError::FencedLeaderEpoch,
    ProduceError::NotEnoughReplicas,
    ProduceError::Abandoned,
    ProduceError::Storage,
    ProduceError::OutOfOrderSequence,
    ProduceError::ProducerFenced,
    ProduceError::LeaderNotReady,
    ProduceError::InvalidTxnState,
    ProduceError::Sealed,
];

fn result_code(r: Result<(), ProduceError>) -> u8 {
    match r {
        Ok(()) => 0,
        Err(e) => RESULTS.iter().position(|x| *x == e).map_or(4, |i| i as u8 + 1),
    }
}

fn result_of(code: u8) -> Result<Result<(), ProduceError>, DecodeError> {
    match code {
        0 => Ok(Ok(())),
        c => RESULTS.get(usize::from(c) - 1).map(|e| Err(*e)).ok_or(DecodeError::Invalid("marker outcome")),
    }
}

fn nodes(v: &[NodeId]) -> Vec<u32> {
    v.iter().map(|n| n.0).collect()
}

fn get_nodes(r: &mut Reader) -> Result<Vec<NodeId>, DecodeError> {
    Ok(get::<Vec<u32>>(r)?.into_iter().map(NodeId).collect())
}

fn encode_state(w: &mut Writer, s: &PartitionState) {
    put(w, s.partition.0);
    put(w, s.epoch.0);
    put(w, s.leader.map(|l| l.0));
    put(w, nodes(&s.isr));
    put(w, s.isr_version.0);
    put(w, nodes(&s.replicas));
    match s.seal {
        Seal::Open => put(w, 0u8),
        Seal::Sealing => put(w, 1u8),
        Seal::Sealed(at) => {
            put(w, 2u8);
            put(w, at.0);
        }
    }
}

fn decode_state(r: &mut Reader) -> Result<PartitionState, DecodeError> {
    Ok(PartitionState {
        partition: PartitionId(get(r)?),
        epoch: LeaderEpoch(get(r)?),
        leader: get::<Option<u32>>(r)?.map(NodeId),
        isr: get_nodes(r)?,
        isr_version: IsrVersion(get(r)?),
        replicas: get_nodes(r)?,
        seal: match get::<u8>(r)? {
            0 => Seal::Open,
            1 => Seal::Sealing,
            2 => Seal::Sealed(Offset(get(r)?)),
            _ => return Err(DecodeError::Invalid("partition seal")),
        },
    })
}

impl PeerFrame {
    /// Appends the frame's encoding, or fails if its Raft message does not encode (raft-rs's
    /// protobuf encoder returns an error rather than a message it cannot write); on an error
    /// `w` may hold part of the frame.
    fn try_encode(&self, w: &mut Writer) -> Result<(), protobuf::ProtobufError> {
        put(w, self.from.0);
        put(w, self.from_controller);
        match &self.msg {
            Message::Raft(m) => {
                put(w, 0u8);
                // Never an empty stand-in: it would decode as a different (default) message.
                bytes(w, &m.write_to_bytes()?);
            }
            Message::Fetch(f) => {
                put(w, 1u8);
                put(w, f.partition.0);
                put(w, f.replica.0);
                put(w, f.epoch.0);
                put(w, f.fetch_offset.0);
                put(w, f.last_fetched_epoch.map(|e| e.0));
                put(w, f.durable_offset.0);
                put(w, f.high_watermark.0);
                put(w, f.correlation);
            }
            Message::FetchResponse(FetchResponse::Records {
                partition,
                correlation,
                epoch,
                batches,
                high_watermark,
            }) => {
                put(w, 2u8);
                put(w, partition.0);
                put(w, *correlation);
                put(w, epoch.0);
                bytes(w, batches);
                put(w, high_watermark.0);
            }
            Message::FetchResponse(FetchResponse::Diverging {
                partition,
                correlation,
                epoch,
                end_epoch,
                end_offset,
            }) => {
                put(w, 3u8);
                put(w, partition.0);
                put(w, *correlation);
                put(w, epoch.0);
                put(w, end_epoch.0);
                put(w, end_offset.0);
            }
            Message::FetchResponse(FetchResponse::Fenced { partition, correlation, epoch }) => {
                put(w, 4u8);
                put(w, partition.0);
                put(w, *correlation);
                put(w, epoch.0);
            }
            Message::FetchResponse(FetchResponse::OutOfRange { partition, correlation, epoch, log_start }) => {
                put(w, 13u8);
                put(w, partition.0);
                put(w, *correlation);
                put(w, epoch.0);
                put(w, log_start.0);
            }
            Message::Heartbeat { broker, incarnation, lost, sent } => {
                put(w, 5u8);
                put(w, broker.0);
                put(w, *incarnation);
                put(w, lost.iter().map(|p| p.0).collect::<Vec<u32>>());
                put(w, sent.0);
            }
            Message::HeartbeatResponse { incarnation, sent, alive, partitions } => {
                put(w, 6u8);
                put(w, *incarnation);
                put(w, sent.0);
                put(w, *alive);
                put(w, partitions.len() as u32);
                for s in partitions {
                    encode_state(w, s);
                }
            }
            Message::AlterIsr { leader, epoch, isr_version, partition, isr } => {
                put(w, 7u8);
                put(w, leader.0);
                put(w, epoch.0);
                put(w, isr_version.0);
                put(w, partition.0);
                put(w, nodes(isr));
            }
            Message::PartitionState(s) => {
                put(w, 8u8);
                encode_state(w, s);
            }
            Message::DeleteTopic { name } => {
                put(w, 12u8);
                put(w, name.clone());
            }
            Message::TxnMarker(m) => {
                put(w, 14u8);
                put(w, m.coordinator.0);
                put(w, m.coordinator_partition.0);
                put(w, m.correlation);
                put(w, m.partition.0);
                put(w, m.producer.0);
                put(w, m.epoch.0);
                put(w, marker_code(m.kind));
            }
            Message::TxnMarkerResult(m) => {
                put(w, 15u8);
                put(w, m.coordinator_partition.0);
                put(w, m.correlation);
                put(w, m.partition.0);
                put(w, result_code(m.result));
            }
            Message::Reassign { partition, replicas } => {
                put(w, 11u8);
                put(w, partition.0);
                put(w, nodes(replicas));
            }
            Message::ControlledShutdown { broker, incarnation } => {
                put(w, 10u8);
                put(w, broker.0);
                put(w, *incarnation);
            }
            Message::CreateTopic { name, partitions, replication, partitioning, configs } => {
                put(w, 9u8);
                put(w, name.clone());
                put(w, *partitions);
                put(w, *replication);
                put(w, configs.len() as u32);
                for (k, v) in configs {
                    put(w, k.clone());
                    put(w, v.clone());
                }
                put(w, partitioning.to_wire());
            }
            Message::Sealed { leader, epoch, partition, offset } => {
                put(w, 16u8);
                put(w, leader.0);
                put(w, epoch.0);
                put(w, partition.0);
                put(w, offset.0);
            }
            Message::Split { topic, index, at } => {
                put(w, 17u8);
                put(w, topic.clone());
                put(w, *index);
                put(w, at.clone());
            }
            Message::Merge { topic, indexes } => {
                put(w, 18u8);
                put(w, topic.clone());
                put(w, indexes[0]);
                put(w, indexes[1]);
            }
            Message::Load { leader, epoch, partition, load } => {
                put(w, 19u8);
                put(w, leader.0);
                put(w, epoch.0);
                put(w, partition.0);
                put(w, load.records_per_s);
                put(w, load.bytes_per_s);
                put(w, load.size_bytes);
                put(w, load.keys.clone());
            }
        }
        Ok(())
    }
}

impl Wire for PeerFrame {
    /// The send path uses [`try_encode_frame`], which returns the error. Here a frame whose
    /// Raft message does not encode is logged and encoded as nothing, which no receiver
    /// decodes: never as another message.
    fn encode(&self, w: &mut Writer) {
        let start = w.buf.len();
        if let Err(e) = self.try_encode(w) {
            tracing::error!(from = %self.from, error = %e, "an inter-broker message does not encode; not sent");
            w.buf.truncate(start);
        }
    }

    fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        let from = NodeId(get(r)?);
        let from_controller = get(r)?;
        let tag: u8 = get(r)?;
        let msg = match tag {
            0 => {
                let b: BytesMut = get(r)?;
                let m = RaftMessage::parse_from_bytes(&b).map_err(|_| DecodeError::Invalid("raft message"))?;
                Message::Raft(Box::new(m))
            }
            1 => Message::Fetch(FetchRequest {
                partition: PartitionId(get(r)?),
                replica: NodeId(get(r)?),
                epoch: LeaderEpoch(get(r)?),
                fetch_offset: Offset(get(r)?),
                last_fetched_epoch: get::<Option<u32>>(r)?.map(LeaderEpoch),
                durable_offset: Offset(get(r)?),
                high_watermark: Offset(get(r)?),
                correlation: get(r)?,
            }),
            2 => Message::FetchResponse(FetchResponse::Records {
                partition: PartitionId(get(r)?),
                correlation: get(r)?,
                epoch: LeaderEpoch(get(r)?),
                batches: get::<BytesMut>(r)?.to_vec(),
                high_watermark: Offset(get(r)?),
            }),
            3 => Message::FetchResponse(FetchResponse::Diverging {
                partition: PartitionId(get(r)?),
                correlation: get(r)?,
                epoch: LeaderEpoch(get(r)?),
                end_epoch: LeaderEpoch(get(r)?),
                end_offset: Offset(get(r)?),
            }),
            4 => Message::FetchResponse(FetchResponse::Fenced {
                partition: PartitionId(get(r)?),
                correlation: get(r)?,
                epoch: LeaderEpoch(get(r)?),
            }),
            5 => Message::Heartbeat {
                broker: NodeId(get(r)?),
                incarnation: get(r)?,
                lost: get::<Vec<u32>>(r)?.into_iter().map(PartitionId).collect(),
                sent: Time(get(r)?),
            },
            6 => {
                let incarnation = get(r)?;
                let sent = Time(get(r)?);
                let alive = get(r)?;
                let n = r.array_len("partition states")?;
                let mut partitions = Vec::with_capacity(n);
                for _ in 0..n {
                    partitions.push(decode_state(r)?);
                }
                Message::HeartbeatResponse { incarnation, sent, alive, partitions }
            }
            7 => Message::AlterIsr {
                leader: NodeId(get(r)?),
                epoch: LeaderEpoch(get(r)?),
                isr_version: IsrVersion(get(r)?),
                partition: PartitionId(get(r)?),
                isr: get_nodes(r)?,
            },
            8 => Message::PartitionState(decode_state(r)?),
            9 => {
                let name = get(r)?;
                let partitions = get(r)?;
                let replication = get(r)?;
                let n = r.array_len("topic configs")?;
                let mut configs = Vec::with_capacity(n);
                for _ in 0..n {
                    configs.push((get(r)?, get(r)?));
                }
                let scheme: u8 = get(r)?;
                let partitioning = Partitioning::from_wire(scheme).ok_or(DecodeError::Invalid("partitioning"))?;
                Message::CreateTopic { name, partitions, replication, partitioning, configs }
            }
            16 => Message::Sealed {
                leader: NodeId(get(r)?),
                epoch: LeaderEpoch(get(r)?),
                partition: PartitionId(get(r)?),
                offset: Offset(get(r)?),
            },
            17 => Message::Split { topic: get(r)?, index: get(r)?, at: get(r)? },
            18 => Message::Merge { topic: get(r)?, indexes: [get(r)?, get(r)?] },
            19 => {
                let (leader, epoch, partition) = (NodeId(get(r)?), LeaderEpoch(get(r)?), PartitionId(get(r)?));
                let (records_per_s, bytes_per_s, size_bytes) = (get(r)?, get(r)?, get(r)?);
                let keys: Vec<Vec<u8>> = get(r)?;
                let bounded = keys.len() <= crate::core::autosplit::SAMPLES_MAX
                    && keys.iter().all(|k| k.len() <= crate::core::autosplit::SAMPLE_KEY_BYTES_MAX);
                if !bounded {
                    return Err(DecodeError::Invalid("load report keys"));
                }
                let load = crate::core::autosplit::Load { records_per_s, bytes_per_s, size_bytes, keys };
                Message::Load { leader, epoch, partition, load }
            }
            10 => Message::ControlledShutdown { broker: NodeId(get(r)?), incarnation: get(r)? },
            11 => Message::Reassign { partition: PartitionId(get(r)?), replicas: get_nodes(r)? },
            12 => Message::DeleteTopic { name: get(r)? },
            13 => Message::FetchResponse(FetchResponse::OutOfRange {
                partition: PartitionId(get(r)?),
                correlation: get(r)?,
                epoch: LeaderEpoch(get(r)?),
                log_start: Offset(get(r)?),
            }),
            14 => Message::TxnMarker(MarkerRequest {
                coordinator: NodeId(get(r)?),
                coordinator_partition: PartitionId(get(r)?),
                correlation: get(r)?,
                partition: PartitionId(get(r)?),
                producer: ProducerId(get(r)?),
                epoch: ProducerEpoch(get(r)?),
                kind: marker_kind(get(r)?)?,
            }),
            15 => Message::TxnMarkerResult(MarkerResult {
                coordinator_partition: PartitionId(get(r)?),
                correlation: get(r)?,
                partition: PartitionId(get(r)?),
                result: result_of(get(r)?)?,
            }),
            _ => return Err(DecodeError::Invalid("inter-broker message type")),
        };
        Ok(PeerFrame { from, from_controller, msg })
    }
}

/// The frame (length prefix, request header, body) carrying `frame`, or the error if its Raft
/// message does not encode. The caller drops such a message (Raft resends as after a loss).
pub(crate) fn try_encode_frame(frame: &PeerFrame) -> Result<Vec<u8>, protobuf::ProtobufError> {
    let header = RequestHeader {
        api_key: ApiKey::Cluster,
        api_version: 0,
        correlation_id: 0,
        client_id: format!("skein-broker-{}", frame.from.0),
    };
    let mut body = Writer::default();
    frame.try_encode(&mut body)?;
    Ok(request_frame(&header, &Encoded(body.buf)))
}

/// A frame body already encoded (by the fallible [`PeerFrame::try_encode`]), for the client
/// library's framing; send-only.
struct Encoded(Vec<u8>);

impl Wire for Encoded {
    fn encode(&self, w: &mut Writer) {
        w.buf.extend_from_slice(&self.0);
    }

    fn decode(_: &mut Reader) -> Result<Self, DecodeError> {
        Err(DecodeError::Invalid("a send-only frame body"))
    }
}

/// How many frames wait for a slow or unreachable peer before new ones are dropped (the core
/// treats every message as losable: fetches and heartbeats are retried, Raft resends).
const QUEUE_FRAMES: usize = 4096;

/// An outgoing link to one peer: a queue and a task that connects (from this broker's own
/// address, so network rules can tell brokers apart), writes queued frames, and reconnects
/// after a failure. Frames queued while the peer is unreachable are dropped.
pub(crate) struct PeerLink {
    tx: flume::Sender<Vec<u8>>,
}

impl PeerLink {
    /// Starts the link's task on the current runtime.
    pub(crate) fn start(me: NodeId, local_ip: IpAddr, peer: NodeId, addr: SocketAddr) -> PeerLink {
        let (tx, rx) = flume::bounded::<Vec<u8>>(QUEUE_FRAMES);
        compio::runtime::spawn(async move {
            loop {
                let stream = match connect(local_ip, addr).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(%me, %peer, %addr, error = %e, "peer connect failed");
                        // Drop what queued up meanwhile: stale by the time the peer is back.
                        while rx.try_recv().is_ok() {}
                        compio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                tracing::debug!(%me, %peer, %addr, "peer connected");
                let (_reader, mut writer) = stream.into_split();
                while let Ok(first) = rx.recv_async().await {
                    let mut frames = vec![first];
                    frames.extend(rx.try_iter().take(255));
                    if let Err(e) = write_frames(&mut writer, frames).await {
                        tracing::debug!(%me, %peer, error = %e, "peer write failed; reconnecting");
                        break;
                    }
                }
                if rx.is_disconnected() {
                    return;
                }
            }
        })
        .detach();
        PeerLink { tx }
    }

    /// Queues a frame; drops it if the queue is full.
    pub(crate) fn send(&self, frame: Vec<u8>) {
        let _ = self.tx.try_send(frame);
    }
}

/// Connects to `addr` from `local_ip` (port chosen by the kernel), off the runtime thread.
async fn connect(local_ip: IpAddr, addr: SocketAddr) -> std::io::Result<compio::net::TcpStream> {
    let std_stream = compio::runtime::spawn_blocking(move || -> std::io::Result<std::net::TcpStream> {
        let domain = if addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
        let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        socket.bind(&SocketAddr::new(local_ip, 0).into())?;
        socket.connect_timeout(&addr.into(), Duration::from_millis(500))?;
        socket.set_tcp_nodelay(true)?;
        Ok(socket.into())
    })
    .await
    .map_err(|_| std::io::Error::other("connect task panicked"))??;
    compio::net::TcpStream::from_std(std_stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use skein_client::wire::decode_exact;

    fn roundtrip(msg: Message) {
        let f = PeerFrame { from: NodeId(2), from_controller: true, msg };
        let mut w = Writer::default();
        f.encode(&mut w);
        let back: PeerFrame = decode_exact(Reader::new(BytesMut::from(&w.buf[..]))).expect("decodes");
        assert_eq!(back, f);
        // The send path builds the same frame as the client library's request framing.
        let header = RequestHeader {
            api_key: ApiKey::Cluster,
            api_version: 0,
            correlation_id: 0,
            client_id: "skein-broker-2".into(),
        };
        assert_eq!(try_encode_frame(&f).expect("encodes"), request_frame(&header, &f));
        // Every strict prefix fails to decode (and does not panic).
        for cut in 0..w.buf.len() {
            assert!(decode_exact::<PeerFrame>(Reader::new(BytesMut::from(&w.buf[..cut]))).is_err(), "prefix {cut}");
        }
    }

    #[test]
    fn every_message_kind_round_trips_and_truncations_fail() {
        let state = PartitionState {
            partition: PartitionId(7),
            epoch: LeaderEpoch(3),
            leader: Some(NodeId(1)),
            isr: vec![NodeId(1), NodeId(2)],
            isr_version: IsrVersion(9),
            replicas: vec![NodeId(1), NodeId(2), NodeId(3)],
            seal: Seal::Sealed(Offset(41)),
        };
        let raft = RaftMessage { to: 3, from: 2, term: 5, ..Default::default() };
        roundtrip(Message::Raft(Box::new(raft)));
        roundtrip(Message::Fetch(FetchRequest {
            partition: PartitionId(1),
            replica: NodeId(2),
            epoch: LeaderEpoch(4),
            fetch_offset: Offset(100),
            last_fetched_epoch: Some(LeaderEpoch(3)),
            durable_offset: Offset(90),
            high_watermark: Offset(80),
            correlation: 77,
        }));
        roundtrip(Message::FetchResponse(FetchResponse::Records {
            partition: PartitionId(1),
            correlation: 77,
            epoch: LeaderEpoch(4),
            batches: vec![1, 2, 3],
            high_watermark: Offset(95),
        }));
        roundtrip(Message::FetchResponse(FetchResponse::Diverging {
            partition: PartitionId(1),
            correlation: 78,
            epoch: LeaderEpoch(4),
            end_epoch: LeaderEpoch(2),
            end_offset: Offset(50),
        }));
        roundtrip(Message::FetchResponse(FetchResponse::OutOfRange {
            partition: PartitionId(3),
            correlation: 8,
            epoch: LeaderEpoch(4),
            log_start: Offset(1_000),
        }));
        roundtrip(Message::FetchResponse(FetchResponse::Fenced {
            partition: PartitionId(1),
            correlation: 79,
            epoch: LeaderEpoch(4),
        }));
        roundtrip(Message::Heartbeat { broker: NodeId(2), incarnation: 12, lost: vec![PartitionId(3)], sent: Time(5) });
        roundtrip(Message::HeartbeatResponse {
            incarnation: 12,
            sent: Time(5),
            alive: true,
            partitions: vec![state.clone()],
        });
        roundtrip(Message::AlterIsr {
            leader: NodeId(1),
            epoch: LeaderEpoch(3),
            isr_version: IsrVersion(9),
            partition: PartitionId(7),
            isr: vec![NodeId(1)],
        });
        roundtrip(Message::PartitionState(PartitionState { seal: Seal::Sealing, ..state.clone() }));
        roundtrip(Message::PartitionState(state));
        roundtrip(Message::Sealed {
            leader: NodeId(1),
            epoch: LeaderEpoch(3),
            partition: PartitionId(7),
            offset: Offset(1 << 40),
        });
        roundtrip(Message::Split { topic: "t".into(), index: 3, at: Some(b"m".to_vec()) });
        roundtrip(Message::Split { topic: "t".into(), index: 3, at: None });
        roundtrip(Message::Merge { topic: "t".into(), indexes: [4, 2] });
        let load = crate::core::autosplit::Load {
            records_per_s: 5_000,
            bytes_per_s: 1 << 20,
            size_bytes: 1 << 30,
            keys: vec![b"k1".to_vec(), Vec::new()],
        };
        roundtrip(Message::Load { leader: NodeId(1), epoch: LeaderEpoch(3), partition: PartitionId(7), load });
        roundtrip(Message::ControlledShutdown { broker: NodeId(3), incarnation: 4 });
        roundtrip(Message::DeleteTopic { name: "gone".into() });
        roundtrip(Message::TxnMarker(MarkerRequest {
            coordinator: NodeId(2),
            coordinator_partition: PartitionId(9),
            correlation: 77,
            partition: PartitionId(4),
            producer: ProducerId(1 << 41),
            epoch: ProducerEpoch(3),
            kind: MarkerKind::Commit,
        }));
        for result in [Ok(()), Err(ProduceError::NotLeader), Err(ProduceError::InvalidTxnState)] {
            roundtrip(Message::TxnMarkerResult(MarkerResult {
                coordinator_partition: PartitionId(9),
                correlation: 77,
                partition: PartitionId(4),
                result,
            }));
        }
        roundtrip(Message::Reassign { partition: PartitionId(2), replicas: vec![NodeId(3), NodeId(1)] });
        roundtrip(Message::CreateTopic {
            name: "t".into(),
            partitions: 8,
            replication: 3,
            partitioning: Partitioning::KeyRange,
            configs: vec![("min.insync.replicas".into(), "2".into())],
        });
    }

    #[test]
    fn unknown_message_type_is_an_error() {
        let mut w = Writer::default();
        put(&mut w, 1u32);
        put(&mut w, false);
        put(&mut w, 200u8);
        assert!(decode_exact::<PeerFrame>(Reader::new(BytesMut::from(&w.buf[..]))).is_err());
    }
}
