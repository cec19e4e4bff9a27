//! One human-readable line per interval about what a worker did: the progress a person
//! watching `kcl-consumer` can see without a dashboard.

use std::fmt::Write as _;
use std::time::Duration;

use kcl_core::{CancellationToken, WorkerStatus};
use tokio::sync::watch;
use tracing::info;

/// The summary of what happened between two statuses `elapsed` apart.
pub fn summary_line(before: &WorkerStatus, now: &WorkerStatus, elapsed: Duration) -> String {
    let seconds = elapsed.as_secs_f64().max(f64::EPSILON);
    let records = now
        .records_processed
        .saturating_sub(before.records_processed);
    let bytes = now.bytes_processed.saturating_sub(before.bytes_processed);
    let mut line = format!(
        "{:.1} records/s, {:.1} KiB/s over {:.0} s; ",
        records as f64 / seconds,
        bytes as f64 / 1024.0 / seconds,
        elapsed.as_secs_f64(),
    );
    match now.max_millis_behind_latest() {
        Some(lag) => {
            let _ = write!(line, "max lag {lag} ms; ");
        }
        None => line.push_str("no lag known yet; "),
    }
    let _ = write!(
        line,
        "{} leases held of {} in the table, {} workers",
        now.held_leases.len(),
        now.active_leases,
        now.workers
    );
    if let Some(streams) = &now.streams {
        let _ = write!(line, "; {} streams", streams.followed);
        if streams.unreachable > 0 {
            let _ = write!(line, ", {} unreachable", streams.unreachable);
        }
        if streams.pending_deletion > 0 {
            let _ = write!(
                line,
                ", {} former awaiting deletion",
                streams.pending_deletion
            );
        }
    }
    let failures = now
        .processor_failures
        .saturating_sub(before.processor_failures)
        + now
            .checkpoint_failures
            .saturating_sub(before.checkpoint_failures);
    if failures > 0 {
        let _ = write!(line, "; {failures} processor or checkpoint failures");
    }
    line
}

/// Logs [`summary_line`] at info level every `interval` until `stop` is cancelled.
pub async fn log_summaries(
    status: watch::Receiver<WorkerStatus>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    // The first tick is immediate: it only takes the starting point.
    tick.tick().await;
    let mut before = status.borrow().clone();
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = status.borrow().clone();
        info!("progress: {}", summary_line(&before, &now, since.elapsed()));
        before = now;
        since = tokio::time::Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_lag_and_leases() {
        let before = WorkerStatus::default();
        let mut now = WorkerStatus::default();
        now.records_processed = 3_000;
        now.bytes_processed = 300 * 1024;
        now.millis_behind_latest.insert("shardId-0".into(), 250);
        now.millis_behind_latest.insert("shardId-1".into(), 1_200);
        now.held_leases.insert("shardId-0".into());
        now.held_leases.insert("shardId-1".into());
        now.active_leases = 4;
        now.workers = 2;
        assert_eq!(
            summary_line(&before, &now, Duration::from_secs(30)),
            "100.0 records/s, 10.0 KiB/s over 30 s; max lag 1200 ms; 2 leases held of 4 in the \
             table, 2 workers"
        );
    }

    #[test]
    fn a_multi_stream_worker_counts_its_streams() {
        let mut now = WorkerStatus::default();
        let mut streams = kcl_core::StreamsStatus::default();
        streams.followed = 3;
        now.streams = Some(streams.clone());
        let line = summary_line(&now.clone(), &now, Duration::from_secs(1));
        assert!(line.ends_with("0 workers; 3 streams"), "{line}");
        streams.unreachable = 1;
        streams.pending_deletion = 2;
        now.streams = Some(streams);
        let line = summary_line(&now.clone(), &now, Duration::from_secs(1));
        assert!(
            line.ends_with("; 3 streams, 1 unreachable, 2 former awaiting deletion"),
            "{line}"
        );
    }

    #[test]
    fn failures_are_named_only_when_there_are_some() {
        let mut before = WorkerStatus::default();
        before.processor_failures = 2;
        let mut now = before.clone();
        assert!(!summary_line(&before, &now, Duration::from_secs(1)).contains("failures"));
        now.processor_failures = 3;
        now.checkpoint_failures = 1;
        let line = summary_line(&before, &now, Duration::from_secs(1));
        assert!(
            line.ends_with("; 2 processor or checkpoint failures"),
            "{line}"
        );
        assert!(line.contains("no lag known yet"), "{line}");
    }
}
