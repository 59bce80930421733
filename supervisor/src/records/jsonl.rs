//! The JSON Lines file sink: one record per line, appended in batches (every [`FLUSH_EVERY`] or
//! [`BATCH_RECORDS`] records, whichever comes first) by a task of its own, rotated by size like
//! logrotate numbers its files (`records.jsonl.1` the newest rotated one).
//!
//! Two fronts may append to one file during an upgrade: each batch is one `write` on an
//! `O_APPEND` file, so lines never interleave; a rotation is done under an `flock` on
//! `<file>.lock` and re-checked there, and a writer whose file was rotated away by the other
//! reopens the path before its next batch.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use tokio::sync::{mpsc, watch};

use super::record::{redacted, Record};
use super::Shared;

/// The longest a record waits in memory before it is written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// The most records written in one batch.
pub const BATCH_RECORDS: usize = 256;

/// The file, its size as this writer last saw it, and its rotation settings.
pub(super) struct FileSink {
    path: PathBuf,
    rotate_bytes: u64,
    keep: u32,
    file: Option<File>,
    size: u64,
}

impl FileSink {
    pub(super) fn new(path: PathBuf, rotate_bytes: u64, keep: u32) -> FileSink {
        FileSink {
            path,
            rotate_bytes,
            keep,
            file: None,
            size: 0,
        }
    }

    /// Opens the path unless the open file still is the one at the path.
    fn ensure_open(&mut self) -> std::io::Result<()> {
        if let Some(file) = &self.file {
            let same = match (std::fs::metadata(&self.path), file.metadata()) {
                (Ok(at_path), Ok(open)) => {
                    at_path.ino() == open.ino() && at_path.dev() == open.dev()
                }
                _ => false,
            };
            if same {
                self.size = file.metadata()?.len();
                return Ok(());
            }
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(&self.path)?;
        self.size = file.metadata()?.len();
        self.file = Some(file);
        Ok(())
    }

    /// Appends `lines` (each ending in a newline), rotating before a line that would take the
    /// file past `rotate_bytes` (a file holds at least one line, so one line larger than the
    /// bound makes a file of its own).
    pub(super) fn write_lines(&mut self, lines: &[Vec<u8>]) -> std::io::Result<()> {
        self.ensure_open()?;
        let mut buf: Vec<u8> = Vec::new();
        for line in lines {
            let len = line.len() as u64;
            if self.size + buf.len() as u64 > 0
                && self.size + buf.len() as u64 + len > self.rotate_bytes
            {
                self.append(&buf)?;
                buf.clear();
                self.rotate()?;
            }
            buf.extend_from_slice(line);
        }
        self.append(&buf)
    }

    fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let file = self.file.as_mut().expect("opened before appending");
        file.write_all(buf)?;
        self.size += buf.len() as u64;
        Ok(())
    }

