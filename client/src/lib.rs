//! Skein's client library: producer, consumer and the wire protocol shared with the broker.
//!
//! Skeleton: the wire protocol, producer and consumer arrive with the single-node broker
//! issue. Record batches already have their format in `skein_log::batch`, which producers
//! will build with `BatchBuilder` and consumers read in place.
#![warn(missing_docs)]
