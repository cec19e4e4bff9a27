//! `kcl-consumer --metrics-addr`: the metrics in Prometheus text format on `/metrics`, and the
//! health checks `/healthz` (the process is up) and `/readyz` (the worker can do its job).
//!
//! Rendering is `metrics-exporter-prometheus`'s; serving is axum's. The server runs until its
//! stop token is cancelled, which `kcl-consumer` does only after the worker has stopped, so
//! an orchestrator sees `/readyz` fail during the whole shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use kcl_core::{CancellationToken, WorkerStatus};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;
use tokio::time::Instant;

/// Why the worker is not ready, or that it is.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Readiness {
    /// It has reached the lease table within a lease duration and has run a taking round: it
    /// holds leases or is waiting for them.
    Ready,
    /// It is not, for the reason given.
    NotReady(String),
}

/// Readiness from the worker's status at `now`: not ready before the first answer of the
/// lease table and the first taking round, nor once the table has not answered for a lease
/// duration (by then every lease this worker held has run out, so it processes nothing), nor
/// while shutting down.
pub fn readiness(
    status: &WorkerStatus,
    now: Instant,
    lease_duration: Duration,
    shutting_down: bool,
) -> Readiness {
    if shutting_down {
        return Readiness::NotReady("shutting down".into());
    }
    let Some(reached) = status.lease_table_reached_at else {
        return Readiness::NotReady("has not reached the lease table yet".into());
    };
    let silent = now.saturating_duration_since(reached);
    if silent >= lease_duration {
        return Readiness::NotReady(format!(
            "the lease table has not answered for {} ms (lease duration {} ms)",
            silent.as_millis(),
            lease_duration.as_millis()
        ));
    }
    if status.taking_rounds == 0 {
        return Readiness::NotReady("no taking round yet".into());
    }
    Readiness::Ready
}

/// Installs the Prometheus recorder for the whole process; every worker reports into it.
///
/// # Errors
/// When a recorder is already installed.
pub fn install_prometheus(
    global_labels: &[(&str, &str)],
) -> Result<PrometheusHandle, Box<dyn std::error::Error + Send + Sync>> {
    let mut builder = PrometheusBuilder::new();
    for (key, value) in global_labels {
        builder = builder.add_global_label(*key, *value);
    }
    Ok(builder.install_recorder()?)
}

#[derive(Clone)]
struct Served {
    prometheus: PrometheusHandle,
    status: watch::Receiver<WorkerStatus>,
    lease_duration: Duration,
    shutting_down: CancellationToken,
}

/// How often histograms and summaries are trimmed (the exporter leaves it to its user when it
/// does not run its own listener).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The metrics and health server of one worker.
#[derive(Debug)]
pub struct HealthServer {
    listener: tokio::net::TcpListener,
}

impl HealthServer {
    /// Binds `addr` now, so a bad address fails the start-up, not a task later.
    ///
    /// # Errors
    /// The bind error, naming the address.
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("binding the metrics address {addr}: {e}"))
        })?;
        Ok(HealthServer { listener })
    }

    /// The address bound (the port chosen, when asked for port 0).
    ///
    /// # Errors
    /// As [`tokio::net::TcpListener::local_addr`].
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop` is cancelled. `shutting_down` turns `/readyz` to 503.
    ///
    /// # Errors
    /// When serving fails.
    pub async fn serve(
        self,
        prometheus: PrometheusHandle,
        status: watch::Receiver<WorkerStatus>,
        lease_duration: Duration,
        shutting_down: CancellationToken,
        stop: CancellationToken,
    ) -> std::io::Result<()> {
        let served = Served {
            prometheus: prometheus.clone(),
            status,
            lease_duration,
            shutting_down,
        };
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(ready))
            .with_state(served);
        let upkeep = async {
            let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                tick.tick().await;
                prometheus.run_upkeep();
            }
        };
        let server = axum::serve(self.listener, app).with_graceful_shutdown(stop.cancelled_owned());
        tokio::select! {
            served = server => served,
            never = upkeep => never,
        }
    }
}

async fn metrics(State(served): State<Served>) -> String {
    served.prometheus.render()
}

async fn ready(State(served): State<Served>) -> (StatusCode, String) {
    let status = served.status.borrow().clone();
    match readiness(
        &status,
        Instant::now(),
        served.lease_duration,
        served.shutting_down.is_cancelled(),
    ) {
        Readiness::Ready => (
            StatusCode::OK,
            format!(
                "ready: {} leases held, {} workers\n",
                status.held_leases.len(),
                status.workers
            ),
        ),
        Readiness::NotReady(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);

    fn reached(at: Instant, rounds: u64) -> WorkerStatus {
        let mut status = WorkerStatus::default();
        status.lease_table_reached_at = Some(at);
        status.taking_rounds = rounds;
        status
    }

    #[tokio::test(start_paused = true)]
    async fn ready_only_after_the_table_answered_and_a_round_ran() {
        let now = Instant::now();
        assert!(matches!(
            readiness(&WorkerStatus::default(), now, LEASE, false),
            Readiness::NotReady(why) if why.contains("has not reached")
        ));
        assert!(matches!(
            readiness(&reached(now, 0), now, LEASE, false),
            Readiness::NotReady(why) if why.contains("no taking round")
        ));
        assert_eq!(
            readiness(&reached(now, 1), now, LEASE, false),
            Readiness::Ready
        );
    }

    #[tokio::test(start_paused = true)]
    async fn not_ready_once_the_table_is_silent_for_a_lease_duration() {
        let then = Instant::now();
        let status = reached(then, 5);
        let almost = then + LEASE - Duration::from_millis(1);
        assert_eq!(readiness(&status, almost, LEASE, false), Readiness::Ready);
        assert!(matches!(
            readiness(&status, then + LEASE, LEASE, false),
            Readiness::NotReady(why) if why.contains("has not answered for 10000 ms")
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn not_ready_while_shutting_down() {
        let now = Instant::now();
        assert_eq!(
            readiness(&reached(now, 3), now, LEASE, true),
            Readiness::NotReady("shutting down".into())
        );
    }
}
