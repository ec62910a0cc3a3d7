//! The descriptor holder: a small process that keeps the attach FUSE session's `/dev/fuse`
//! descriptors open while the daemon restarts, so the attached block devices outlive it.
//!
//! Why: the kernel fails every request read from a `/dev/fuse` file description once that
//! description is released, and aborts the whole connection (every attached device then
//! fails with `EIO`) once its last descriptor closes. A dying daemon releases its own; the
//! holder's duplicates keep them alive. The requests the old daemon read but never answered
//! stay on the kernel's processing lists, and the next daemon moves them back to the pending
//! queue with `FUSE_NOTIFY_RESEND` (see `fuse::session::Session::adopt`). Block reads and writes
//! at fixed offsets are idempotent, so serving them again is safe.
//!
//! The holder is `ballast holder`, started by the daemon when it mounts (in its own session,
//! so a signal to the daemon's process group or a SIGKILL of the daemon leaves it running).
//! It listens on a unix socket (`SOCK_SEQPACKET`, mode 0600, in the data directory) for one
//! message per connection:
//! - `KEEP` with the descriptors (`SCM_RIGHTS`): hold these instead of any held before;
//! - `TAKE`: answered `FDS` with duplicates of the held descriptors, or `NONE`;
//! - `END`: close them and exit (the daemon unmounted).
//!
//! Every answer but `FDS` is `OK`. It also exits by itself once the mount point no longer
//! holds a FUSE mount (unmounted by anyone), so it never keeps a dead session alive.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    accept, bind, connect, listen, recvmsg, sendmsg, socket, AddressFamily, Backlog,
    ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};

/// The socket's name in the data directory.
pub const SOCKET: &str = "fuse-holder.sock";
/// The most descriptors one message carries (the kernel's `SCM_MAX_FD`).
const MAX_FDS: usize = 253;
/// How often the holder checks that its mount still exists.
const WATCH: Duration = Duration::from_millis(500);
/// How long a client waits for the holder's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

fn send(fd: RawFd, tag: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let iov = [IoSlice::new(tag)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// One message: its tag and the descriptors it carried.
fn receive(fd: RawFd) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = [0u8; 16];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(got) = c {
            // SAFETY: the kernel just installed these descriptors in this process for us.
            fds.extend(got.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
        }
    }
    let n = msg.bytes;
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "descriptors were cut off",
        ));
    }
    Ok((buf[..n].to_vec(), fds))
}

/// Whether `mountpoint` holds a FUSE mount now (per `/proc/self/mountinfo`).
pub fn fuse_mounted(mountpoint: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    ::host::mount::parse_mountinfo(&info)
        .iter()
        .any(|m| m.mount_point == mountpoint && m.fs_type.starts_with("fuse"))
}

/// Run the holder for the session mounted at `mountpoint`, answering on `socket`, until it
/// is told to end or the mount is gone.
///
/// # Errors
/// The socket cannot be set up.
pub fn run(socket: &Path, mountpoint: &Path) -> io::Result<()> {
    serve(socket, &|| fuse_mounted(mountpoint))
}

/// [`run`], with `alive` telling whether the session still exists.
fn serve(socket: &Path, alive: &dyn Fn() -> bool) -> io::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = seqpacket()?;
    bind(listener.as_raw_fd(), &UnixAddr::new(socket)?)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    listen(&listener, Backlog::new(16)?)?;
    let mut held: Vec<OwnedFd> = Vec::new();
    loop {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&raw mut pfd, 1, WATCH.as_millis() as i32) };
        if n == 0 || (n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted) {
            if !alive() {
                break;
            }
            continue;
        }
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let Ok(conn) = accept(listener.as_raw_fd()) else {
            continue;
        };
        // SAFETY: `accept` returned a new descriptor that nobody else owns.
        let conn = unsafe { OwnedFd::from_raw_fd(conn) };
        let Ok((tag, fds)) = receive(conn.as_raw_fd()) else {
            continue;
        };
        match tag.as_slice() {
            b"KEEP" => {
                held = fds;
                let _ = send(conn.as_raw_fd(), b"OK", &[]);
            }
            b"TAKE" if held.is_empty() => {
                let _ = send(conn.as_raw_fd(), b"NONE", &[]);
            }
            b"TAKE" => {
                let raw: Vec<RawFd> = held.iter().map(AsRawFd::as_raw_fd).collect();
                let _ = send(conn.as_raw_fd(), b"FDS", &raw);
            }
            b"PING" => {
                let _ = send(conn.as_raw_fd(), b"OK", &[]);
            }
            b"END" => {
                let _ = send(conn.as_raw_fd(), b"OK", &[]);
                break;
            }
            _ => {}
        }
    }
    drop(held);
    let _ = std::fs::remove_file(socket);
    Ok(())
}

