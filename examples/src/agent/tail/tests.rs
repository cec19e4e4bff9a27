//! The follower on real files in a temporary directory: starting points, rotation by rename
//! and by copy-truncate, globs, and a restart from saved progress.

use std::io::Write as _;

use super::*;
use crate::agent::state::FileState;

struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("kcl-agent-tail-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn append(&self, name: &str, text: &str) {
        let mut file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.path(name))
            .unwrap();
        file.write_all(text.as_bytes()).unwrap();
    }

    fn tailer(&self, pattern: &str, start_at: StartAt, progress: Progress) -> Tailer {
        let pattern = self.path(pattern).to_string_lossy().into_owned();
        Tailer::start(&[pattern], start_at, progress).unwrap()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// The lines ready now, and their positions.
fn take(tailer: &mut Tailer, mode: Mode) -> (Vec<String>, Vec<Position>) {
    let mut lines = Vec::new();
    let mut positions = Vec::new();
    while let Some((line, _)) = tailer.next_line(mode).unwrap() {
        lines.push(String::from_utf8(line.data.to_vec()).unwrap());
        positions.push(line.position);
    }
    (lines, positions)
}

fn lines(tailer: &mut Tailer, mode: Mode) -> Vec<String> {
    take(tailer, mode).0
}

#[test]
fn complete_lines_from_the_start_or_from_the_last_line() {
    let dir = Dir::new();
    dir.append("a.log", "one\ntwo\npart");
    let mut tailer = dir.tailer("a.log", StartAt::Start, Progress::default());
    let (got, positions) = take(&mut tailer, Mode::Follow);
    assert_eq!(got, ["one", "two"], "the unfinished line waits");
    assert_eq!(positions.iter().map(|p| p.end).collect::<Vec<_>>(), [4, 8]);
    dir.append("a.log", "ial\n");
    assert_eq!(lines(&mut tailer, Mode::Follow), ["partial"]);
    dir.append("a.log", "last");
    assert_eq!(lines(&mut tailer, Mode::Final), ["last"], "--once ships it");

    // From the end: at the start of the unfinished last line, as it is being written.
    dir.append("b.log", "old\nbeing wri");
    let mut tailer = dir.tailer("b.log", StartAt::End, Progress::default());
    assert!(lines(&mut tailer, Mode::Follow).is_empty());
    dir.append("b.log", "tten\nnew\n");
    assert_eq!(lines(&mut tailer, Mode::Follow), ["being written", "new"]);
}

#[test]
fn a_shutdown_ships_what_is_in_memory_and_finishes_a_begun_line() {
    let dir = Dir::new();
    dir.append("a.log", "x\n");
    let mut tailer = dir.tailer("a.log", StartAt::Start, Progress::default());
    assert_eq!(lines(&mut tailer, Mode::Follow), ["x"]);
    dir.append("a.log", "unread\n");
    assert!(lines(&mut tailer, Mode::Flush).is_empty(), "no new reads");
    assert_eq!(lines(&mut tailer, Mode::Follow), ["unread"]);
    dir.append("a.log", "begun");
    assert!(lines(&mut tailer, Mode::Follow).is_empty());
    assert_eq!(lines(&mut tailer, Mode::Flush), ["begun"]);
}

#[test]
fn rotation_by_rename_finishes_the_old_file_first() {
    let dir = Dir::new();
    dir.append("a.log", "1\n2\n");
    let mut tailer = dir.tailer("a.log", StartAt::Start, Progress::default());
    assert_eq!(lines(&mut tailer, Mode::Follow), ["1", "2"]);
    dir.append("a.log", "3\n");
    std::fs::rename(dir.path("a.log"), dir.path("a.log.1")).unwrap();
    dir.append("a.log", "");
    tailer.poll().unwrap();
    // The writer still appends to the renamed file: it has not reopened its log yet.
    dir.append("a.log.1", "4\n");
    assert_eq!(lines(&mut tailer, Mode::Follow), ["3", "4"]);
    dir.append("a.log.1", "5 unfinished");
    assert!(lines(&mut tailer, Mode::Follow).is_empty());
    // It moved on: the old file is finished (its last line too), then the new one read.
    dir.append("a.log", "6\n");
    assert_eq!(lines(&mut tailer, Mode::Follow), ["5 unfinished", "6"]);
    dir.append("a.log.1", "too late\n");
    dir.append("a.log", "7\n");
    assert_eq!(lines(&mut tailer, Mode::Follow), ["7"]);
}

#[test]
fn copy_truncate_ships_what_was_read_and_starts_again() {
    let dir = Dir::new();
    dir.append("a.log", "1\n2\n");
    let mut tailer = dir.tailer("a.log", StartAt::Start, Progress::default());
    assert_eq!(lines(&mut tailer, Mode::Follow), ["1", "2"]);
    std::fs::copy(dir.path("a.log"), dir.path("a.log.1")).unwrap();
    std::fs::File::options()
        .write(true)
        .open(dir.path("a.log"))
        .unwrap()
        .set_len(0)
        .unwrap();
    dir.append("a.log", "3\n");
    tailer.poll().unwrap();
    let (got, positions) = take(&mut tailer, Mode::Follow);
    assert_eq!(got, ["3"]);
    assert_eq!(positions[0].end, 2, "offsets start again");
}

#[test]
fn globs_pick_up_new_files_from_their_start_and_never_ship_a_rotated_file_twice() {
    let dir = Dir::new();
    dir.append("a.log", "a1\n");
    let mut tailer = dir.tailer("*.log*", StartAt::End, Progress::default());
    assert!(lines(&mut tailer, Mode::Follow).is_empty(), "from the end");
    dir.append("b.log", "b1\n");
    tailer.poll().unwrap();
    assert_eq!(
        lines(&mut tailer, Mode::Follow),
        ["b1"],
        "a new file, from its start"
    );
    dir.append("a.log", "a2\n");
    std::fs::rename(dir.path("a.log"), dir.path("a.log.1")).unwrap();
    dir.append("a.log", "a3\n");
    for _ in 0..3 {
        tailer.poll().unwrap();
    }
    let mut got = lines(&mut tailer, Mode::Follow);
    for _ in 0..3 {
        tailer.poll().unwrap();
        got.extend(lines(&mut tailer, Mode::Follow));
    }
    assert_eq!(got, ["a2", "a3"], "a.log.1 is the file read as a.log");
}

#[test]
fn a_restart_resumes_at_the_saved_offset_and_finds_a_file_rotated_meanwhile() {
    let dir = Dir::new();
    dir.append("a.log", "1\n2\n");
    let mut tailer = dir.tailer("a.log", StartAt::Start, Progress::default());
    let (got, positions) = take(&mut tailer, Mode::Follow);
    assert_eq!(got, ["1", "2"]);
    tailer.ack(&positions[..1]);
    let saved: Vec<FileState> = tailer.progress().files();
    assert_eq!(saved[0].offset, 2, "only the acknowledged line");
    drop(tailer);

    // While stopped: more lines, then rotated by rename.
    dir.append("a.log", "3\n");
    std::fs::rename(dir.path("a.log"), dir.path("a.log.1")).unwrap();
    dir.append("a.log", "4\n");
    let mut tailer = dir.tailer("a.log", StartAt::End, Progress::from_saved(&saved));
    assert_eq!(
        lines(&mut tailer, Mode::Follow),
        ["2", "3", "4"],
        "the saved offset wins over --from end; the rotated file's rest first"
    );
}
