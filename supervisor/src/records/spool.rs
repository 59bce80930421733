//! The on-disk spool of records the collector has not taken yet: bounded in bytes, shared by
//! the fronts of one host (an upgrade runs two at once), read back oldest first.
//!
//! Each front writes its own files, JSON lines of redacted records, named so that the name
//! sorts by age and says whose they are and in which state:
//! - `<time>-<instance>-<seq>.open`: being appended to by the live front `<instance>`;
//! - `<time>-<instance>-<seq>.seg`: sealed (renamed, after an fsync), free for any front to send;
//! - `<time>-<instance>-<seq>.claimed-<sender>`: one front `<sender>` is sending it; deleted once
//!   the collector took every record in it.
//!
//! Claiming is a `rename` from `.seg`, which only one front can win. A front is alive while it
//! holds the `flock` on `<instance>.lock` (the kernel drops it when the process dies, however it
//! dies), so the `.open` and `.claimed-` files of a front that is gone are sealed again by the
//! next front that looks, and sent. A file is therefore never sent by two fronts at once; one
//! whose sender died mid-way is sent again from its start (at-least-once: `record_id`
//! deduplicates). A line cut short by a crash is skipped and counted.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};

/// A file is sealed once it holds this much.
pub const SEGMENT_BYTES: u64 = 1024 * 1024;

/// The spool as one front sees it.
pub struct Spool {
    dir: PathBuf,
    instance: String,
    max_bytes: u64,
    /// Held for the front's life: says it is alive to the others.
    lock: Mutex<Option<Flock<File>>>,
    open: Mutex<Option<OpenSegment>>,
    seq: AtomicU64,
    /// All fronts' files together, as of the last scan plus this front's writes since.
    bytes: AtomicU64,
}

struct OpenSegment {
    file: File,
    path: PathBuf,
    bytes: u64,
}

/// A file this front is sending.
#[derive(Debug)]
pub struct Claimed {
    path: PathBuf,
    /// Its name when sealed, to give it back.
    sealed: PathBuf,
    bytes: u64,
}

/// The spool has no room: the records were not written.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Writing them all would take the spool past `spool_max_bytes`: the first `accepted`
    /// were written, the rest (the newest) refused.
    #[error("the spool holds {held} bytes, at most {max} (spool_max_bytes); {refused} record(s) refused")]
    Full {
        /// Bytes in the spool, those just written included.
        held: u64,
        /// Lines written.
        accepted: usize,
        /// Lines refused.
        refused: usize,
        /// The bound.
        max: u64,
    },
    /// The file could not be written.
    #[error("cannot write the spool")]
    Io(#[from] std::io::Error),
}

