//! Topic creation and deletion on the single-node runtime: shard 0 owns the topic metadata,
//! persists every change (`topics.json`), broadcasts the new snapshot to the other shards and
//! asks each partition's owner to open or delete it. Other shards forward these requests to
//! shard 0. Methods of [`Shard`], so the shard's message loop calls them without this module
//! and the shard importing each other.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use skein_client::wire::{
    CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse, ErrorCode, TopicResult,
};

use super::shard::ask;
use super::{Shard, ShardMsg};
use crate::core::controller::PARTITIONS_PER_TOPIC_MAX;
use crate::meta::{self, TopicMeta, Topics};

impl Shard {
    pub(crate) async fn create_topics(self: &Rc<Self>, req: CreateTopicsRequest) -> CreateTopicsResponse {
        if self.id != 0 {
            return ask(self, 0, |reply| ShardMsg::Create { req, reply })
                .await
                .unwrap_or(CreateTopicsResponse { results: vec![] });
        }
        let _serial = self.admin.lock().await;
        let mut results = Vec::new();
        for t in req.topics {
            let (error, message) = match self.create_one(&t).await {
                Ok(()) => (ErrorCode::NONE, String::new()),
                Err((code, msg)) => (code, msg),
            };
            results.push(TopicResult { name: t.name, error, message });
        }
        CreateTopicsResponse { results }
    }

    async fn create_one(self: &Rc<Self>, t: &skein_client::wire::NewTopic) -> Result<(), (ErrorCode, String)> {
        meta::validate_name(&t.name).map_err(|c| (c, "names are 1-249 characters of [A-Za-z0-9._-]".to_owned()))?;
        if t.partitions == 0 || t.partitions > PARTITIONS_PER_TOPIC_MAX {
            return Err((ErrorCode::INVALID_PARTITIONS, format!("partitions must be 1..={PARTITIONS_PER_TOPIC_MAX}")));
        }
        if t.replicas != 1 {
            return Err((
                ErrorCode::INVALID_PARTITIONS,
                "this is a single-node cluster: replicas must be 1".to_owned(),
            ));
        }
        let configs: BTreeMap<String, String> = t.configs.iter().map(|c| (c.key.clone(), c.value.clone())).collect();
        meta::log_config(&configs).map_err(|m| (ErrorCode::INVALID_CONFIG, m))?;
        let mut topics = (**self.topics.borrow()).clone();
        if topics.topics.contains_key(&t.name) {
            return Err((ErrorCode::TOPIC_ALREADY_EXISTS, format!("topic '{}' already exists", t.name)));
        }
        let meta = TopicMeta { name: t.name.clone(), partitions: t.partitions, replicas: t.replicas, configs };
        topics.topics.insert(t.name.clone(), meta);
        self.publish(topics).await.map_err(|e| (ErrorCode::STORAGE_ERROR, e))?;
        for p in 0..t.partitions {
            let (topic, owner) = (t.name.clone(), self.owner(&t.name, p));
            let opened = ask(self, owner, |reply| ShardMsg::OpenPartition { topic, partition: p, reply }).await;
            match opened {
                Some(Ok(())) => {}
                Some(Err(e)) => return Err((ErrorCode::STORAGE_ERROR, e)),
                None => return Err((ErrorCode::SHUTTING_DOWN, "broker stopping".to_owned())),
            }
        }
        Ok(())
    }

    pub(crate) async fn delete_topics(self: &Rc<Self>, req: DeleteTopicsRequest) -> DeleteTopicsResponse {
        if self.id != 0 {
            return ask(self, 0, |reply| ShardMsg::Delete { req, reply })
                .await
                .unwrap_or(DeleteTopicsResponse { results: vec![] });
        }
        let _serial = self.admin.lock().await;
        let mut results = Vec::new();
        for name in req.names {
            let mut topics = (**self.topics.borrow()).clone();
            let Some(t) = topics.topics.remove(&name) else {
                results.push(TopicResult {
                    name,
                    error: ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                    message: "no such topic".into(),
                });
                continue;
            };
            if let Err(e) = self.publish(topics).await {
                results.push(TopicResult { name, error: ErrorCode::STORAGE_ERROR, message: e });
                continue;
            }
            for p in 0..t.partitions {
                let (topic, owner) = (name.clone(), self.owner(&name, p));
                ask(self, owner, |reply| ShardMsg::DeletePartition { topic, partition: p, reply }).await;
            }
            results.push(TopicResult { name, error: ErrorCode::NONE, message: String::new() });
        }
        DeleteTopicsResponse { results }
    }

    /// Persists a new metadata snapshot, then hands it to every self.
    async fn publish(self: &Rc<Self>, topics: Topics) -> Result<(), String> {
        topics.save(&self.config.data_dir).map_err(|e| format!("{e:#}"))?;
        let topics = Arc::new(topics);
        *self.topics.borrow_mut() = topics.clone();
        for (i, peer) in self.peers.iter().enumerate() {
            if i != self.id {
                let _ = peer.send_async(ShardMsg::Topics(topics.clone())).await;
            }
        }
        Ok(())
    }
}
