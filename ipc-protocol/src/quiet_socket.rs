//! Unix stream connections as a read half and a write half that do not wake their process when
//! the peer reads: the front's connections (to each plugin, and from Envoy when `listen` is a Unix
//! socket) and the plugin host's connection to the front.
//!
//! tokio registers a Unix stream with the reactor for reading and writing at once
//! (edge-triggered). Linux then reports the socket writable again every time the peer reads from
//! it (`unix_write_space` has no `SOCK_NOSPACE` check, unlike TCP), so everything a process writes
//! comes back as one more wake-up of one of its threads once the peer has read it: each reply to
//! Envoy, each batch to a plugin, each final reply to the front. That is tens of microseconds of
//! CPU each on a VM, and one more thread wanting a CPU at the end of a response, when the final
//! call has just been written or answered.
//!
//! Here the read half alone is registered, for reading. The write half writes straight to the
//! non-blocking socket; only when the socket is full does it register a duplicate of the
//! descriptor for writability, and it drops that registration with the next write that goes
//! through.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// The most bytes one read asks for: what is zeroed before each read (safe code only), and more
/// than a plugin's answers take.
const READ_MAX: usize = 16 * 1024;

/// Splits a connection into its quiet halves (see the module).
pub fn split(stream: tokio::net::UnixStream) -> io::Result<(ReadHalf, WriteHalf)> {
    // Leaves tokio's reactor, and stays non-blocking.
    let stream = Arc::new(stream.into_std()?);
    stream.set_nonblocking(true)?;
    let read = register(stream.clone(), Interest::READABLE)?;
    Ok((ReadHalf { fd: read }, WriteHalf { stream, full: None }))
}

/// Registers `fd` with the reactor for `interest` only. tokio deprecated the safe constructor
/// because an arbitrary `AsRawFd` may close its descriptor while registered (its replacement is
/// `unsafe`, which this crate forbids); the two types registered here own theirs for as long as
/// the registration lives: the stream shared by both halves, and an owned duplicate.
#[allow(deprecated)]
fn register<T: std::os::fd::AsRawFd>(fd: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    AsyncFd::with_interest(fd, interest)
}

/// Reads from the connection; registered with the reactor for reading only.
#[derive(Debug)]
pub struct ReadHalf {
    fd: AsyncFd<Arc<StdUnixStream>>,
}

/// Writes to the connection without a standing registration with the reactor.
#[derive(Debug)]
pub struct WriteHalf {
    stream: Arc<StdUnixStream>,
    /// While the socket is full: a duplicate descriptor registered for writability.
    full: Option<AsyncFd<OwnedFd>>,
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let want = buf.remaining().min(READ_MAX);
            let unfilled = buf.initialize_unfilled_to(want);
            match (&**guard.get_inner()).read(unfilled) {
                Ok(n) => {
                    // A short read emptied the socket: the next read waits for new data rather
                    // than finding out with one more syscall (as tokio's own sockets do).
                    if n > 0 && n < want {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl WriteHalf {
    /// Runs the write `op` on the socket; when the socket is full, waits for room.
    fn poll_io(
        &mut self,
        cx: &mut Context<'_>,
        op: impl Fn(&StdUnixStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            if let Some(full) = &self.full {
                let mut guard = ready!(full.poll_write_ready(cx))?;
                match op(&self.stream) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        guard.clear_ready();
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    done => {
                        // Room again: back to no registration at all.
                        self.full = None;
                        return Poll::Ready(done);
                    }
                }
            }
            match op(&self.stream) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let dup = self.stream.as_fd().try_clone_to_owned()?;
                    self.full = Some(register(dup, Interest::WRITABLE)?);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                done => return Poll::Ready(done),
            }
        }
    }
}

impl WriteHalf {
    /// Writes what the socket takes now, without waiting: `WouldBlock` when it is full. Takes
    /// `&self`, so threads that share the half (behind a lock that keeps frames whole) can each
    /// write their own answer.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        (&*self.stream).write(buf)
    }

    /// [`WriteHalf::try_write`] of several buffers in one `writev`.
    pub fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&*self.stream).write_vectored(bufs)
    }

    /// Waits until the socket has room, registering a duplicate descriptor for writability for
    /// the wait only: for a writer that got `WouldBlock` from [`WriteHalf::try_write`].
    pub async fn writable(&self) -> io::Result<()> {
        self.room().writable().await
    }

    /// A handle that waits for room ([`Room::writable`]) while the half itself is elsewhere
    /// (behind a lock that must not be held across the wait).
    pub fn room(&self) -> Room {
        Room {
            stream: self.stream.clone(),
        }
    }

    /// Shuts the connection down for writing now: the peer reads its end of file after what was
    /// written.
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.stream.shutdown(Shutdown::Write)
    }
}

/// Waits for room on a [`WriteHalf`]'s socket (see [`WriteHalf::room`]).
#[derive(Debug, Clone)]
pub struct Room {
    stream: Arc<StdUnixStream>,
}