    /// `records.jsonl` becomes `.1`, `.1` becomes `.2`, ..., the one past `keep` goes; a new
    /// file takes the path. Under the lock, and only if the file at the path is still the one
    /// this writer holds (else another writer rotated it: just reopen).
    fn rotate(&mut self) -> std::io::Result<()> {
        let lock_path = sibling(&self.path, ".lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o640)
            .open(&lock_path)?;
        let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
            .map_err(|(_, e)| std::io::Error::from(e))?;
        let ours = match (std::fs::metadata(&self.path), self.file.as_ref()) {
            (Ok(at_path), Some(file)) => file.metadata()?.ino() == at_path.ino(),
            _ => false,
        };
        if ours {
            if self.keep == 0 {
                std::fs::remove_file(&self.path)?;
            } else {
                for n in (1..self.keep).rev() {
                    let from = numbered(&self.path, n);
                    match std::fs::rename(&from, numbered(&self.path, n + 1)) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
                std::fs::rename(&self.path, numbered(&self.path, 1))?;
            }
        }
        self.file = None;
        self.ensure_open()
    }
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// `records.jsonl.<n>`.
pub(super) fn numbered(path: &Path, n: u32) -> PathBuf {
    sibling(path, &format!(".{n}"))
}

/// The sink's task: batches records from `rx` and appends them; once `stop` is set, writes what
/// is queued and ends.
pub(super) async fn run(
    mut sink: FileSink,
    omit: Arc<Vec<String>>,
    mut rx: mpsc::Receiver<Arc<Record>>,
    mut stop: watch::Receiver<Option<std::time::Instant>>,
    shared: Arc<Shared>,
) {
    let mut batch: Vec<Arc<Record>> = Vec::with_capacity(BATCH_RECORDS);
    let mut closed = false;
    loop {
        let first = tokio::select! {
            biased;
            r = rx.recv() => r,
            _ = async { let _ = stop.wait_for(Option::is_some).await; }, if !closed => {
                // What is queued is still written; nothing more comes in.
                rx.close();
                closed = true;
                continue;
            }
        };
        let Some(first) = first else {
            return;
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
        while batch.len() < BATCH_RECORDS {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(r)) => batch.push(r),
                Ok(None) | Err(_) => break,
            }
        }
        let records = std::mem::take(&mut batch);
        let omit = omit.clone();
        let n = records.len() as u64;
        let written = tokio::task::spawn_blocking(move || {
            let lines: Vec<Vec<u8>> = records
                .iter()
                .map(|r| {
                    let mut line =
                        serde_json::to_vec(&redacted(r, &omit)).expect("a JSON object serializes");
                    line.push(b'\n');
                    line
                })
                .collect();
            let result = sink.write_lines(&lines);
            (sink, result)
        })
        .await;
        match written {
            Ok((back, Ok(()))) => {
                sink = back;
                shared.counted_written_file(n);
            }
            Ok((back, Err(e))) => {
                sink = back;
                // Reopen on the next batch (the directory may have been fixed meanwhile).
                sink.file = None;
                shared.dropped("file", "write_error", n, &e.to_string());
            }
            Err(e) => {
                shared.dropped("file", "write_error", n, &e.to_string());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(n: usize, len: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                let mut l = format!("{i:0>width$}", width = len - 1).into_bytes();
                l.push(b'\n');
                l
            })
            .collect()
    }

    #[test]
    fn a_file_reaches_rotate_bytes_and_the_next_line_rotates_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.jsonl");
        let mut sink = FileSink::new(path.clone(), 100, 3);
        // 10 lines of 10 bytes: exactly at the bound, no rotation.
        sink.write_lines(&lines(10, 10)).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 100);
        assert!(!numbered(&path, 1).exists());
        // One byte past it: the full file moves to .1.
        sink.write_lines(&lines(1, 10)).unwrap();
        assert_eq!(std::fs::metadata(numbered(&path, 1)).unwrap().len(), 100);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 10);
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode & !0o640, 0, "mode {mode:o}");
    }

    #[test]
    fn rotation_keeps_keep_files_numbered_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.jsonl");
        let mut sink = FileSink::new(path.clone(), 20, 2);
        for i in 0..5u8 {
            // Each batch fills a file: two lines of 10 bytes.
            let batch: Vec<Vec<u8>> = (0..2)
                .map(|_| {
                    let mut l = vec![b'a' + i; 9];
                    l.push(b'\n');
                    l
                })
                .collect();
            sink.write_lines(&batch).unwrap();
        }
        let first = |p: &Path| std::fs::read(p).unwrap()[0];
        assert_eq!(first(&path), b'e');
        assert_eq!(first(&numbered(&path, 1)), b'd');
        assert_eq!(first(&numbered(&path, 2)), b'c');
        assert!(!numbered(&path, 3).exists());
    }

    #[test]
    fn a_line_larger_than_the_bound_gets_a_file_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.jsonl");
        let mut sink = FileSink::new(path.clone(), 10, 1);
        sink.write_lines(&lines(1, 5)).unwrap();
        sink.write_lines(&lines(1, 50)).unwrap();
        assert_eq!(std::fs::metadata(numbered(&path, 1)).unwrap().len(), 5);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 50);
    }

    #[test]
    fn two_writers_on_one_path_rotate_once_and_lose_no_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.jsonl");
        let mut a = FileSink::new(path.clone(), 1000, 10);
        let mut b = FileSink::new(path.clone(), 1000, 10);
        for _ in 0..30 {
            a.write_lines(&lines(5, 20)).unwrap();
            b.write_lines(&lines(5, 20)).unwrap();
        }
        let mut total = 0;
        for p in std::iter::once(path.clone()).chain((1..=10).map(|n| numbered(&path, n))) {
            if let Ok(text) = std::fs::read_to_string(&p) {
                assert!(text.lines().all(|l| l.len() == 19), "{p:?}");
                total += text.lines().count();
            }
        }
        assert_eq!(total, 300);
    }
}
