//! [`StreamsByPrefix`]: a [`StreamTracker`] on `ListStreams`.

use async_trait::async_trait;
use aws_sdk_kinesis::Client;

use super::classify;
use crate::config::InitialPosition;
use crate::error::Result;
use crate::stream_tracker::{StreamConfig, StreamTracker};

/// Every stream of the account and region whose name starts with a prefix (`orders-`), each
/// read from one initial position. `ListStreams` is called once per discovery interval,
/// following all its pages (Kinesis serves 5 calls a second per account).
#[derive(Debug, Clone)]
pub struct StreamsByPrefix {
    client: Client,
    prefix: String,
    initial_position: InitialPosition,
}

impl StreamsByPrefix {
    /// The streams named `prefix…`, read from [`InitialPosition::Latest`].
    pub fn new(client: Client, prefix: impl Into<String>) -> Self {
        StreamsByPrefix {
            client,
            prefix: prefix.into(),
            initial_position: InitialPosition::Latest,
        }
    }

    /// Where the shards of the streams found start when they have no checkpoint.
    #[must_use]
    pub fn with_initial_position(mut self, position: InitialPosition) -> Self {
        self.initial_position = position;
        self
    }
}

#[async_trait]
impl StreamTracker for StreamsByPrefix {
    async fn streams(&self) -> Result<Vec<StreamConfig>> {
        const OPERATION: &str = "ListStreams";
        let mut names = Vec::new();
        let mut pages = self.client.list_streams().into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify(&self.prefix, OPERATION, None, e))?;
            names.extend(
                page.stream_names()
                    .iter()
                    .filter(|name| name.starts_with(&self.prefix))
                    .cloned(),
            );
        }
        names.sort();
        Ok(names
            .into_iter()
            .map(|name| StreamConfig::new(name).with_initial_position(self.initial_position))
            .collect())
    }
}
