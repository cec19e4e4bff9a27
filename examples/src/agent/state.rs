//! What has been shipped: per file, its identity and the offset up to which every line was
//! acknowledged by `PutRecords` ([`Progress`], in memory), and the state file that keeps it
//! across restarts ([`load`], [`save`]).
//!
//! The state file is JSON, `{"version":1,"files":[{"path":…,"dev":…,"ino":…,"offset":…}]}`,
//! written to a temporary file next to it, flushed to disk, and renamed over it, so a crash
//! leaves the old state or the new one, never a torn one. A file is identified by device and
//! inode, not by its path: rotation moves a file to another path, and puts another file at
//! the old one.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Error;
use super::batch::{Position, SourceId};

/// The version of the state file's format.
const VERSION: u32 = 1;

/// A file's identity: device and inode, which a rename keeps and a new file does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl FileId {
    /// The identity of the file `meta` describes.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// One file in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    /// The path the file was followed at (a rotated file: the path it had before).
    pub path: PathBuf,
    /// Its device.
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
    /// Every line before this offset was acknowledged.
    pub offset: u64,
}

impl FileState {
    /// The file's identity.
    pub fn id(&self) -> FileId {
        FileId {
            dev: self.dev,
            ino: self.ino,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    files: Vec<FileState>,
}

/// The state file's bytes.
pub fn encode(files: &[FileState]) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(&StateFile {
        version: VERSION,
        files: files.to_vec(),
    })
    .expect("the state serializes");
    bytes.push(b'\n');
    bytes
}

/// The files of a state file's bytes.
pub fn decode(bytes: &[u8]) -> Result<Vec<FileState>, String> {
    let state: StateFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if state.version != VERSION {
        return Err(format!(
            "version {} (this kcl-agent writes version {VERSION})",
            state.version
        ));
    }
    Ok(state.files)
}

/// Reads the state file; a missing one is an empty state (a first run).
pub fn load(path: &Path) -> Result<Vec<FileState>, Error> {
    match std::fs::read(path) {
        Ok(bytes) => decode(&bytes).map_err(|problem| Error::StateCorrupt {
            path: path.to_owned(),
            problem,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(Error::State {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Replaces the state file atomically: a temporary file in the same directory, written and
/// synced, renamed over the old one, and the directory synced so the rename survives a crash.
pub fn save(path: &Path, files: &[FileState]) -> Result<(), Error> {
    let error = |source| Error::State {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let temporary = dir.join(name);
    let mut file = std::fs::File::create(&temporary).map_err(error)?;
    file.write_all(&encode(files)).map_err(error)?;
    file.sync_all().map_err(error)?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(error)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(error)
}

/// A file being read, or read earlier and known by its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tracked {
    path: PathBuf,
    id: FileId,
    /// Every line before this offset was acknowledged.
    acked: u64,
    /// Open: being read. Closed: read up to `read_end` (a rotated file read to its end, or a
    /// file known from the state file).
    open: bool,
    read_end: u64,
}

/// The files read, and how far each was shipped. A source stays known after it is closed
/// until every line read from it is acknowledged and no followed path shows it any more, so
/// that a rotated file found again (by a glob that matches rotated names, or after a restart)
/// resumes where it ended instead of being shipped again.
#[derive(Debug, Default)]
pub struct Progress {
    sources: BTreeMap<SourceId, Tracked>,
    next: SourceId,
}

impl Progress {
    /// The progress a state file recorded: every file known, none open.
    pub fn from_saved(files: &[FileState]) -> Self {
        let mut progress = Progress::default();
        for file in files {
            let source = progress.next_source();
            progress.sources.insert(
                source,
                Tracked {
                    path: file.path.clone(),
                    id: file.id(),
                    acked: file.offset,
                    open: false,
                    read_end: file.offset,
                },
            );
        }
        progress
    }

    fn next_source(&mut self) -> SourceId {
        self.next += 1;
        self.next
    }

    fn known(&self, id: FileId) -> Option<(SourceId, &Tracked)> {
        self.sources
            .iter()
            .find(|(_, t)| t.id == id)
            .map(|(s, t)| (*s, t))
    }

    /// Where a file seen again would resume: the offset it was read up to, if it is known
    /// and closed, and no larger than `size` (else it was truncated, or is another file).
    pub fn resume_offset(&self, id: FileId, size: u64) -> Option<u64> {
        self.known(id)
            .filter(|(_, t)| !t.open && t.read_end <= size)
            .map(|(_, t)| t.read_end)
    }

    /// True when the file is being read.
    pub fn is_open(&self, id: FileId) -> bool {
        self.known(id).is_some_and(|(_, t)| t.open)
    }

    /// The identity of the file last known at `path` (closed), if any: the state file's
    /// entry of a path whose file was rotated while the agent was stopped.
    pub fn known_at(&self, path: &Path) -> Option<FileId> {
        self.sources
            .values()
            .find(|t| !t.open && t.path == path)
            .map(|t| t.id)
    }

    /// Files known but not open, as (path, identity, offset read).
    pub fn closed(&self) -> Vec<(PathBuf, FileId, u64)> {
        self.sources
            .values()
            .filter(|t| !t.open)
            .map(|t| (t.path.clone(), t.id, t.read_end))
            .collect()
    }

    /// Starts reading a file at `offset`: the source of its lines. A known file keeps its
    /// source (lines of it may still be in flight) and its acknowledged offset.
    pub fn open(&mut self, path: &Path, id: FileId, offset: u64) -> SourceId {
        if let Some((source, _)) = self.known(id) {
            let tracked = self.sources.get_mut(&source).expect("known");
            tracked.open = true;
            tracked.path = path.to_owned();
            return source;
        }
        let source = self.next_source();
        self.sources.insert(
            source,
            Tracked {
                path: path.to_owned(),
                id,
                acked: offset,
                open: true,
                read_end: offset,
            },
        );
        source
    }

    /// Stops reading a file, read up to `end`.
    pub fn close(&mut self, source: SourceId, end: u64) {
        if let Some(tracked) = self.sources.get_mut(&source) {
            tracked.open = false;
            tracked.read_end = end;
        }
    }

    /// Moves each file's acknowledged offset to the last of its positions in `positions`
    /// (the lines of an acknowledged batch, in the order read).
    pub fn ack(&mut self, positions: &[Position]) {
        for p in positions {
            if let Some(tracked) = self.sources.get_mut(&p.source) {
                tracked.acked = p.end;
            }
        }
    }

    /// Forgets the closed, fully acknowledged files for which `still_seen` is false.
    pub fn prune(&mut self, still_seen: impl Fn(FileId) -> bool) {
        self.sources
            .retain(|_, t| t.open || t.acked != t.read_end || still_seen(t.id));
    }

    /// What the state file records now.
    pub fn files(&self) -> Vec<FileState> {
        self.sources
            .values()
            .map(|t| FileState {
                path: t.path.clone(),
                dev: t.id.dev,
                ino: t.id.ino,
                offset: t.acked,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ino: u64) -> FileId {
        FileId { dev: 1, ino }
    }

    #[test]
    fn the_state_file_round_trips_and_is_checked() {
        let files = vec![FileState {
            path: "/var/log/access.log".into(),
            dev: 2049,
            ino: 131_075,
            offset: 4096,
        }];
        let bytes = encode(&files);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.contains(r#""path": "/var/log/access.log""#), "{text}");
        assert_eq!(decode(&bytes), Ok(files));
        assert!(
            decode(br#"{"version":2,"files":[]}"#)
                .unwrap_err()
                .contains("version 2")
        );
        assert!(decode(b"{\"version\":1,\"files\":[").is_err());
    }

    #[test]
    fn saves_atomically_and_loads_back() {
        let dir = std::env::temp_dir().join(format!("kcl-agent-state-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.state.json");
        assert_eq!(load(&path).unwrap(), [], "a first run");
        let files = vec![FileState {
            path: "a.log".into(),
            dev: 1,
            ino: 2,
            offset: 3,
        }];
        save(&path, &files).unwrap();
        save(&path, &files).unwrap();
        assert_eq!(load(&path).unwrap(), files);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["agent.state.json"], "no temporary file left");
        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(load(&path), Err(Error::StateCorrupt { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn offsets_move_only_with_acknowledgements() {
        let mut progress = Progress::default();
        let a = progress.open(Path::new("a.log"), id(1), 100);
        let b = progress.open(Path::new("b.log"), id(2), 0);
        assert_eq!(progress.files()[0].offset, 100, "the starting offset");
        progress.ack(&[
            Position {
                source: a,
                end: 110,
            },
            Position { source: b, end: 5 },
            Position {
                source: a,
                end: 120,
            },
        ]);
        let offsets: Vec<u64> = progress.files().iter().map(|f| f.offset).collect();
        assert_eq!(offsets, [120, 5]);
        // Truncated and read again from 0: the last position wins.
        progress.ack(&[
            Position {
                source: a,
                end: 130,
            },
            Position { source: a, end: 7 },
        ]);
        assert_eq!(progress.files()[0].offset, 7);
    }

    #[test]
    fn a_closed_file_is_kept_until_acknowledged_and_gone() {
        let mut progress = Progress::default();
        let a = progress.open(Path::new("a.log"), id(1), 0);
        assert!(progress.is_open(id(1)));
        progress.close(a, 50);
        assert!(!progress.is_open(id(1)));
        assert_eq!(progress.resume_offset(id(1), 60), Some(50));
        assert_eq!(progress.resume_offset(id(1), 40), None, "truncated since");
        progress.prune(|_| false);
        assert_eq!(progress.files().len(), 1, "lines of it are in flight");
        progress.ack(&[Position { source: a, end: 50 }]);
        progress.prune(|i| i == id(1));
        assert_eq!(progress.files().len(), 1, "still seen at a followed path");
        // Found again (a glob matching rotated names): same source, offsets kept.
        assert_eq!(progress.open(Path::new("a.log.1"), id(1), 50), a);
        assert_eq!(progress.files()[0].path, Path::new("a.log.1"));
        progress.close(a, 50);
        progress.prune(|_| false);
        assert!(progress.files().is_empty());
    }

    #[test]
    fn a_saved_state_is_known_but_closed() {
        let saved = [FileState {
            path: "a.log".into(),
            dev: 1,
            ino: 7,
            offset: 42,
        }];
        let mut progress = Progress::from_saved(&saved);
        assert_eq!(progress.known_at(Path::new("a.log")), Some(id(7)));
        assert_eq!(progress.resume_offset(id(7), 42), Some(42));
        assert_eq!(progress.closed(), [(PathBuf::from("a.log"), id(7), 42)]);
        let source = progress.open(Path::new("a.log"), id(7), 42);
        assert_eq!(progress.known_at(Path::new("a.log")), None, "open now");
        progress.ack(&[Position { source, end: 50 }]);
        assert_eq!(
            progress.files(),
            [FileState {
                offset: 50,
                ..saved[0].clone()
            }]
        );
    }
}