impl Spool {
    /// Takes `dir` (created with mode 0750 if missing) for front `instance`, seals the files of
    /// fronts that are gone, and measures what is there.
    pub fn open(dir: &Path, instance: &str, max_bytes: u64) -> std::io::Result<Spool> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)?;
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o640)
            .open(dir.join(format!("{instance}.lock")))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| std::io::Error::from(e))?;
        let spool = Spool {
            dir: dir.to_owned(),
            instance: instance.to_owned(),
            max_bytes,
            lock: Mutex::new(Some(lock)),
            open: Mutex::new(None),
            seq: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        };
        spool.scan()?;
        Ok(spool)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes in the spool (all fronts), as of the last scan and this front's writes since.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Appends whole lines (each without its newline) to this front's open file, as many as
    /// fit under the bound, in order: past it the newest records are the ones refused, so what
    /// the spool took is never given up for what came later.
    pub fn append(&self, lines: &[String]) -> Result<(), SpoolError> {
        let mut buf = Vec::new();
        let held = self.bytes();
        let mut accepted = 0;
        for line in lines {
            if held + (buf.len() + line.len() + 1) as u64 > self.max_bytes {
                break;
            }
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
            accepted += 1;
        }
        if accepted > 0 {
            self.write(&buf)?;
        }
        if accepted < lines.len() {
            return Err(SpoolError::Full {
                held: self.bytes(),
                accepted,
                refused: lines.len() - accepted,
                max: self.max_bytes,
            });
        }
        Ok(())
    }

    fn write(&self, buf: &[u8]) -> Result<(), SpoolError> {
        let adding = buf.len() as u64;
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.is_none() {
            let path = self.dir.join(format!(
                "{}-{}-{:06}.open",
                now_ns(),
                self.instance,
                self.seq.fetch_add(1, Ordering::Relaxed)
            ));
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .mode(0o640)
                .open(&path)?;
            *open = Some(OpenSegment {
                file,
                path,
                bytes: 0,
            });
        }
        let seg = open.as_mut().expect("opened above");
        seg.file.write_all(buf)?;
        seg.bytes += adding;
        self.bytes.fetch_add(adding, Ordering::Relaxed);
        if seg.bytes >= SEGMENT_BYTES {
            let seg = open.take().expect("present");
            seal(seg)?;
        }
        Ok(())
    }

    /// Seals this front's open file, if it has one.
    pub fn seal_open(&self) -> std::io::Result<()> {
        let seg = self.open.lock().unwrap_or_else(|e| e.into_inner()).take();
        match seg {
            Some(seg) => seal(seg),
            None => Ok(()),
        }
    }

    /// Whether this front has records in its open file.
    fn has_open(&self) -> bool {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|s| s.bytes > 0)
    }

    /// Claims the oldest sealed file (sealing this front's open file when nothing else is
    /// waiting); `None` when the spool has nothing to send. Files of fronts that are gone are
    /// sealed again first.
    pub fn claim_oldest(&self) -> std::io::Result<Option<Claimed>> {
        for round in 0..2 {
            let mut sealed = self.scan()?;
            sealed.sort();
            for path in sealed {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let claimed = self
                    .dir
                    .join(format!("{}.claimed-{}", stem(name), self.instance));
                match std::fs::rename(&path, &claimed) {
                    Ok(()) => {
                        let bytes = std::fs::metadata(&claimed).map_or(0, |m| m.len());
                        return Ok(Some(Claimed {
                            path: claimed,
                            sealed: path,
                            bytes,
                        }));
                    }
                    // Another front claimed it first.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
            }
            if round == 0 && self.has_open() {
                self.seal_open()?;
                continue;
            }
            break;
        }
        Ok(None)
    }

    /// Whether any file is waiting to be sent (this front's open one, or a sealed or orphaned
    /// one of any front).
    pub fn has_pending(&self) -> bool {
        self.has_open() || self.scan().is_ok_and(|sealed| !sealed.is_empty())
    }

    /// The records in a claimed file, and how many of its lines were cut short or not JSON
    /// (skipped).
    pub fn read(&self, claimed: &Claimed) -> std::io::Result<(Vec<String>, u64)> {
        let text = std::fs::read(&claimed.path)?;
        let mut lines = Vec::new();
        let mut corrupt = 0;
        for raw in text.split(|b| *b == b'\n') {
            if raw.is_empty() {
                continue;
            }
            match std::str::from_utf8(raw) {
                Ok(line)
                    if serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line)
                        .is_ok() =>
                {
                    lines.push(line.to_owned())
                }
                _ => corrupt += 1,
            }
        }
        Ok((lines, corrupt))
    }

    /// The collector took every record of `claimed`: the file goes.
    pub fn done(&self, claimed: Claimed) -> std::io::Result<()> {
        std::fs::remove_file(&claimed.path)?;
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(claimed.bytes))
            });
        Ok(())
    }

    /// Gives `claimed` back unsent (this front stops): any front may send it.
    pub fn release(&self, claimed: Claimed) -> std::io::Result<()> {
        std::fs::rename(&claimed.path, &claimed.sealed)
    }

    /// Seals this front's open file and lets the others take over what it leaves.
    pub fn close(&self) -> std::io::Result<()> {
        self.seal_open()?;
        let lock = self.lock.lock().unwrap_or_else(|e| e.into_inner()).take();
        if lock.is_some() {
            let _ = std::fs::remove_file(self.dir.join(format!("{}.lock", self.instance)));
        }
        drop(lock);
        Ok(())
    }

    /// Lists the spool: seals the files of fronts that are gone, counts every file's bytes
    /// into [`Spool::bytes`], and returns the sealed files.
    fn scan(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut sealed = Vec::new();
        let mut total = 0;
        let mut alive: Vec<(String, bool)> = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(kind) = Kind::of(&name) else {
                continue;
            };
            let bytes = entry.metadata().map_or(0, |m| m.len());
            let owner = match &kind {
                Kind::Sealed => None,
                Kind::Open(owner) | Kind::Claimed(owner) => Some(owner.clone()),
            };
            let orphan = match owner {
                None => false,
                Some(owner) => {
                    let known = alive.iter().find(|(o, _)| *o == owner).map(|(_, a)| *a);
                    let is_alive = known.unwrap_or_else(|| {
                        let a = owner == self.instance || self.alive(&owner);
                        alive.push((owner.clone(), a));
                        a
                    });
                    !is_alive
                }
            };
            total += bytes;
            if matches!(kind, Kind::Sealed) {
                sealed.push(entry.path());
            } else if orphan {
                let back = self.dir.join(format!("{}.seg", stem(&name)));
                match std::fs::rename(entry.path(), &back) {
                    Ok(()) => {
                        tracing::info!(file = %back.display(), "records spool: took over a file of a front that is gone");
                        sealed.push(back);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        // Lock files of fronts that are gone and left no files.
        for (owner, is_alive) in &alive {
            if !is_alive {
                let _ = std::fs::remove_file(self.dir.join(format!("{owner}.lock")));
            }
        }
        // This front's open file is counted by the listing too.
        self.bytes.store(total, Ordering::Relaxed);
        Ok(sealed)
    }

    /// Whether the front `instance` holds its lock.
    fn alive(&self, instance: &str) -> bool {
        let Ok(file) = OpenOptions::new()
            .write(true)
            .open(self.dir.join(format!("{instance}.lock")))
        else {
            return false;
        };
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(_held) => false,
            Err(_) => true,
        }
    }
}

/// What a file in the spool is, by its name.
enum Kind {
    Sealed,
    Open(String),
    Claimed(String),
}

impl Kind {
    fn of(name: &str) -> Option<Kind> {
        if name.ends_with(".seg") {
            return Some(Kind::Sealed);
        }
        if let Some(s) = name.strip_suffix(".open") {
            return Some(Kind::Open(owner_of_stem(s)?.to_owned()));
        }
        let (_, sender) = name.rsplit_once(".claimed-")?;
        Some(Kind::Claimed(sender.to_owned()))
    }
}

/// `<time>-<instance>-<seq>` of any of the file's names.
fn stem(name: &str) -> &str {
    name.split('.').next().unwrap_or(name)
}

fn owner_of_stem(stem: &str) -> Option<&str> {
    let mut parts = stem.split('-');
    parts.next()?;
    parts.next()
}

fn seal(mut seg: OpenSegment) -> std::io::Result<()> {
    seg.file.flush()?;
    seg.file.sync_data()?;
    let name = seg.path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let sealed = seg.path.with_file_name(format!("{}.seg", stem(name)));
    std::fs::rename(&seg.path, sealed)
}

fn now_ns() -> String {
    let ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{ns:020}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(from: usize, n: usize) -> Vec<String> {
        (from..from + n)
            .map(|i| format!("{{\"record_id\":\"r-{i}\"}}"))
            .collect()
    }

    fn ids(lines: &[String]) -> Vec<String> {
        lines
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["record_id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn files_are_claimed_oldest_first_and_by_one_front_only() {
        let dir = tempfile::tempdir().unwrap();
        let a = Spool::open(dir.path(), "aaaaaaaaaaaaaaaa", 1 << 20).unwrap();
        let b = Spool::open(dir.path(), "bbbbbbbbbbbbbbbb", 1 << 20).unwrap();
        a.append(&lines(0, 3)).unwrap();
        a.seal_open().unwrap();
        b.append(&lines(3, 2)).unwrap();
        b.seal_open().unwrap();
        let first = b.claim_oldest().unwrap().unwrap();
        assert_eq!(ids(&b.read(&first).unwrap().0), ["r-0", "r-1", "r-2"]);
        // A takes the other file, never the one B holds.
        let second = a.claim_oldest().unwrap().unwrap();
        assert_eq!(ids(&a.read(&second).unwrap().0), ["r-3", "r-4"]);
        assert!(a.claim_oldest().unwrap().is_none());
        b.done(first).unwrap();
        a.done(second).unwrap();
        assert!(!a.has_pending() && !b.has_pending());
    }

    #[test]
    fn a_gone_fronts_open_and_claimed_files_are_taken_over_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let old = Spool::open(dir.path(), "0ld0ld0ld0ld0ld0", 1 << 20).unwrap();
        old.append(&lines(0, 2)).unwrap();
        old.seal_open().unwrap();
        old.append(&lines(2, 2)).unwrap();
        // It was sending its first file when it died, with a line half written.
        let held = old.claim_oldest().unwrap().unwrap();
        {
            let mut open = old.open.lock().unwrap();
            open.as_mut()
                .unwrap()
                .file
                .write_all(b"{\"record_id\":\"r-")
                .unwrap();
        }
        // A live front does not take them.
        let new = Spool::open(dir.path(), "new0new0new0new0", 1 << 20).unwrap();
        assert!(new.claim_oldest().unwrap().is_none());
        // Dropped without close: as a SIGKILL leaves it (the kernel drops the flock).
        std::mem::forget(held);
        drop(old);
        let first = new.claim_oldest().unwrap().unwrap();
        assert_eq!(ids(&new.read(&first).unwrap().0), ["r-0", "r-1"]);
        let second = new.claim_oldest().unwrap().unwrap();
        let (got, corrupt) = new.read(&second).unwrap();
        assert_eq!(ids(&got), ["r-2", "r-3"]);
        assert_eq!(corrupt, 1);
        new.done(first).unwrap();
        new.done(second).unwrap();
        assert!(!dir.path().join("0ld0ld0ld0ld0ld0.lock").exists());
    }

    #[test]
    fn the_spool_takes_records_up_to_its_bound_and_refuses_the_newest_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let one = lines(0, 1)[0].len() as u64 + 1;
        let spool = Spool::open(dir.path(), "cccccccccccccccc", one * 3).unwrap();
        spool.append(&lines(0, 3)).unwrap();
        assert_eq!(spool.bytes(), one * 3);
        let err = spool.append(&lines(3, 1)).unwrap_err();
        assert!(
            matches!(err, SpoolError::Full { held, accepted: 0, refused: 1, .. } if held == one * 3),
            "{err}"
        );
        // Of several, those that fit are taken, the newest refused.
        // What it took is still there, whole.
        let c = spool.claim_oldest().unwrap().unwrap();
        assert_eq!(ids(&spool.read(&c).unwrap().0), ["r-0", "r-1", "r-2"]);
        spool.done(c).unwrap();
        assert_eq!(spool.bytes(), 0);
        let err = spool.append(&lines(3, 5)).unwrap_err();
        assert!(
            matches!(
                err,
                SpoolError::Full {
                    accepted: 3,
                    refused: 2,
                    ..
                }
            ),
            "{err}"
        );
        let c = spool.claim_oldest().unwrap().unwrap();
        assert_eq!(ids(&spool.read(&c).unwrap().0), ["r-3", "r-4", "r-5"]);
    }

    #[test]
    fn a_released_file_is_sent_by_the_next_front() {
        let dir = tempfile::tempdir().unwrap();
        let a = Spool::open(dir.path(), "dddddddddddddddd", 1 << 20).unwrap();
        a.append(&lines(0, 1)).unwrap();
        let c = a.claim_oldest().unwrap().unwrap();
        a.release(c).unwrap();
        a.close().unwrap();
        drop(a);
        let b = Spool::open(dir.path(), "eeeeeeeeeeeeeeee", 1 << 20).unwrap();
        let c = b.claim_oldest().unwrap().unwrap();
        assert_eq!(ids(&b.read(&c).unwrap().0), ["r-0"]);
    }
}
