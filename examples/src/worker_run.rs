//! Runs a worker as the example programs do: with the metrics server (`--metrics-addr`) and
//! the progress line (`--summary-interval`) beside it, all stopped and awaited together.

use std::sync::Arc;

use kcl_core::{
    CancellationToken, ErrorChain, FixedStreams, RecordProcessorFactory, StreamConfig,
    StreamTracker, StreamsByPrefix, WorkerConfig,
};
use kcl_dynamo_lease::AwsWorkerBuilder;
use tracing::{error, info};

use crate::health::{HealthServer, install_prometheus};
use crate::summary::log_summaries;
use crate::worker_args::WorkerArgs;

/// A helper task beside the worker (the metrics server) that failed; the worker was shut
/// down gracefully because of it.
pub type HelperFailure = String;

/// Builds the worker from `config` and runs it until `shutdown` is cancelled or it fails,
/// with the helpers `args` asks for. `Ok(Some(_))`: the worker stopped cleanly, but because a
/// helper failed. On every return the helpers have stopped and `shutdown` is cancelled, so a
/// deadline enforced on it bounds what the caller does next.
pub async fn run_worker<F: RecordProcessorFactory>(
    sdk: &aws_config::SdkConfig,
    config: WorkerConfig,
    args: &WorkerArgs,
    factory: F,
    shutdown: CancellationToken,
) -> Result<Option<HelperFailure>, Box<dyn std::error::Error>> {
    // Bound before the worker starts, so a taken port fails the start-up. The recorder is
    // installed before the worker exists: instruments are registered as it creates them.
    let health = match args.metrics_addr {
        Some(addr) => {
            let prometheus = install_prometheus(&[("application", &args.app)])
                .map_err(|e| format!("installing the Prometheus recorder: {e}"))?;
            Some((HealthServer::bind(addr).await?, prometheus))
        }
        None => None,
    };
    let lease_duration = config.lease.lease_duration;
    let deadline = config.shutdown_deadline();
    let builder = AwsWorkerBuilder::new(sdk, config);
    let worker = if args.is_multi_stream() {
        let kinesis = aws_sdk_kinesis::Client::new(sdk);
        let position = builder.config().initial_position;
        let tracker: Arc<dyn StreamTracker> = match &args.stream_prefix {
            Some(prefix) => {
                Arc::new(StreamsByPrefix::new(kinesis, prefix).with_initial_position(position))
            }
            None => Arc::new(FixedStreams(
                args.stream
                    .iter()
                    .map(|s| StreamConfig::new(s).with_initial_position(position))
                    .collect(),
            )),
        };
        builder.build_multi_stream(tracker, factory)?
    } else {
        builder.build(factory)?
    };
    info!(worker_id = worker.worker_id(), shutdown_deadline = ?deadline, "starting");
    // The helpers run until the worker has stopped, and are awaited: a failure is reported.
    let helpers_stop = CancellationToken::new();
    let mut helpers = tokio::task::JoinSet::new();
    if let Some((server, prometheus)) = health {
        info!(address = %server.local_addr()?, "serving /metrics, /healthz and /readyz");
        let serve = server.serve(
            prometheus,
            worker.status(),
            lease_duration,
            shutdown.clone(),
            helpers_stop.clone(),
        );
        helpers.spawn(async move { serve.await.map_err(|e| format!("metrics server: {e}")) });
    }
    if !args.summary_interval.is_zero() {
        let summaries = log_summaries(worker.status(), args.summary_interval, helpers_stop.clone());
        helpers.spawn(async move {
            summaries.await;
            Ok(())
        });
    }
    // A helper that fails (the metrics server) shuts the worker down gracefully; the worker's
    // future is never dropped midway, which would abandon its leases.
    let run = worker.run(shutdown.clone());
    tokio::pin!(run);
    let mut helper_failure: Option<HelperFailure> = None;
    let outcome = loop {
        tokio::select! {
            outcome = &mut run => break outcome,
            Some(joined) = helpers.join_next(), if helper_failure.is_none() => {
                let failure = match joined {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => e,
                    Err(e) => format!("a helper task failed: {}", ErrorChain(&e)),
                };
                error!(error = %failure, "shutting down");
                helper_failure = Some(failure);
                shutdown.cancel();
            }
        }
    };
    // What is left is bounded by the caller's deadline too, also after a fatal error.
    shutdown.cancel();
    helpers_stop.cancel();
    while let Some(joined) = helpers.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(error = %e, "a helper task failed"),
            Err(e) => error!(error = %ErrorChain(&e), "a helper task failed"),
        }
    }
    outcome?;
    Ok(helper_failure)
}
