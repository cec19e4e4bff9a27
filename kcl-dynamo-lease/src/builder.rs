//! [`AwsWorkerBuilder`]: a worker on Kinesis and DynamoDB from one AWS SDK configuration.

use std::sync::Arc;

use aws_types::SdkConfig;
use kcl_core::{
    KinesisStreamClient, KinesisStreamClients, RecordProcessorFactory, Result, StreamTracker,
    Worker, WorkerConfig,
};

use crate::DynamoLeaseStore;

/// Builds a [`Worker`] that reads a Kinesis data stream and keeps its leases in DynamoDB, from
/// one [`SdkConfig`] (region, credentials, endpoints, retries) and one [`WorkerConfig`].
///
/// The stream and the lease table are named once, in the worker configuration
/// ([`WorkerConfig::stream`], and [`WorkerConfig::lease_table`]: the application name unless
/// set otherwise), and both clients are built from those names, so a client can never read
/// another stream or table than the worker was configured with.
///
/// Per-service settings that differ from the shared configuration (another endpoint, region,
/// timeout or retry policy for one service) go in a client of your own:
/// [`with_kinesis_client`](Self::with_kinesis_client),
/// [`with_dynamodb_client`](Self::with_dynamodb_client).
///
/// ```no_run
/// use kcl_core::{CancellationToken, InitialPosition, WorkerConfig};
/// use kcl_dynamo_lease::AwsWorkerBuilder;
/// # use kcl_core::{Checkpointer, Record, RecordProcessor, async_trait};
/// # struct Printer;
/// # #[async_trait]
/// # impl RecordProcessor for Printer {
/// #     type Error = kcl_core::Error;
/// #     async fn process_records(&mut self, _: &[Record], c: &mut Checkpointer, _: Option<u64>) -> Result<(), Self::Error> { c.checkpoint().await }
/// # }
///
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let sdk = aws_config::load_from_env().await;
/// let config = WorkerConfig::new("order-counter", "orders")
///     .with_initial_position(InitialPosition::TrimHorizon);
/// // DynamoDB in another region than the stream, say: a client of its own.
/// let dynamodb = aws_sdk_dynamodb::Client::from_conf(
///     aws_sdk_dynamodb::config::Builder::from(&sdk)
///         .region(aws_sdk_dynamodb::config::Region::new("eu-west-1"))
///         .build(),
/// );
/// let worker = AwsWorkerBuilder::new(&sdk, config)
///     .with_dynamodb_client(dynamodb)
///     .build(|_shard_id: &str| Printer)?;
/// worker.run(CancellationToken::new()).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct AwsWorkerBuilder {
    config: WorkerConfig,
    kinesis: aws_sdk_kinesis::Client,
    dynamodb: aws_sdk_dynamodb::Client,
    create_table_if_missing: bool,
}

impl AwsWorkerBuilder {
    /// A builder for `config`, with a Kinesis and a DynamoDB client both made from `sdk`.
    pub fn new(sdk: &SdkConfig, config: WorkerConfig) -> Self {
        AwsWorkerBuilder {
            config,
            kinesis: aws_sdk_kinesis::Client::new(sdk),
            dynamodb: aws_sdk_dynamodb::Client::new(sdk),
            create_table_if_missing: true,
        }
    }

    /// Reads the stream with this client instead of one made from the shared configuration.
    /// The stream is still the one of the worker configuration.
    #[must_use]
    pub fn with_kinesis_client(mut self, client: aws_sdk_kinesis::Client) -> Self {
        self.kinesis = client;
        self
    }

    /// Keeps the leases with this client instead of one made from the shared configuration.
    /// The table is still the one of the worker configuration.
    #[must_use]
    pub fn with_dynamodb_client(mut self, client: aws_sdk_dynamodb::Client) -> Self {
        self.dynamodb = client;
        self
    }

    /// Whether the worker creates the lease table when it is missing (default `true`; see
    /// [`DynamoLeaseStore::with_create_if_missing`]).
    #[must_use]
    pub fn with_create_table_if_missing(mut self, create: bool) -> Self {
        self.create_table_if_missing = create;
        self
    }

    /// The worker configuration the clients are built for.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// The stream client and the lease store the worker would use, for tools that read the
    /// stream or the lease table of the same application.
    pub fn clients(&self) -> (KinesisStreamClient, DynamoLeaseStore) {
        let stream = KinesisStreamClient::new(self.kinesis.clone(), &self.config.stream);
        let leases = DynamoLeaseStore::new(self.dynamodb.clone(), self.config.lease_table())
            .with_create_if_missing(self.create_table_if_missing);
        (stream, leases)
    }

    /// The worker, with a processor per shard from `factory`.
    ///
    /// # Errors
    /// [`kcl_core::Error::InvalidConfig`] when the worker configuration does not validate.
    pub fn build<F: RecordProcessorFactory>(self, factory: F) -> Result<Worker<F>> {
        let (stream, leases) = self.clients();
        Worker::new(self.config, Arc::new(stream), Arc::new(leases), factory)
    }

    /// A multi-stream worker ([`Worker::multi_stream`]): it consumes the streams `tracker`
    /// lists, each through a client made from the Kinesis client of this builder, with one
    /// lease table for all of them. [`WorkerConfig::stream`] is only a label.
    ///
    /// # Errors
    /// [`kcl_core::Error::InvalidConfig`] when the worker configuration does not validate.
    pub fn build_multi_stream<F: RecordProcessorFactory>(
        self,
        tracker: Arc<dyn StreamTracker>,
        factory: F,
    ) -> Result<Worker<F>> {
        let (_, leases) = self.clients();
        Worker::multi_stream(
            self.config,
            tracker,
            Arc::new(KinesisStreamClients::new(self.kinesis)),
            Arc::new(leases),
            factory,
        )
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_dynamodb::config::{BehaviorVersion, Region};
    use kcl_core::{Error, LeaseStore, StreamClient};

    use super::*;

    fn sdk() -> SdkConfig {
        SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .build()
    }

    #[test]
    fn both_clients_use_the_names_of_the_worker_configuration() {
        let config = WorkerConfig::new("orders-app", "orders");
        let (stream, leases) = AwsWorkerBuilder::new(&sdk(), config).clients();
        assert_eq!(stream.stream_name(), "orders");
        assert_eq!(
            leases.table_name(),
            "orders-app",
            "the application name by default"
        );

        let config = WorkerConfig::new("orders-app", "orders").with_lease_table_name("leases");
        let other_dynamodb = aws_sdk_dynamodb::Client::new(&sdk());
        let (_, leases) = AwsWorkerBuilder::new(&sdk(), config)
            .with_dynamodb_client(other_dynamodb)
            .clients();
        assert_eq!(leases.table_name(), "leases", "an override keeps the table");
    }

    #[test]
    fn build_validates_the_worker_configuration() {
        let config = WorkerConfig::new("orders-app", " ");
        let factory = |_: &str| -> NoProcessor { unreachable!("never built") };
        match AwsWorkerBuilder::new(&sdk(), config).build(factory) {
            Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "stream"),
            other => panic!(
                "expected InvalidConfig, got {:?}",
                other.map(|_| "a worker")
            ),
        }
    }

    /// A processor type for a factory that is never called.
    struct NoProcessor;

    #[kcl_core::async_trait]
    impl kcl_core::RecordProcessor for NoProcessor {
        type Error = Error;
        async fn process_records(
            &mut self,
            _: &[kcl_core::Record],
            _: &mut kcl_core::Checkpointer,
            _: Option<u64>,
        ) -> std::result::Result<(), Self::Error> {
            unreachable!("the worker is never run")
        }
    }
}
