//! Following files: the paths the `--file` globs match, through rotation, line by line.
//!
//! Each matched path has a follower. It reads the file open at the path from an offset,
//! and on each poll compares that file with what the path names now:
//!
//! - **rotation by rename** (`mv access.log access.log.1`, then a new `access.log`): the path
//!   names another file. The open file is *retired*: read on to its end (the writer may still
//!   append to it until it reopens its log), and closed once the writer has moved on: the new
//!   file has data, or the old one was deleted. Only then is the new file read, from offset 0,
//!   so the lines of a path stay in order across the rotation.
//! - **rotation by copy-truncate**: same file, now shorter than the offset read. The lines
//!   already read are shipped, and reading restarts at offset 0. (Lines written between the
//!   copy and the truncation are lost to every reader: a limit of copy-truncate itself.)
//! - **deletion**: the file is read to its end and closed.
//!
//! A file is known by its identity (device, inode): a rotated file that a glob matches again
//! under its new name is not read twice, and a restart finds a file that was rotated while
//! the agent was stopped in its directory, and ships the rest of it first.
//!
//! Only complete lines (ending in `\n`) are returned; a trailing partial line waits for its
//! newline, except at the end of a file being closed, with `--once`, and at shutdown.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use tracing::{info, warn};

use super::batch::{Position, SourceId};
use super::partition::file_key;
use super::state::{FileId, Progress};
use super::{Error, StartAt};

/// Bytes read from a file at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Lines taken from one file before the next file's turn.
const FAIR_SHARE: usize = 500;

/// How lines are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Complete lines; a trailing partial line waits.
    Follow,
    /// Everything to the end of each file, a trailing partial line too (`--once`).
    Final,
    /// Shutting down: the lines already read into memory, and the rest of a line begun
    /// there (up to its newline or the end of the file), but no more.
    Flush,
}

/// A line read: its bytes without the newline, where it ends.
#[derive(Debug, Clone)]
pub struct RawLine {
    /// The line without its newline.
    pub data: Bytes,
    /// Where it ends.
    pub position: Position,
}

/// An open file read from an offset.
#[derive(Debug)]
struct Reader {
    file: File,
    id: FileId,
    source: SourceId,
    /// The offset of `buf[0]`: where the next line starts.
    start: u64,
    buf: BytesMut,
    /// The bytes of `buf` searched for a newline already.
    scanned: usize,
}

impl Reader {
    fn open(path: &Path, offset: u64) -> std::io::Result<(Reader, u64)> {
        let mut file = File::open(path)?;
        let meta = file.metadata()?;
        let offset = offset.min(meta.len());
        file.seek(SeekFrom::Start(offset))?;
        let reader = Reader {
            file,
            id: FileId::of(&meta),
            source: 0,
            start: offset,
            buf: BytesMut::new(),
            scanned: 0,
        };
        Ok((reader, meta.len()))
    }

    /// How far the file was read.
    fn read_to(&self) -> u64 {
        self.start + self.buf.len() as u64
    }

    fn read_chunk(&mut self) -> std::io::Result<usize> {
        let len = self.buf.len();
        self.buf.resize(len + READ_CHUNK, 0);
        let read = loop {
            match self.file.read(&mut self.buf[len..]) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        self.buf.truncate(len + *read.as_ref().unwrap_or(&0));
        read
    }

    fn cut(&mut self, len: usize, newline: bool) -> RawLine {
        let mut data = self.buf.split_to(len).freeze();
        self.start += len as u64;
        self.scanned = 0;
        if newline {
            data.truncate(len - 1);
        }
        RawLine {
            data,
            position: Position {
                source: self.source,
                end: self.start,
            },
        }
    }

    /// The next line; `None` when none is complete (at the end of the file in `Final` mode:
    /// everything was returned).
    fn next_line(&mut self, mode: Mode) -> std::io::Result<Option<RawLine>> {
        loop {
            if let Some(i) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let len = self.scanned + i + 1;
                return Ok(Some(self.cut(len, true)));
            }
            self.scanned = self.buf.len();
            if mode == Mode::Flush && self.buf.is_empty() {
                return Ok(None);
            }
            if self.read_chunk()? == 0 {
                if mode != Mode::Follow && !self.buf.is_empty() {
                    return Ok(Some(self.cut(self.buf.len(), false)));
                }
                return Ok(None);
            }
        }
    }

    /// The lines in memory, the trailing partial one too: what was read before a truncation.
    fn take_buffered(&mut self) -> Vec<RawLine> {
        let mut lines = Vec::new();
        while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
            lines.push(self.cut(i + 1, true));
        }
        if !self.buf.is_empty() {
            lines.push(self.cut(self.buf.len(), false));
        }
        lines
    }

    /// True once the file has no name left (deleted): no writer will reopen it.
    fn deleted(&self) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        self.file.metadata().is_ok_and(|m| m.nlink() == 0)
    }

    fn has_data(&self) -> bool {
        self.file.metadata().is_ok_and(|m| m.len() > 0)
    }
}

