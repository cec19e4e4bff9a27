//! Example CLIs run as processes by the tests.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{PATIENCE, wait_for};

/// Sends SIGTERM to `child` and returns its exit status, which must come within [`PATIENCE`].
pub async fn sigterm(mut child: Child) -> std::process::ExitStatus {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap()
}

/// A running CLI whose log (stderr) is collected line by line; failed assertions
/// show it.
#[derive(Debug)]
pub struct Logged {
    /// The process.
    pub child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Logged {
    /// Starts `command` (a CLI of `examples/`) with `RUST_LOG=info`, stdout discarded, stderr
    /// collected.
    pub fn start(mut command: Command) -> Self {
        let mut child = command
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the CLI");
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let collected = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                collected.lock().unwrap().push(line);
            }
        });
        Logged { child, log }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until `text` is in the log.
    pub async fn wait_for_log(&self, text: &str) {
        wait_for(&format!("`{text}` in the log"), PATIENCE, || async {
            self.log().contains(text)
        })
        .await;
    }

    /// Sends `signal` (`TERM`, `INT`, `KILL`).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let sent = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal} {pid}");
    }

    /// The exit status, which must come within `bound` (an upper bound on a hang, generous).
    pub async fn exits_within(&mut self, bound: Duration, what: &str) -> std::process::ExitStatus {
        let status = tokio::time::timeout(bound, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{what}: still running after {bound:?}\n{}", self.log()))
            .unwrap();
        // The last lines, once the pipe is closed.
        tokio::time::sleep(Duration::from_millis(200)).await;
        status
    }
}
