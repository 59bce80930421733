//! One front per runtime directory, and never a file removed that is not a socket.
//!
//! A second `plugvisor` started by mistake with the same runtime directory (`sudo plugvisor
//! --config …` next to the running service) used to unlink and rebind every plugin socket, the
//! control socket and the ext_proc socket before it failed on a busy port, leaving the running
//! front's plugins unable to reconnect. [`InstanceLock::acquire`] runs first in
//! [`crate::start`]: it takes `flock(LOCK_EX | LOCK_NB)` on `<runtime_dir>/plugvisor.lock`
//! and holds it for the life of the [`crate::Running`]; a second front fails there, before it
//! has touched anything, and names the pid written into the file by the holder.
//!
//! The lock, not the file, is the truth: the kernel drops it when the holder exits however it
//! ends (SIGKILL included), so a stale file never blocks a start. The file is never removed:
//! unlinking a locked file would let two later fronts lock two different inodes.
//!
//! [`prepare_socket_path`] is what every bind runs before it replaces a stale socket: a path
//! that exists and is not a socket (a log file, a directory, a symlink) is left alone and the
//! bind refused.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::RunError;

/// The lock file's name inside the runtime directory.
pub const LOCK_FILE: &str = "plugvisor.lock";

/// The held lock on a runtime directory; released when dropped (or when the process ends).
///
/// An upgrade hands the lock's open file to the new front ([`crate::shell::upgrade`]): both then hold
/// the same `flock`, which the kernel keeps until the last of them closes the file. Until the
/// handover is done, and in the old front after it, dropping the lock only closes this
/// process's copy ([`InstanceLock::keep_for_successor`]): an explicit unlock would release it
/// for the other front too.
#[derive(Debug)]
pub struct InstanceLock {
    lock: Option<Flock<File>>,
    path: PathBuf,
    unlock_on_drop: bool,
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        if !self.unlock_on_drop {
            // Closes the fd without `LOCK_UN`: the other holder of the open file keeps the lock.
            if let Some(lock) = self.lock.take() {
                std::mem::forget(lock);
            }
        }
    }
}