impl Room {
    /// Returns once the socket has room for a write (at once if it has now).
    pub async fn writable(&self) -> io::Result<()> {
        let fd = register(
            self.stream.as_fd().try_clone_to_owned()?,
            Interest::WRITABLE,
        )?;
        let _ready = fd.writable().await?;
        Ok(())
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_io(cx, |s| (&*s).write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_io(cx, |s| (&*s).write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.stream.shutdown(Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const CHUNK: usize = 64 * 1024;

    #[tokio::test]
    async fn bytes_go_both_ways_and_end_of_file_is_seen() {
        let (front, peer) = tokio::net::UnixStream::pair().unwrap();
        let (mut read, mut write) = split(front).unwrap();
        let (mut peer_read, mut peer_write) = peer.into_split();
        write.write_all(b"to the plugin").await.unwrap();
        let mut got = [0u8; 13];
        peer_read.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"to the plugin");
        peer_write.write_all(b"to the front").await.unwrap();
        let mut got = [0u8; 12];
        read.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"to the front");
        drop(peer_write);
        assert_eq!(read.read(&mut [0u8; 8]).await.unwrap(), 0, "end of file");
        // Our shutdown is the peer's end of file.
        write.shutdown().await.unwrap();
        assert_eq!(peer_read.read(&mut [0u8; 8]).await.unwrap(), 0);
    }

    /// A write that finds the socket full waits for the peer to read, then goes through, and
    /// the halves carry on without a writability registration.
    #[tokio::test]
    async fn a_write_into_a_full_socket_waits_for_room() {
        let (front, peer) = tokio::net::UnixStream::pair().unwrap();
        let (_read, mut write) = split(front).unwrap();
        let (mut peer_read, _peer_write) = peer.into_split();
        let chunk = vec![7u8; CHUNK];
        // Fill the socket until a write would block.
        let mut sent = 0usize;
        loop {
            let attempt =
                tokio::time::timeout(std::time::Duration::from_millis(50), write.write(&chunk))
                    .await;
            match attempt {
                Ok(n) => sent += n.unwrap(),
                Err(_) => break,
            }
        }
        assert!(write.full.is_some(), "the full socket is watched for room");
        let more = tokio::spawn(async move {
            write.write_all(&chunk).await.unwrap();
            write
        });
        let mut received = 0usize;
        let mut buf = vec![0u8; 256 * 1024];
        while received < sent + CHUNK {
            received += peer_read.read(&mut buf).await.unwrap();
        }
        let write = more.await.unwrap();
        assert_eq!(received, sent + CHUNK);
        assert!(write.full.is_none(), "room again: no registration left");
    }

    /// Fills the socket through `write` with `try_write` until it would block; returns the bytes
    /// it took.
    fn fill(write: &WriteHalf) -> usize {
        let chunk = vec![7u8; CHUNK];
        let mut sent = 0usize;
        loop {
            match write.try_write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return sent,
                Err(e) => panic!("try_write: {e}"),
            }
        }
    }

    /// The shared-writer API the plugin host uses: `try_write` says `WouldBlock` on a full socket
    /// instead of waiting, and `writable` returns once the peer has read and there is room.
    #[tokio::test]
    async fn try_write_says_would_block_and_writable_waits_for_room() {
        let (front, peer) = tokio::net::UnixStream::pair().unwrap();
        let (_read, write) = split(front).unwrap();
        let (mut peer_read, _peer_write) = peer.into_split();
        let sent = fill(&write);
        assert!(sent > 0);
        let write = std::sync::Arc::new(write);
        let waiting = tokio::spawn({
            let write = write.clone();
            async move { write.writable().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "no room yet: still waiting");
        let mut buf = vec![0u8; 256 * 1024];
        let mut received = 0usize;
        while received < sent {
            received += peer_read.read(&mut buf).await.unwrap();
        }
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("writable once the peer read")
            .unwrap()
            .unwrap();
        assert!(write.try_write(b"more").unwrap() > 0);
    }

    /// Voluntary context switches of thread `tid` of this process so far: each one is a sleep,
    /// so the count rises by one for each time the thread was woken.
    fn voluntary_switches(tid: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// What the module is for: a thread waiting on the read half sleeps while the peer reads what
    /// the write half wrote (tokio's own halves wake it each time: the socket turns writable
    /// again), and wakes when the peer writes.
    #[test]
    fn the_peer_reading_does_not_wake_the_reading_thread() {
        let (front, mut peer) = StdUnixStream::pair().unwrap();
        front.set_nonblocking(true).unwrap();
        let (halves, got_halves) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let front = tokio::net::UnixStream::from_std(front).unwrap();
                let (mut read, write) = split(front).unwrap();
                let tid = std::fs::read_link("/proc/thread-self").unwrap();
                let tid = tid.file_name().unwrap().to_string_lossy().into_owned();
                halves.send((write, tid)).unwrap();
                let mut byte = [0u8; 1];
                let n = read.read(&mut byte).await.unwrap();
                (n, byte[0])
            })
        });
        let (write, tid) = got_halves.recv().unwrap();
        // Let the reader settle into its wait.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let before = voluntary_switches(&tid);
        for _ in 0..20 {
            assert_eq!(write.try_write(b"a reply").unwrap(), 7);
            let mut got = [0u8; 7];
            peer.read_exact(&mut got).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let woken = voluntary_switches(&tid) - before;
        assert!(
            woken <= 2,
            "the reading thread woke {woken} times while the peer read 20 replies"
        );
        peer.write_all(b"x").unwrap();
        assert_eq!(reader.join().unwrap(), (1, b'x'));
    }
}
