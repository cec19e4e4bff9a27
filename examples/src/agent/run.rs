//! The agent's loop: read lines into batches, send one batch at a time, record what was
//! acknowledged, and every poll interval look for rotated and new files.
//!
//! One `PutRecords` call is in flight at a time, and a batch is sent until all of it is in
//! before the next one goes: a line is never put before an earlier line of its file, except
//! that within one call a failed entry is put after the later entries that succeeded (see
//! `docs/agent.md`). The state file is written after each acknowledged batch, so a crash
//! sends again at most the batch in flight.

use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::batch::{Batch, Batcher, Line};
use super::send::{PutRecords, Sender};
use super::state::{self, Progress};
use super::tail::{Mode, Tailer};
use super::{AgentConfig, Error, Summary};

/// A running agent.
#[derive(Debug)]
pub struct Agent<P> {
    config: AgentConfig,
    tailer: Tailer,
    batcher: Batcher,
    sender: Sender<P>,
    started: Instant,
    summary: Summary,
    /// When a shutdown must stop sending, once one has begun.
    stop_at: Option<Instant>,
}

impl<P: PutRecords> Agent<P> {
    /// Reads the state file, finds the files to follow, and records where each begins.
    ///
    /// # Errors
    /// Invalid settings or globs; a state file that cannot be read or written.
    pub fn new(config: AgentConfig, client: P) -> Result<Self, Error> {
        config.validate()?;
        let saved = state::load(&config.state_file)?;
        let tailer = Tailer::start(&config.files, config.start_at, Progress::from_saved(&saved))?;
        info!(
            stream = config.stream,
            files = tailer.followed(),
            partition_key = %config.partition_key,
            aggregate = config.limits.aggregate,
            once = config.once,
            "kcl-agent started"
        );
        let agent = Agent {
            batcher: Batcher::new(config.limits),
            sender: Sender::new(client, config.stream.clone()),
            tailer,
            config,
            started: Instant::now(),
            summary: Summary::default(),
            stop_at: None,
        };
        // Where each file begins: a crash before the first batch must not make a file
        // followed from its end start at a later end.
        agent.save_state()?;
        Ok(agent)
    }

    /// What was done so far.
    pub fn summary(&self) -> Summary {
        Summary {
            put_calls: self.sender.put_calls,
            entries_retried: self.sender.entries_retried,
            seconds: self.started.elapsed().as_secs_f64(),
            ..self.summary.clone()
        }
    }

    fn save_state(&self) -> Result<(), Error> {
        let files = self.tailer.progress().files();
        state::save(&self.config.state_file, &files)?;
        debug!(files = files.len(), "state saved");
        Ok(())
    }

    /// Runs until the files are shipped (`--once`) or `shutdown` is cancelled; then sends what
    /// was read, for at most the shutdown timeout, and saves the state.
    ///
    /// # Errors
    /// A file that cannot be read, the state file, `PutRecords` failing for good. The state
    /// file then records what was acknowledged before.
    pub async fn run(&mut self, shutdown: CancellationToken) -> Result<(), Error> {
        let interval = self.config.poll_interval;
        let mut next_poll = Instant::now() + interval;
        loop {
            // Read and send until nothing is due.
            loop {
                if !self.config.once && self.stop_at.is_none() && Instant::now() >= next_poll {
                    self.tailer.poll()?;
                    next_poll = Instant::now() + interval;
                }
                let mode = self.mode();
                self.fill(mode)?;
                let Some(batch) = self.batcher.ready(Instant::now(), mode != Mode::Follow) else {
                    break;
                };
                if !self.send(&batch, &shutdown).await? {
                    warn!(
                        lines = batch.lines + self.batcher.lines(),
                        timeout = ?self.config.shutdown_timeout,
                        "shutdown timeout: lines read but not acknowledged are shipped after a restart"
                    );
                    break;
                }
                self.acknowledged(batch)?;
            }
            if self.config.once || self.stop_at.is_some() {
                break;
            }
            let wake = self
                .batcher
                .deadline()
                .map_or(next_poll, |due| due.min(next_poll));
            tokio::select! {
                _ = sleep_until(wake) => {}
                _ = shutdown.cancelled() => self.stopping(),
            }
        }
        self.save_state()?;
        let summary = self.summary();
        info!(
            lines = summary.lines,
            records = summary.records,
            put_calls = summary.put_calls,
            "kcl-agent stopped"
        );
        Ok(())
    }

    fn mode(&self) -> Mode {
        if self.stop_at.is_some() {
            Mode::Flush
        } else if self.config.once {
            Mode::Final
        } else {
            Mode::Follow
        }
    }

    fn stopping(&mut self) {
        if self.stop_at.is_none() {
            info!(
                lines = self.batcher.lines(),
                "shutting down: sending what was read, then saving the state"
            );
            self.stop_at = Some(Instant::now() + self.config.shutdown_timeout);
        }
    }

    /// Reads lines into the batcher until a batch is full or no line is ready.
    fn fill(&mut self, mode: Mode) -> Result<(), Error> {
        let now = Instant::now();
        while !self.batcher.has_full_batch() {
            let Some((line, file_key)) = self.tailer.next_line(mode)? else {
                break;
            };
            let key = self.config.partition_key.key_for(&line.data, file_key);
            let line = Line {
                data: line.data,
                key,
                position: line.position,
            };
            self.batcher.push(line, now);
        }
        Ok(())
    }

    /// Sends a batch until all of it is in: `false` when the shutdown timeout ran out first.
    async fn send(&mut self, batch: &Batch, shutdown: &CancellationToken) -> Result<bool, Error> {
        let timeout = self.config.shutdown_timeout;
        let send = self.sender.send(batch);
        tokio::pin!(send);
        if self.stop_at.is_none() {
            tokio::select! {
                sent = &mut send => return sent.map(|()| true),
                _ = shutdown.cancelled() => {}
            }
            // Shutting down: this batch is sent on, within the timeout.
            info!("shutting down: sending what was read, then saving the state");
            self.stop_at = Some(Instant::now() + timeout);
        }
        let stop_at = self.stop_at.expect("set above");
        match timeout_at(stop_at, send).await {
            Ok(sent) => sent.map(|()| true),
            Err(_elapsed) => Ok(false),
        }
    }

    /// Records an acknowledged batch: its lines are shipped. Runs to completion outside any
    /// `select!`, so the state file never records a batch that was not acknowledged, nor
    /// misses one that was for longer than the next save.
    fn acknowledged(&mut self, batch: Batch) -> Result<(), Error> {
        self.tailer.ack(&batch.positions);
        self.summary.lines += batch.lines;
        self.summary.bytes += batch.bytes;
        self.summary.records += batch.entries.len() as u64;
        self.save_state()
    }
}