impl InstanceLock {
    /// Creates `runtime_dir` if needed and locks it for this process, or says who holds it.
    /// Nothing in the directory besides the lock file is created, removed or bound here.
    pub fn acquire(runtime_dir: &Path) -> Result<InstanceLock, RunError> {
        let dir_error = |source| RunError::RuntimeDir {
            path: runtime_dir.to_owned(),
            source,
        };
        // `metadata` follows symlinks: `/var/run -> /run` is a directory.
        match std::fs::metadata(runtime_dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(dir_error(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "it exists and is not a directory",
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(runtime_dir).map_err(dir_error)?
            }
            Err(e) => return Err(dir_error(e)),
        }
        let path = runtime_dir.join(LOCK_FILE);
        // Not truncated before the lock is ours: the holder's pid must stay readable. std opens
        // with O_CLOEXEC, so plugin processes never inherit (and so never keep) the lock;
        // O_NOFOLLOW refuses a symlink planted at the lock's path.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&path)
            .map_err(|e| {
                dir_error(std::io::Error::new(
                    e.kind(),
                    format!("cannot open {}: {e}", path.display()),
                ))
            })?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                return Err(RunError::AlreadyRunning {
                    dir: runtime_dir.to_owned(),
                    pid: read_pid(&mut file),
                })
            }
            Err((_, errno)) => {
                return Err(dir_error(std::io::Error::new(
                    std::io::Error::from(errno).kind(),
                    format!("cannot lock {}: {errno}", path.display()),
                )))
            }
        };
        write_pid(&mut lock).map_err(|e| {
            dir_error(std::io::Error::new(
                e.kind(),
                format!("cannot write the pid into {}: {e}", path.display()),
            ))
        })?;
        Ok(InstanceLock {
            lock: Some(lock),
            path,
            unlock_on_drop: true,
        })
    }

    /// The lock a front handing over passed to this one (the same open file, so the same
    /// `flock`). Until [`InstanceLock::take_over`], dropping it leaves the lock to the old front.
    pub fn inherit(
        file: std::os::fd::OwnedFd,
        runtime_dir: &Path,
    ) -> std::io::Result<InstanceLock> {
        let path = runtime_dir.join(LOCK_FILE);
        // Locking an open file that already holds the lock succeeds at once; anything else
        // means this is not the lock of this runtime directory.
        let lock = Flock::lock(File::from(file), FlockArg::LockExclusiveNonblock).map_err(
            |(_, errno)| {
                std::io::Error::new(
                    std::io::Error::from(errno).kind(),
                    format!("the lock file passed by the old front is not locked: {errno}"),
                )
            },
        )?;
        Ok(InstanceLock {
            lock: Some(lock),
            path,
            unlock_on_drop: false,
        })
    }

    /// This front is now the one the lock names: its pid goes into the file, and its stop
    /// releases the lock.
    pub fn take_over(&mut self) -> std::io::Result<()> {
        self.unlock_on_drop = true;
        match self.lock.as_mut() {
            Some(lock) => write_pid(lock),
            None => Ok(()),
        }
    }

    /// The open lock file, to pass to a new front.
    pub fn file(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.lock.as_ref().map(|l| l.as_fd())
    }

    /// Another front holds this lock now: dropping it must not release it.
    pub fn keep_for_successor(&mut self) {
        self.unlock_on_drop = false;
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes this process's pid into the lock file, for the error of a second front.
fn write_pid(f: &mut File) -> std::io::Result<()> {
    f.set_len(0)?;
    f.rewind()?;
    writeln!(f, "{}", std::process::id())?;
    f.flush()
}

/// The pid the holder wrote, if it has yet (it writes right after it locks).
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.take(64).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// Makes `path` free for a new Unix socket: a socket left there (by a front that ended without
/// cleaning up) is removed; anything else that exists is left alone and refused.
pub fn prepare_socket_path(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(std::io::Error::new(
                e.kind(),
                format!("cannot remove stale socket {}: {e}", path.display()),
            )),
        },
        Ok(m) => Err(not_a_socket(path, &m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether a process accepts connections on the Unix socket at `path`. The connect does not
/// block: a full backlog (`EAGAIN`) means someone listens too.
pub fn someone_listens(path: &Path) -> bool {
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let Ok(addr) = UnixAddr::new(path) else {
        return false;
    };
    let Ok(fd) = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return false;
    };
    matches!(connect(fd.as_raw_fd(), &addr), Ok(()) | Err(Errno::EAGAIN))
}

/// Removes `path` if it is still a socket: a file put in its place since is not ours.
pub fn remove_socket(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

fn not_a_socket(path: &Path, meta: &std::fs::Metadata) -> std::io::Error {
    let t = meta.file_type();
    let what = if t.is_symlink() {
        "a symlink"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a socket"
    };
    std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        format!(
            "{} exists and is {what}, not a socket; plugvisor does not remove it: \
             move it away or choose another path",
            path.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("plugvisor-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn second_lock_on_a_directory_names_the_holder() {
        let dir = temp_dir("lock");
        let held = InstanceLock::acquire(&dir).unwrap();
        let text = std::fs::read_to_string(held.path()).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        // flock locks belong to the open file description: a second open conflicts even in the
        // same process, as a second front would.
        let err = InstanceLock::acquire(&dir).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        drop(held);
        InstanceLock::acquire(&dir).expect("free again once dropped");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_lock_handed_to_a_new_front_stays_held_while_either_holds_it() {
        let dir = temp_dir("handover");
        let mut old = InstanceLock::acquire(&dir).unwrap();
        let passed = old.file().unwrap().try_clone_to_owned().unwrap();
        let mut new = InstanceLock::inherit(passed, &dir).unwrap();
        // A new front that fails before it serves leaves the lock with the old one.
        drop(new);
        assert!(matches!(
            InstanceLock::acquire(&dir),
            Err(RunError::AlreadyRunning { .. })
        ));
        // A handover that succeeds: the old front drains and ends; the lock stays taken.
        new =
            InstanceLock::inherit(old.file().unwrap().try_clone_to_owned().unwrap(), &dir).unwrap();
        new.take_over().unwrap();
        old.keep_for_successor();
        drop(old);
        assert!(matches!(
            InstanceLock::acquire(&dir),
            Err(RunError::AlreadyRunning { .. })
        ));
        // The new front's own stop releases it.
        drop(new);
        InstanceLock::acquire(&dir).expect("free once the new front stopped");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn runtime_dir_that_is_a_file_is_refused_clearly() {
        let dir = temp_dir("file");
        let file = dir.join("runtime");
        std::fs::write(&file, "x").unwrap();
        let msg = crate::observe::logging::error_chain(&InstanceLock::acquire(&file).unwrap_err());
        assert!(msg.contains("exists and is not a directory"), "{msg}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_sockets_are_replaced_or_removed() {
        let dir = temp_dir("sock");
        let file = dir.join("a.sock");
        std::fs::write(&file, "keep").unwrap();
        let err = prepare_socket_path(&file).unwrap_err();
        assert!(err.to_string().contains("is a regular file"), "{err}");
        remove_socket(&file);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");

        let link = dir.join("b.sock");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(prepare_socket_path(&link)
            .unwrap_err()
            .to_string()
            .contains("symlink"));

        let sock = dir.join("c.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(someone_listens(&sock));
        drop(listener);
        assert!(!someone_listens(&sock), "a stale socket is nobody's");
        prepare_socket_path(&sock).unwrap();
        assert!(!sock.exists());
        prepare_socket_path(&sock).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
