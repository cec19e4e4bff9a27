//! [`KinesisStreamClients`]: one [`KinesisStreamClient`] per stream of a multi-stream worker.

use std::sync::Arc;

use aws_sdk_kinesis::Client;

use super::KinesisStreamClient;
use crate::stream::StreamClient;
use crate::stream_tracker::StreamClients;

/// Makes a [`KinesisStreamClient`] for each stream a tracker lists, all sharing one SDK
/// client (its connections, credentials and endpoint).
#[derive(Debug, Clone)]
pub struct KinesisStreamClients {
    client: Client,
}

impl KinesisStreamClients {
    /// Clients of the streams `client` reaches.
    pub fn new(client: Client) -> Self {
        KinesisStreamClients { client }
    }
}

impl StreamClients for KinesisStreamClients {
    fn client(&self, stream: &str) -> Arc<dyn StreamClient> {
        Arc::new(KinesisStreamClient::new(self.client.clone(), stream))
    }
}