/// A daemon's link to the holder of its attach session.
#[derive(Debug, Clone)]
pub struct Holder {
    socket: PathBuf,
}

impl Holder {
    /// The holder answering on `socket` (started or not).
    pub fn new(socket: PathBuf) -> Self {
        Self { socket }
    }

    /// Start a holder for the session mounted at `mountpoint`, in a session of its own, and
    /// wait until it answers.
    ///
    /// # Errors
    /// The process cannot be started or does not answer within five seconds.
    pub fn spawn(&self, mountpoint: &Path) -> io::Result<()> {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe()?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("holder")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--mountpoint")
            .arg(mountpoint)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: `setsid` is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let deadline = std::time::Instant::now() + ANSWER_TIMEOUT;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(io::Error::other(format!("the holder exited with {status}")));
            }
            if self.ask(b"PING", &[]).is_ok() {
                // Reaped by init once it exits: it outlives this process by design.
                drop(child);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the holder did not answer",
        ))
    }

    fn ask(&self, tag: &[u8], fds: &[RawFd]) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
        let s = seqpacket()?;
        connect(s.as_raw_fd(), &UnixAddr::new(&self.socket)?)?;
        let timeout = libc::timeval {
            tv_sec: ANSWER_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval by pointer with its size.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        send(s.as_raw_fd(), tag, fds)?;
        receive(s.as_raw_fd())
    }

    /// Have the holder keep `fds` (replacing what it held).
    ///
    /// # Errors
    /// The holder does not answer.
    pub fn keep(&self, fds: &[RawFd]) -> io::Result<()> {
        if fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} descriptors, at most {MAX_FDS}", fds.len()),
            ));
        }
        match self.ask(b"KEEP", fds)?.0.as_slice() {
            b"OK" => Ok(()),
            other => Err(io::Error::other(format!(
                "the holder answered {:?}",
                String::from_utf8_lossy(other)
            ))),
        }
    }

    /// Take duplicates of the held descriptors; `None` when there is no holder or it holds
    /// none.
    pub fn take(&self) -> Option<Vec<OwnedFd>> {
        match self.ask(b"TAKE", &[]) {
            Ok((tag, fds)) if tag == b"FDS" && !fds.is_empty() => Some(fds),
            _ => None,
        }
    }

    /// Tell the holder to close what it holds and exit (no error if there is none).
    pub fn end(&self) {
        let _ = self.ask(b"END", &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_no_fuse_mount() {
        assert!(!fuse_mounted(Path::new("/")));
        assert!(!fuse_mounted(Path::new("/no/such/mount")));
    }

    #[test]
    fn a_holder_keeps_descriptors_and_hands_out_duplicates_until_told_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join(SOCKET);
        let s = socket.clone();
        let t = std::thread::spawn(move || serve(&s, &|| true));
        let h = Holder::new(socket.clone());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while h.ask(b"PING", &[]).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the holder never answered"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(h.take().is_none(), "nothing held yet");
        let (r, w) = nix::unistd::pipe().unwrap();
        h.keep(&[w.as_raw_fd()]).unwrap();
        drop(w);
        // The holder's copy keeps the pipe's write end open: no EOF for the reader.
        let got = h.take().expect("the held descriptor");
        assert_eq!(got.len(), 1);
        nix::unistd::write(&got[0], b"x").unwrap();
        let mut b = [0u8; 1];
        assert_eq!(nix::unistd::read(r.as_raw_fd(), &mut b).unwrap(), 1);
        drop(got);
        h.end();
        t.join().unwrap().unwrap();
        // Every write end is closed now: the reader sees EOF.
        assert_eq!(nix::unistd::read(r.as_raw_fd(), &mut b).unwrap(), 0);
        assert!(!socket.exists());
    }
}
