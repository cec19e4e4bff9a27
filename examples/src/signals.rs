//! How the example programs stop: the first SIGTERM or SIGINT asks for a graceful shutdown, a
//! second one ends the process at once, and a shutdown that overruns its deadline ends it too.

use std::time::Duration;

use kcl_core::CancellationToken;
use tracing::{error, info};

/// Exit code of a run that failed, or of a shutdown that overran its deadline.
pub const EXIT_FAILURE: i32 = 1;

/// A signal that stops a program.
#[derive(Clone, Copy, Debug)]
pub enum StopSignal {
    /// SIGTERM, as sent by systemd, ECS or Kubernetes.
    Term,
    /// SIGINT, as sent by Ctrl-C.
    Int,
}

impl StopSignal {
    /// The signal's name.
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Term => "SIGTERM",
            StopSignal::Int => "SIGINT",
        }
    }

    /// The exit status of a process killed by this signal, as shells report it (128 + the
    /// signal's number): what a second signal ends the process with.
    pub fn exit_code(self) -> i32 {
        const SIGNALLED: i32 = 128;
        const SIGINT: i32 = 2;
        const SIGTERM: i32 = 15;
        SIGNALLED
            + match self {
                StopSignal::Term => SIGTERM,
                StopSignal::Int => SIGINT,
            }
    }
}

/// From now on, the first SIGTERM or SIGINT cancels `shutdown`, and a second one ends the
/// process at once. `consequence` ends the log line of the second signal (what is lost).
pub fn handle_signals(
    shutdown: CancellationToken,
    consequence: &'static str,
) -> std::io::Result<()> {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    async fn next(term: &mut Signal, int: &mut Signal) -> StopSignal {
        tokio::select! {
            _ = term.recv() => StopSignal::Term,
            _ = int.recv() => StopSignal::Int,
        }
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Owned by the process: it ends only by exiting it.
    tokio::spawn(async move {
        let first = next(&mut term, &mut int).await;
        info!(
            "{}: shutting down (a second SIGTERM or SIGINT exits at once)",
            first.name()
        );
        shutdown.cancel();
        let second = next(&mut term, &mut int).await;
        let code = second.exit_code();
        error!(
            code,
            "second signal ({}): exiting at once, without finishing the shutdown; {consequence}",
            second.name()
        );
        exit(code);
    });
    Ok(())
}

/// Once a shutdown has begun (a signal, an output gone, the worker stopped), ends the process
/// if it still runs `deadline` later.
pub fn enforce_deadline(shutdown: CancellationToken, deadline: Duration) {
    tokio::spawn(async move {
        shutdown.cancelled().await;
        tokio::time::sleep(deadline).await;
        error!(
            ?deadline,
            "the shutdown did not finish within its deadline; exiting"
        );
        exit(EXIT_FAILURE);
    });
}

/// Runs a start-up step, unless a shutdown is asked for first: then `None`, and the step is
/// dropped (an open blocked on its thread stays blocked until the process exits).
pub async fn unless_shutdown<T>(
    shutdown: &CancellationToken,
    step: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        done = step => Some(done),
    }
}

/// Ends the process with `code`, never by returning from `main`: dropping the runtime waits
/// for its blocking threads, and one may be blocked for good (an open of a FIFO that no
/// process reads, a write to a pipe that no longer drains). `std::process::exit` flushes
/// stdout unless another thread is writing to it (such a stuck write), so this never hangs;
/// the logs go to stderr, which is not buffered.
pub fn exit(code: i32) -> ! {
    let _ = std::io::Write::flush(&mut std::io::stderr());
    std::process::exit(code)
}