/// One followed path: the file open there, files rotated away from it still being read, and
/// lines read before a truncation.
#[derive(Debug)]
struct Follower {
    path: PathBuf,
    /// The path as a partition key.
    key: String,
    ready: std::collections::VecDeque<RawLine>,
    retired: std::collections::VecDeque<Reader>,
    current: Option<Reader>,
}

impl Follower {
    fn new(path: PathBuf) -> Self {
        Follower {
            key: file_key(&path),
            path,
            ready: Default::default(),
            retired: Default::default(),
            current: None,
        }
    }

    fn is_done(&self) -> bool {
        self.ready.is_empty() && self.retired.is_empty() && self.current.is_none()
    }

    fn next_line(
        &mut self,
        mode: Mode,
        progress: &mut Progress,
    ) -> std::io::Result<Option<RawLine>> {
        if let Some(line) = self.ready.pop_front() {
            return Ok(Some(line));
        }
        while let Some(old) = self.retired.front_mut() {
            // Checked before reading the old file to its end: a writer that wrote to the new
            // file had finished with the old one.
            let moved_on = mode == Mode::Final
                || self.current.as_ref().is_some_and(Reader::has_data)
                || old.deleted();
            let old_mode = match mode {
                Mode::Follow if moved_on => Mode::Final,
                other => other,
            };
            if let Some(line) = old.next_line(old_mode)? {
                return Ok(Some(line));
            }
            if old_mode != Mode::Final {
                return Ok(None); // its rest first
            }
            progress.close(old.source, old.start);
            info!(path = %self.path.display(), offset = old.start, "finished a rotated file");
            self.retired.pop_front();
        }
        match &mut self.current {
            Some(current) => current.next_line(mode),
            None => Ok(None),
        }
    }

    /// Compares the open file with the one at the path now.
    fn check(&mut self, progress: &mut Progress) -> Result<Option<FileId>, Error> {
        let meta = match std::fs::metadata(&self.path) {
            Ok(meta) if meta.is_file() => meta,
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if self.current.as_ref().is_some_and(Reader::deleted) {
                    let old = self.current.take().expect("checked");
                    info!(path = %self.path.display(), "file deleted: reading it to its end");
                    self.retired.push_back(old);
                }
                return Ok(None);
            }
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "cannot stat a followed file");
                return Ok(None);
            }
        };
        let id = FileId::of(&meta);
        match &mut self.current {
            Some(current) if current.id == id => {
                if meta.len() < current.read_to() {
                    info!(
                        path = %self.path.display(),
                        size = meta.len(),
                        offset = current.read_to(),
                        "file truncated (copy-truncate rotation): reading it again from 0"
                    );
                    self.ready.extend(current.take_buffered());
                    current
                        .file
                        .seek(SeekFrom::Start(0))
                        .map_err(|source| Error::Read {
                            path: self.path.clone(),
                            source,
                        })?;
                    current.start = 0;
                }
            }
            // Another file at the path, unless it is one being read elsewhere (a file
            // rotated from another followed path, still being finished there).
            _ if progress.is_open(id) => {}
            _ => {
                let offset = progress.resume_offset(id, meta.len()).unwrap_or(0);
                if let Some(reader) = open(&self.path, id, offset, progress) {
                    if let Some(old) = self.current.replace(reader) {
                        info!(
                            path = %self.path.display(),
                            "file rotated: reading the old one to its end, then the new one"
                        );
                        self.retired.push_back(old);
                    } else {
                        info!(path = %self.path.display(), offset, "following a new file");
                    }
                }
            }
        }
        Ok(Some(id))
    }
}

/// Opens `path` at `offset` if it still is the file `id`, registered in `progress`.
fn open(path: &Path, id: FileId, offset: u64, progress: &mut Progress) -> Option<Reader> {
    match Reader::open(path, offset) {
        Ok((mut reader, _)) if reader.id == id => {
            reader.source = progress.open(path, id, reader.start);
            Some(reader)
        }
        Ok(_) => None, // replaced since it was looked at: the next poll sees the new one
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot open a matched file");
            None
        }
    }
}

/// The offset just past the last newline in the last 64 KiB before `size`, so following a
/// file from its end starts at a line, not inside the one being written (its end if none).
fn last_line_start(path: &Path, size: u64) -> u64 {
    let from = size.saturating_sub(READ_CHUNK as u64);
    let tail = File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(from))?;
        let mut buf = vec![0; (size - from) as usize];
        f.read_exact(&mut buf)?;
        Ok(buf)
    });
    match tail.ok().and_then(|t| t.iter().rposition(|&b| b == b'\n')) {
        Some(i) => from + i as u64 + 1,
        None => size,
    }
}

/// Every followed path, and the progress of every file read.
#[derive(Debug)]
pub struct Tailer {
    patterns: Vec<String>,
    followers: Vec<Follower>,
    progress: Progress,
    /// The follower whose turn it is, and the lines it gave in this turn.
    turn: usize,
    given: usize,
}

