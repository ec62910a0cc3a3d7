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
//! - `WATCH`: the connection stays open for as long as the daemon that sent it lives;
//! - `PING`: answered, nothing else;
//! - `END`: close them and exit (the daemon unmounted).
//!
//! Every other answer is `OK`. It also exits by itself once the mount point no longer holds a
//! FUSE mount (unmounted by anyone), and once no daemon has watched it for its time limit
//! (60 s from the daemon, `HANDOVER_LIMIT`): the devices then fail their I/O rather than wait
//! for a daemon that does not come back. A client that connects and says nothing is cut off
//! after a second. A spawned holder writes why it gave a session up to `fuse-holder.log` beside
//! its socket.
//!
//! A *standing* holder (`ballast holder --standing`, the holder container of a Kubernetes pod,
//! configured to the daemon as `--holder-socket`) is started on its own, not by the daemon, and
//! outlives its sessions: where a spawned holder exits (`END`, the mount gone, the time limit),
//! it only closes what it holds and waits for the next session. It ends with its container.
//!
//! Hand-over between holders: a daemon whose own (standing) holder holds nothing looks for the
//! session in the other holders' sockets of the same directory (another pod's holder, during a
//! DaemonSet update), takes it there, has its own holder keep it, then tells the other `END`.

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
const CHECK: Duration = Duration::from_millis(500);
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