impl Tailer {
    /// Checks the patterns and finds the files matching them now: a file the state file knows
    /// resumes at its offset, a file it does not know starts at `start_at`; a file the state
    /// file knew at a matched path but now elsewhere (rotated while stopped) is looked for in
    /// its directory and its rest read first.
    pub fn start(
        patterns: &[String],
        start_at: StartAt,
        progress: Progress,
    ) -> Result<Self, Error> {
        for pattern in patterns {
            glob::Pattern::new(pattern).map_err(|source| Error::Pattern {
                pattern: pattern.clone(),
                source,
            })?;
        }
        let mut tailer = Tailer {
            patterns: patterns.to_vec(),
            followers: Vec::new(),
            progress,
            turn: 0,
            given: 0,
        };
        let mut seen = Vec::new();
        for path in tailer.matches() {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let id = FileId::of(&meta);
            seen.push(id);
            if tailer.progress.is_open(id) {
                continue; // hard links to one file: read once
            }
            let rotated_while_stopped = tailer.progress.known_at(&path).is_some_and(|k| k != id);
            let offset = match tailer.progress.resume_offset(id, meta.len()) {
                Some(offset) => offset,
                None if rotated_while_stopped || tailer.progress.known_at(&path) == Some(id) => 0,
                None => match start_at {
                    StartAt::Start => 0,
                    StartAt::End => last_line_start(&path, meta.len()),
                },
            };
            let mut follower = Follower::new(path.clone());
            follower.current = open(&path, id, offset, &mut tailer.progress);
            if let Some(reader) = &follower.current {
                info!(path = %path.display(), offset = reader.start, "following");
            }
            tailer.followers.push(follower);
        }
        tailer.find_rotated(&seen);
        Ok(tailer)
    }

    /// Known files not at a matched path: looked for in the directory of the path they had,
    /// and read from their offset, before the file at that path, if they grew past it.
    fn find_rotated(&mut self, seen: &[FileId]) {
        for (path, id, offset) in self.progress.closed() {
            if seen.contains(&id) {
                continue;
            }
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let found = entries.flatten().map(|e| e.path()).find(|p| {
                std::fs::metadata(p)
                    .is_ok_and(|m| m.is_file() && FileId::of(&m) == id && m.len() > offset)
            });
            let Some(found) = found else { continue };
            let Some(reader) = open(&found, id, offset, &mut self.progress) else {
                continue;
            };
            info!(
                path = %path.display(),
                now_at = %found.display(),
                offset,
                "found a file rotated while stopped: shipping its rest first"
            );
            let index = match self.followers.iter().position(|f| f.path == path) {
                Some(i) => i,
                None => {
                    self.followers.push(Follower::new(path.clone()));
                    self.followers.len() - 1
                }
            };
            self.followers[index].retired.push_back(reader);
        }
    }

    fn matches(&self) -> Vec<PathBuf> {
        let mut paths = Vec::new();
        for pattern in &self.patterns {
            match glob::glob(pattern) {
                Ok(found) => paths.extend(found.flatten()),
                Err(e) => warn!(pattern, error = %e, "invalid glob"),
            }
        }
        paths.sort();
        paths.dedup();
        paths
    }

    /// Checks every followed path for rotation, truncation and deletion, and starts following
    /// new matching files (from their start). Forgets files done with.
    pub fn poll(&mut self) -> Result<(), Error> {
        let mut seen = Vec::new();
        for follower in &mut self.followers {
            seen.extend(follower.check(&mut self.progress)?);
        }
        for path in self.matches() {
            if self.followers.iter().any(|f| f.path == path) {
                continue;
            }
            let mut follower = Follower::new(path);
            if let Some(id) = follower.check(&mut self.progress)? {
                seen.push(id);
            }
            if follower.current.is_some() {
                self.followers.push(follower);
            }
        }
        let patterns: Vec<glob::Pattern> = self
            .patterns
            .iter()
            .filter_map(|p| glob::Pattern::new(p).ok())
            .collect();
        self.followers
            .retain(|f| !f.is_done() || patterns.iter().any(|p| p.matches_path(&f.path)));
        self.progress.prune(|id| seen.contains(&id));
        Ok(())
    }

    /// The next line, and the partition key of its file's path; files take turns.
    pub fn next_line(&mut self, mode: Mode) -> Result<Option<(RawLine, &str)>, Error> {
        for _ in 0..=self.followers.len() {
            if self.turn >= self.followers.len() {
                self.turn = 0;
            }
            let Some(follower) = self.followers.get_mut(self.turn) else {
                return Ok(None);
            };
            let line = follower
                .next_line(mode, &mut self.progress)
                .map_err(|source| Error::Read {
                    path: follower.path.clone(),
                    source,
                })?;
            match line {
                Some(line) => {
                    self.given += 1;
                    let index = self.turn;
                    if self.given >= FAIR_SHARE {
                        self.turn += 1;
                        self.given = 0;
                    }
                    return Ok(Some((line, &self.followers[index].key)));
                }
                None => {
                    self.turn += 1;
                    self.given = 0;
                }
            }
        }
        Ok(None)
    }

    /// Records an acknowledged batch's positions.
    pub fn ack(&mut self, positions: &[Position]) {
        self.progress.ack(positions);
    }

    /// The progress, for the state file.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Paths followed now.
    pub fn followed(&self) -> usize {
        self.followers.len()
    }
}

#[cfg(test)]
mod tests;