/// Make a receive on `s` fail after `t` instead of waiting for ever.
fn set_timeout(s: &OwnedFd, t: Duration) -> io::Result<()> {
    let timeout = libc::timeval {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(t.subsec_micros()),
    };
    // SAFETY: SO_RCVTIMEO takes a timeval by pointer with its size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
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
/// is told to end, the mount is gone, or no daemon has watched it for `orphaned` (then the
/// session is given up: closing the last descriptors aborts it, and its devices fail their
/// I/O instead of waiting for a daemon that does not come back).
///
/// # Errors
/// The socket cannot be set up.
///
/// A `standing` holder does not exit for any of these: it closes what it holds and waits for
/// the next session, until it is killed.
pub fn run(socket: &Path, mountpoint: &Path, orphaned: Duration, standing: bool) -> io::Result<()> {
    serve(socket, &|| fuse_mounted(mountpoint), orphaned, standing)
}

/// [`run`], with `alive` telling whether the session still exists.
fn serve(
    socket: &Path,
    alive: &dyn Fn() -> bool,
    orphaned: Duration,
    standing: bool,
) -> io::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(socket);
    let listener = seqpacket()?;
    bind(listener.as_raw_fd(), &UnixAddr::new(socket)?)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    listen(&listener, Backlog::new(16)?)?;
    let mut held: Vec<OwnedFd> = Vec::new();
    // Connections of daemons serving the session (`WATCH`): one closes when its daemon exits.
    let mut watchers: Vec<OwnedFd> = Vec::new();
    // Since when no daemon watches (the holder starts watched by the one that spawned it).
    let mut alone: Option<std::time::Instant> = None;
    loop {
        let mut pfds: Vec<libc::pollfd> = std::iter::once(&listener)
            .chain(&watchers)
            .map(|fd| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: a valid array of pollfds of the stated length.
        let n = unsafe {
            libc::poll(
                pfds.as_mut_ptr(),
                pfds.len() as libc::nfds_t,
                CHECK.as_millis() as i32,
            )
        };
        if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(io::Error::last_os_error());
        }
        // A watcher's connection only ever becomes readable by closing.
        let before = watchers.len();
        let gone: Vec<bool> = pfds[1..].iter().map(|p| p.revents != 0).collect();
        let mut i = 0;
        watchers.retain(|_| {
            i += 1;
            !gone[i - 1]
        });
        if watchers.is_empty() && before > 0 {
            alone = Some(std::time::Instant::now());
        }
        if n <= 0 || pfds[0].revents == 0 {
            let orphan = alone.is_some_and(|t| t.elapsed() >= orphaned);
            let over = orphan || !alive();
            if over && !held.is_empty() {
                eprintln!(
                    "ballast holder {}: giving the session up ({} descriptors): {}",
                    socket.display(),
                    held.len(),
                    if orphan {
                        "no daemon watched it for its time limit"
                    } else {
                        "its mount is gone"
                    }
                );
            }
            if over && !standing {
                break;
            }
            if over && !held.is_empty() {
                // Standing: the session is gone or given up; wait for the next one.
                held.clear();
                alone = None;
            }
            continue;
        }
        let Ok(conn) = accept(listener.as_raw_fd()) else {
            continue;
        };
        // SAFETY: `accept` returned a new descriptor that nobody else owns.
        let conn = unsafe { OwnedFd::from_raw_fd(conn) };
        if set_timeout(&conn, Duration::from_secs(1)).is_err() {
            continue;
        }
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
            b"WATCH" if send(conn.as_raw_fd(), b"OK", &[]).is_ok() => {
                watchers.push(conn);
                alone = None;
            }
            b"PING" => {
                let _ = send(conn.as_raw_fd(), b"OK", &[]);
            }
            b"END" => {
                held.clear();
                alone = None;
                let _ = send(conn.as_raw_fd(), b"OK", &[]);
                if !standing {
                    break;
                }
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
    /// A standing holder started by someone else (`--holder-socket`), not spawned.
    standing: bool,
}

/// How long a daemon waits for a standing holder (another container of its pod) to answer.
const STANDING_WAIT: Duration = Duration::from_secs(30);

impl Holder {
    /// The holder the daemon spawns, answering on `socket` (started or not).
    pub fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            standing: false,
        }
    }

    /// A standing holder, started on its own, answering on `socket`.
    pub fn standing(socket: PathBuf) -> Self {
        Self {
            socket,
            standing: true,
        }
    }

    /// The socket it answers on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The other holders whose sockets are in the same directory as this standing holder's
    /// (none for a spawned holder, whose directory is the data directory).
    pub fn others(&self) -> Vec<Holder> {
        if !self.standing {
            return Vec::new();
        }
        let Some(dir) = self.socket.parent() else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut others: Vec<Holder> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| *p != self.socket && p.extension().is_some_and(|x| x == "sock"))
            .map(Holder::standing)
            .collect();
        others.sort_by(|a, b| a.socket.cmp(&b.socket));
        others
    }

    /// Make sure a holder answers for the session mounted at `mountpoint`: spawn one, in a
    /// session of its own, or wait for the standing one.
    ///
    /// # Errors
    /// The process cannot be started, or the holder does not answer in time.
    pub fn spawn(&self, mountpoint: &Path, orphaned: Duration) -> io::Result<()> {
        use std::os::unix::process::CommandExt;
        if self.standing {
            let deadline = std::time::Instant::now() + STANDING_WAIT;
            loop {
                match self.ask(b"PING", &[]) {
                    Ok(_) => return Ok(()),
                    Err(e) if std::time::Instant::now() >= deadline => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!(
                                "the standing holder at {} does not answer: {e}",
                                self.socket.display()
                            ),
                        ))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        let exe = std::env::current_exe()?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("holder")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--mountpoint")
            .arg(mountpoint)
            .arg("--give-up-after")
            .arg(orphaned.as_secs().max(1).to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(
                // What it gave up and why, for whoever looks into a failed restart.
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.socket.with_extension("log"))
                    .map_or_else(|_| std::process::Stdio::null(), Into::into),
            );
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
        set_timeout(&s, ANSWER_TIMEOUT)?;
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

    /// Watch the holder from this process: the returned connection stays open while this
    /// daemon lives, and the holder gives the session up once no daemon has watched it for
    /// its time limit.
    ///
    /// # Errors
    /// The holder does not answer.
    pub fn watch(&self) -> io::Result<OwnedFd> {
        let s = seqpacket()?;
        connect(s.as_raw_fd(), &UnixAddr::new(&self.socket)?)?;
        send(s.as_raw_fd(), b"WATCH", &[])?;
        match receive(s.as_raw_fd())?.0.as_slice() {
            b"OK" => Ok(s),
            other => Err(io::Error::other(format!(
                "the holder answered {:?}",
                String::from_utf8_lossy(other)
            ))),
        }
    }

    /// Tell the holder to close what it holds and exit, or for a standing holder to close it
    /// and wait for the next session (no error if there is none).
    pub fn end(&self) {
        let _ = self.ask(b"END", &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A holder serving `socket` on a thread (its session always there), once it answers.
    fn started(
        socket: &Path,
        orphaned: Duration,
    ) -> (std::thread::JoinHandle<io::Result<()>>, Holder) {
        let s = socket.to_owned();
        let t = std::thread::spawn(move || serve(&s, &|| true, orphaned, false));
        let h = Holder::new(socket.to_owned());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while h.ask(b"PING", &[]).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the holder never answered"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        (t, h)
    }

    #[test]
    fn the_root_is_no_fuse_mount() {
        assert!(!fuse_mounted(Path::new("/")));
        assert!(!fuse_mounted(Path::new("/no/such/mount")));
    }

    #[test]
    fn a_holder_keeps_descriptors_and_hands_out_duplicates_until_told_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join(SOCKET);
        let (t, h) = started(&socket, Duration::from_secs(60));
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

    /// A holder that no daemon watches any more gives its session up after its time limit
    /// (its descriptors close, which aborts the session), but not while one watches.
    #[test]
    fn a_holder_gives_up_once_no_daemon_has_watched_it_for_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join(SOCKET);
        let limit = Duration::from_millis(1500);
        let (t, h) = started(&socket, limit);
        let (r, w) = nix::unistd::pipe().unwrap();
        h.keep(&[w.as_raw_fd()]).unwrap();
        drop(w);
        let watch = h.watch().unwrap();
        std::thread::sleep(limit * 2);
        assert!(!t.is_finished(), "the holder gave up while watched");
        drop(watch);
        let started = std::time::Instant::now();
        t.join().unwrap().unwrap();
        let took = started.elapsed();
        assert!(
            took >= limit - Duration::from_millis(100),
            "gave up after {took:?}"
        );
        let mut b = [0u8; 1];
        assert_eq!(
            nix::unistd::read(r.as_raw_fd(), &mut b).unwrap(),
            0,
            "descriptors closed"
        );
    }

    /// A standing holder outlives its sessions: `END` and its time limit close what it holds,
    /// and it takes the next session; another standing holder in its directory finds it.
    #[test]
    fn a_standing_holder_closes_a_session_it_gives_up_and_waits_for_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("pod-a.sock");
        let limit = Duration::from_millis(600);
        let s = socket.clone();
        let t = std::thread::spawn(move || serve(&s, &|| true, limit, true));
        let h = Holder::standing(socket.clone());
        h.spawn(Path::new("/unused"), limit).unwrap();
        let eof = |r: &OwnedFd| {
            let mut b = [0u8; 1];
            nix::unistd::read(r.as_raw_fd(), &mut b).unwrap() == 0
        };

        let (r, w) = nix::unistd::pipe().unwrap();
        h.keep(&[w.as_raw_fd()]).unwrap();
        drop(w);
        h.end();
        assert!(eof(&r), "END closes what it held");
        assert!(!t.is_finished(), "a standing holder stays after END");

        let (r, w) = nix::unistd::pipe().unwrap();
        h.keep(&[w.as_raw_fd()]).unwrap();
        drop(w);
        drop(h.watch().unwrap());
        std::thread::sleep(limit * 3);
        assert!(eof(&r), "given up after its limit unwatched");
        assert!(!t.is_finished(), "a standing holder stays after giving up");
        assert!(h.take().is_none());

        let other = Holder::standing(dir.path().join("pod-b.sock"));
        let found: Vec<PathBuf> = other
            .others()
            .iter()
            .map(|o| o.socket().to_owned())
            .collect();
        assert_eq!(found, vec![socket.clone()]);
        assert!(Holder::new(dir.path().join("x.sock")).others().is_empty());
        let (_r, w) = nix::unistd::pipe().unwrap();
        h.keep(&[w.as_raw_fd()]).unwrap();
        assert_eq!(other.others()[0].take().map(|f| f.len()), Some(1));
        // Only a kill ends it; the test thread cannot be killed, so it is left running.
        assert!(!t.is_finished());
    }
}
