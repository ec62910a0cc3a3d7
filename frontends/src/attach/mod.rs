//! Attaching volumes to this node as real block devices.
//!
//! - [`Frontend`]: how a volume becomes a kernel block device. The one implementation here,
//!   [`FuseLoop`], serves each volume as a file of a FUSE filesystem mounted at
//!   `<data-dir>/fuse` on the first attach ([`fuse`]) and puts a loop device with direct I/O and a 4 KiB logical
//!   block size on that file ([`loopdev`]). ublk or kernel-NBD frontends can implement the
//!   same trait on hosts that have those modules.
//! - [`Attacher`]: the node's attachments. It gives each device a stable name,
//!   `/dev/ballast/NAME` (a symlink to `/dev/loopN`), persists the attached set in
//!   `<data-dir>/attached.json` so that a restarted daemon attaches the same volumes again,
//!   and detaches everything (keeping that set) on shutdown.
//!
//! Invariants:
//! - attach and detach are idempotent; they are serialised by one mutex, which is never
//!   taken on the data path (FUSE requests only touch the [`fuse::Registry`] briefly);
//! - detach refuses while the device is mounted or open, unless forced;
//! - a daemon that stops with volumes attached, or dies, leaves the FUSE session (kept by the
//!   holder, [`holder`]), the loop devices and the links to the next daemon, which takes them
//!   over; a session nobody takes over (no holder, or it gave up) is lazily unmounted by the
//!   next daemon, which also detaches its loop devices ([`loopdev::release_under`]).

pub mod fuse;
pub mod holder;
pub mod loopdev;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ::api::{Attachment, ControlError, ErrorKind, VolumeName};

use self::fuse::session::{Session, Transport};
use self::fuse::{Registry, VolumeFs};
use self::holder::Holder;
use self::loopdev::LoopDevice;
use replication::device::{DeviceSource, VolumeDevice};

/// Where stable device names live.
pub const DEV_DIR: &str = "/dev/ballast";

/// The file in the data directory that lists the attached volumes.
pub const STATE_FILE: &str = "attached.json";

/// The FUSE mount point's name in the data directory.
pub const FUSE_DIR: &str = "fuse";

/// Raise the soft limit on open descriptors to the hard limit, so the `/dev/fuse` descriptors
/// can be numbered above every loop device's (see `fuse::session`) and many volumes fit.
/// Returns the soft limit now in force.
///
/// # Errors
/// The limits cannot be read or set.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through the valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads one rlimit through the valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// How long [`Frontend::fenced`] waits for its probe of the replicas.
const FENCE_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A way to turn a volume into a kernel block device.
pub trait Frontend: Send + Sync + std::fmt::Debug {
    /// Make `device` the block device for `name`; returns its kernel path (`/dev/…`).
    ///
    /// # Errors
    /// The device cannot be set up.
    fn attach(&self, name: &VolumeName, device: VolumeDevice) -> Result<PathBuf, ControlError>;

    /// Whether the device of `name` is mounted or open.
    fn busy(&self, name: &VolumeName) -> bool;

    /// Remove the device of `name`; a no-op if there is none.
    fn detach(&self, name: &VolumeName);

    /// The kernel path of `name`'s device, if attached.
    fn device(&self, name: &VolumeName) -> Option<PathBuf>;

    /// Whether `name`'s device is attached but fenced (by a newer attachment on another node,
    /// or by the loss of this node's lease), so that every request on it fails. Asks the
    /// replicas (one flush) when the device does not know yet. Blocking.
    fn fenced(&self, name: &VolumeName) -> bool;

    /// Make the attached device of `name` show the volume's current size; returns it.
    ///
    /// # Errors
    /// `failed_precondition` when it is not attached, `internal` when the kernel refuses.
    fn refresh(&self, name: &VolumeName) -> Result<u64, ControlError>;

    /// Release the frontend's resources: detach everything, or leave the devices to the
    /// next daemon (returns `true` then; their links stay).
    fn shutdown(&self) -> bool;

    /// Attaching the recorded volumes again after a start has ended.
    fn restored(&self) {}
}

/// FUSE file + loop device.
#[derive(Debug)]
pub struct FuseLoop {
    mountpoint: PathBuf,
    registry: Registry,
    runtime: tokio::runtime::Handle,
    transport: Transport,
    session: Mutex<Option<Session>>,
    devices: Mutex<BTreeMap<String, LoopDevice>>,
    /// Keeps the session's descriptors across a restart (classic transport only).
    holder: Option<Holder>,
    /// This daemon's watch of the holder, open while it lives (see [`HANDOVER_LIMIT`]).
    watch: Mutex<Option<std::os::fd::OwnedFd>>,
    /// The saved FUSE table, for the next daemon.
    table: PathBuf,
    /// Set from taking a session over until the recorded volumes are attached again: only
    /// then is a loop device found on a volume's file the one to take over (later, one still
    /// there is an old attachment's, detached while held open).
    adopting: std::sync::atomic::AtomicBool,
}

/// The saved FUSE table's name in the data directory (see `fuse::Registry::save_to`).
pub const TABLE_FILE: &str = "fuse-table.json";

/// How long the attached devices wait for a daemon after one exits: past it with no daemon
/// back, the holder gives the session up and their I/O fails with an error (as it did at
/// once before the holder) instead of waiting for ever.
pub const HANDOVER_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

impl FuseLoop {
    /// A frontend that mounts its FUSE filesystem at `mountpoint` on the first attach (so a
    /// daemon that never attaches never mounts), serving requests through `transport`.
    ///
    /// With the classic transport, a session that an earlier daemon left mounted, with its
    /// descriptors kept by the holder, is taken over now: its requests are served again
    /// (those of volumes not attached again yet wait for [`Attacher::restore`]). Any other
    /// mount left there (by a killed daemon without a holder) is lazily unmounted.
    ///
    /// `holder_socket` names a standing holder ([`holder`]) to use instead of spawning one;
    /// then the session is also looked for in the other holders beside it, and moved to it.
    pub fn new(
        mountpoint: PathBuf,
        runtime: tokio::runtime::Handle,
        transport: Transport,
        holder_socket: Option<PathBuf>,
    ) -> Self {
        // Canonical, as the kernel shows mounts and loop devices' backing files.
        let dir = mountpoint.parent().unwrap_or(Path::new("/"));
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
        let mountpoint = match mountpoint.file_name() {
            Some(leaf) => dir.join(leaf),
            None => mountpoint,
        };
        let holder = (transport == Transport::Classic).then(|| match holder_socket {
            Some(socket) => Holder::standing(socket),
            None => Holder::new(dir.join(holder::SOCKET)),
        });
        let this = Self {
            mountpoint,
            registry: Registry::default(),
            runtime,
            transport,
            session: Mutex::new(None),
            devices: Mutex::new(BTreeMap::new()),
            holder,
            watch: Mutex::new(None),
            table: dir.join(TABLE_FILE),
            adopting: std::sync::atomic::AtomicBool::new(false),
        };
        if let Err(e) = this.take_over() {
            if let Some(h) = &this.holder {
                h.end();
            }
            tracing::warn!(error = %e, "cannot take over the attach session of the daemon before; its devices fail");
            // Loop devices first: once the mount is detached, their backing files no longer
            // show its path.
            loopdev::release_under(&this.mountpoint, &[]);
            lazy_unmount(&this.mountpoint);
        }
        this
    }

    /// Take over the session at the mount point, if there is one and the holder has its
    /// descriptors; otherwise unmount what is there. `Err` when taking over failed.
    fn take_over(&self) -> std::io::Result<()> {
        // Our holder's session (a restart), else another holder's (a hand-over between pods).
        let found = match &self.holder {
            Some(h) if holder::fuse_mounted(&self.mountpoint) => {
                h.take().map(|fds| (fds, None)).or_else(|| {
                    h.others()
                        .into_iter()
                        .find_map(|o| o.take().map(|fds| (fds, Some(o))))
                })
            }
            _ => None,
        };
        let Some((fds, other)) = found else {
            if let Some(h) = &self.holder {
                h.end();
            }
            loopdev::release_under(&self.mountpoint, &[]);
            lazy_unmount(&self.mountpoint);
            return Ok(());
        };
        self.registry
            .restore(&self.table)
            .map_err(std::io::Error::other)?;
        let fs = Arc::new(VolumeFs::new(self.registry.clone(), self.runtime.clone()));
        let n = fds.len();
        let s = Session::adopt(fds, &fs)?;
        self.registry
            .save_to(&self.table)
            .map_err(std::io::Error::other)?;
        tracing::info!(path = %self.mountpoint.display(), workers = n, "took over the attach FUSE session of the daemon before; requests it left unanswered are served again");
        let mut keeper = self.holder.clone();
        if let (Some(h), Some(other)) = (&self.holder, other) {
            // Taken from another holder: ours keeps it from now on and the other lets go. If
            // ours cannot, the other keeps it (and this daemon watches that one).
            let moved = h
                .spawn(&self.mountpoint, HANDOVER_LIMIT)
                .and_then(|()| h.keep(&s.dev_fds()));
            match moved {
                Ok(()) => {
                    other.end();
                    tracing::info!(from = %other.socket().display(), to = %h.socket().display(), "moved the attach session to this daemon's holder");
                }
                Err(e) => {
                    tracing::warn!(error = %e, holder = %other.socket().display(), "cannot move the attach session to this daemon's holder; the other keeps it");
                    keeper = Some(other);
                }
            }
        }
        *self.session.lock().expect("session lock") = Some(s);
        self.adopting
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(k) = &keeper {
            self.watch_holder(k);
        }
        Ok(())
    }

    /// Keep a watch on `h` open for as long as this daemon lives.
    fn watch_holder(&self, h: &Holder) {
        match h.watch() {
            Ok(fd) => *self.watch.lock().expect("watch lock") = Some(fd),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the FUSE holder: if this daemon dies, its devices wait for the next one without a time limit");
            }
        }
    }

    /// Mount the filesystem unless it is mounted.
    fn ensure_mounted(&self) -> std::io::Result<()> {
        let mut session = self.session.lock().expect("session lock");
        if session.is_some() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.mountpoint)?;
        let fs = Arc::new(VolumeFs::new(self.registry.clone(), self.runtime.clone()));
        // A local volume's request occupies its worker until it completes (see
        // `fuse::VolumeFs::serve`), so the workers bound how many are in flight.
        let workers =
            std::thread::available_parallelism().map_or(16, |n| (n.get() * 8).clamp(8, 32));
        let s = Session::mount(&self.mountpoint, &fs, workers, self.transport)?;
        tracing::info!(path = %self.mountpoint.display(), workers = s.workers(), transport = ?self.transport, "mounted the attach FUSE filesystem");
        if let Some(h) = &self.holder {
            let held = self
                .registry
                .save_to(&self.table)
                .map_err(std::io::Error::other)
                .and_then(|()| h.spawn(&self.mountpoint, HANDOVER_LIMIT))
                .and_then(|()| h.keep(&s.dev_fds()));
            match held {
                Ok(()) => self.watch_holder(h),
                Err(e) => {
                    tracing::warn!(error = %e, "no holder for the attach session: a daemon restart fails the attached devices' I/O");
                }
            }
        } else {
            tracing::info!("with the io_uring FUSE transport, a daemon restart fails the attached devices' I/O (requests in ring entries are not sent again)");
        }
        *session = Some(s);
        Ok(())
    }
}

/// How long [`FuseLoop::refresh`] waits for the kernel's cached file size to expire (the FUSE
/// attribute TTL is one second).
const TTL_WAIT_SECS: u64 = 3;

fn not_attached(name: &VolumeName) -> ControlError {
    ControlError::new(
        ErrorKind::FailedPrecondition,
        format!("volume {name} is not attached on this node"),
    )
}

fn internal(what: &str, e: &std::io::Error) -> ControlError {
    ControlError::new(ErrorKind::Internal, format!("{what}: {e}"))
}

fn persist_error(what: &str, e: &::host::persist::PersistError) -> ControlError {
    ControlError::new(
        ErrorKind::Internal,
        format!("{what}: {}", api::error_chain(e)),
    )
}

impl Frontend for FuseLoop {
    fn attach(&self, name: &VolumeName, device: VolumeDevice) -> Result<PathBuf, ControlError> {
        if let Some(dev) = self.device(name) {
            return Ok(dev);
        }
        self.ensure_mounted().map_err(|e| {
            internal(
                &format!("cannot mount FUSE at {}", self.mountpoint.display()),
                &e,
            )
        })?;
        self.registry.insert(name.as_str(), device);
        let file = self.mountpoint.join(name.as_str());
        let adopting = self.adopting.load(std::sync::atomic::Ordering::SeqCst);
        if let Some(dev) = adopting.then(|| LoopDevice::find(&file)).flatten() {
            // Set up by the daemon before this one, on the session taken over.
            let path = dev.path().to_owned();
            tracing::info!(volume = %name, device = %path.display(), "took over the loop device");
            self.devices
                .lock()
                .expect("devices lock")
                .insert(name.to_string(), dev);
            return Ok(path);
        }
        let backing = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(&file)
            .map_err(|e| {
                self.registry.remove(name.as_str());
                internal(&format!("cannot open {}", file.display()), &e)
            })?;
        let dev = LoopDevice::configure(&backing, name.as_str(), 4096).map_err(|e| {
            self.registry.remove(name.as_str());
            internal("cannot set up a loop device", &e)
        })?;
        if !dev.direct_io() {
            tracing::warn!(volume = %name, "the loop device runs without direct I/O");
        }
        let path = dev.path().to_owned();
        self.devices
            .lock()
            .expect("devices lock")
            .insert(name.to_string(), dev);
        Ok(path)
    }

    fn busy(&self, name: &VolumeName) -> bool {
        self.device(name).is_some_and(|p| loopdev::in_use(&p))
    }

    fn detach(&self, name: &VolumeName) {
        let dev = self
            .devices
            .lock()
            .expect("devices lock")
            .remove(name.as_str());
        if let Some(dev) = dev {
            dev.detach();
        }
        self.registry.remove(name.as_str());
    }

    fn device(&self, name: &VolumeName) -> Option<PathBuf> {
        self.devices
            .lock()
            .expect("devices lock")
            .get(name.as_str())
            .map(|d| d.path().to_owned())
    }

    fn fenced(&self, name: &VolumeName) -> bool {
        if self.device(name).is_none() {
            return false;
        }
        let Some(device) = self.registry.device(name.as_str()) else {
            return false;
        };
        if device.is_fenced() || matches!(device, VolumeDevice::Local(_)) {
            return device.is_fenced();
        }
        // A node learns that another took its volume over at its next request to a replica:
        // make one (a flush, harmless) so a superseded attachment is found now.
        let (tx, rx) = std::sync::mpsc::channel();
        let probe = device.clone();
        self.runtime.spawn(async move {
            let _ = tx.send(volume::device::BlockDevice::flush(&probe).await);
        });
        let _ = rx.recv_timeout(FENCE_PROBE_TIMEOUT);
        device.is_fenced()
    }

    fn refresh(&self, name: &VolumeName) -> Result<u64, ControlError> {
        let want = self
            .registry
            .size(name.as_str())
            .ok_or_else(|| not_attached(name))?;
        // The kernel caches the FUSE file's size for the attribute TTL; stat until it shows
        // the volume's size, so that the loop device reads the new one.
        let file = self.mountpoint.join(name.as_str());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(TTL_WAIT_SECS);
        loop {
            let have = std::fs::metadata(&file)
                .map_err(|e| internal(&format!("cannot stat {}", file.display()), &e))?
                .len();
            if have == want || std::time::Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let devices = self.devices.lock().expect("devices lock");
        let dev = devices
            .get(name.as_str())
            .ok_or_else(|| not_attached(name))?;
        let size = dev
            .set_capacity()
            .map_err(|e| internal("cannot update the loop device's size", &e))?;
        tracing::info!(volume = %name, size, "the attached device shows the new size");
        Ok(size)
    }

    fn shutdown(&self) -> bool {
        let devices = std::mem::take(&mut *self.devices.lock().expect("devices lock"));
        let session = self.session.lock().expect("session lock").take();
        if let Some(s) = session
            .as_ref()
            .filter(|_| !devices.is_empty() && self.holder.is_some())
        {
            // Hand over: the holder keeps the session, the loop devices stay configured, and
            // nothing is answered (or read) from now on: the next daemon serves it again.
            if !s.freeze_and_stop_reading(std::time::Duration::from_secs(5)) {
                tracing::warn!("a FUSE worker did not stop reading within 5 s; a request it reads after the next daemon took over is never answered");
            }
            tracing::info!(
                devices = devices.len(),
                "leaving the attached devices to the next daemon"
            );
            return true;
        }
        for (_, dev) in devices {
            dev.detach();
        }
        if let Some(session) = session {
            drop(session);
            lazy_unmount(&self.mountpoint);
        }
        if let Some(h) = &self.holder {
            h.end();
        }
        false
    }

    fn restored(&self) {
        self.adopting
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.registry.end_restore();
        // Devices of the session taken over whose volumes were not attached again.
        let keep: Vec<PathBuf> = self
            .devices
            .lock()
            .expect("devices lock")
            .values()
            .map(|d| d.path().to_owned())
            .collect();
        loopdev::release_under(&self.mountpoint, &keep);
    }
}

/// `umount -l`, ignoring "not mounted".
fn lazy_unmount(path: &Path) {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: `c` is a valid NUL-terminated path.
    let r = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if r == 0 {
        tracing::info!(path = %path.display(), "unmounted a FUSE mount");
    }
}

/// The node's attachments, over one [`Frontend`].
#[derive(Debug)]
pub struct Attacher {
    source: Arc<dyn DeviceSource>,
    frontend: Box<dyn Frontend>,
    state_file: PathBuf,
    dev_dir: PathBuf,
    /// Serialises attach and detach; also guards the persisted set.
    ops: Mutex<()>,
}

impl Attacher {
    /// An attacher of devices from `source` on `frontend`, persisting in `data_dir`.
    pub fn new(
        source: Arc<dyn DeviceSource>,
        frontend: Box<dyn Frontend>,
        data_dir: &Path,
    ) -> Self {
        Self {
            source,
            frontend,
            state_file: data_dir.join(STATE_FILE),
            dev_dir: PathBuf::from(DEV_DIR),
            ops: Mutex::new(()),
        }
    }

    fn link(&self, name: &VolumeName) -> PathBuf {
        self.dev_dir.join(name.as_str())
    }

    /// The names recorded as attached. A missing file is none; a corrupt one is an error
    /// naming it (taking it as empty would silently forget attachments).
    fn load(&self) -> Result<Vec<String>, ControlError> {
        ::host::persist::read_json(&self.state_file)
            .map(Option::unwrap_or_default)
            .map_err(|e| persist_error("cannot read the attached volumes", &e))
    }

    /// Record `names` as attached, atomically and durably.
    fn save(&self, names: &[String]) -> Result<(), ControlError> {
        ::host::persist::write_json(&self.state_file, names)
            .map_err(|e| persist_error("cannot record the attached volumes", &e))
    }

    /// Attach `name` (idempotent) and return where it is, taking the volume over from another
    /// node's live attachment when `force` is set (replicated volumes; the old writer is
    /// fenced by epoch).
    ///
    /// Blocking: call from a blocking thread.
    ///
    /// # Errors
    /// `not_found` for an unknown volume, `internal` if the device cannot be set up,
    /// `failed_precondition` when the volume is attached on a live node and `force` is not
    /// set.
    pub fn attach(&self, name: &VolumeName, force: bool) -> Result<Attachment, ControlError> {
        let _op = self.ops.lock().expect("attach lock");
        // Read the record first: a volume whose attachment cannot be recorded is not attached.
        let mut names = self.load()?;
        if self.frontend.fenced(name) {
            // Another node took the volume over (or this node lost its lease) since it was
            // attached here: that attachment can never serve again. Replace it; a handle still
            // open on the old device keeps failing (see `fuse::Registry::insert`).
            tracing::warn!(volume = %name, "the attachment here was fenced; attaching again");
            self.frontend.detach(name);
            self.source.release(name);
        }
        let (device, fresh) = if let Some(dev) = self.frontend.device(name) {
            (dev, false)
        } else {
            let volume = self.source.open(name, force)?;
            if volume.is_fenced() {
                // Still shared with an NBD export of the fenced attachment.
                self.source.release(name);
                return Err(ControlError::new(
                    ErrorKind::FailedPrecondition,
                    format!(
                        "this node's earlier attachment of volume {name} was fenced by a newer \
                         one and is still used by an NBD export; close its NBD connections and \
                         attach again"
                    ),
                ));
            }
            let dev = self
                .frontend
                .attach(name, volume)
                .inspect_err(|_| self.source.release(name))?;
            (dev, true)
        };
        let link = self.link(name);
        let finished = std::fs::create_dir_all(&self.dev_dir)
            .and_then(|()| {
                if std::fs::read_link(&link).is_ok_and(|t| t == device) {
                    return Ok(());
                }
                let tmp = self.dev_dir.join(format!(".{name}.tmp"));
                let _ = std::fs::remove_file(&tmp);
                std::os::unix::fs::symlink(&device, &tmp)?;
                std::fs::rename(&tmp, &link).inspect_err(|_| {
                    let _ = std::fs::remove_file(&tmp);
                })
            })
            .map_err(|e| internal(&format!("cannot create {}", link.display()), &e))
            .and_then(|()| {
                if names.iter().any(|n| n == name.as_str()) {
                    return Ok(());
                }
                names.push(name.to_string());
                self.save(&names)
            });
        if let Err(e) = finished {
            // Not attached after all: leave no device, nexus or attachment behind.
            if fresh {
                self.frontend.detach(name);
                self.source.release(name);
            }
            return Err(e);
        }
        tracing::info!(volume = %name, device = %device.display(), link = %link.display(), "volume attached");
        Ok(Attachment {
            volume: name.to_string(),
            path: link.display().to_string(),
            device: device.display().to_string(),
            attached: true,
        })
    }

    /// Detach `name` (idempotent). Refuses with `failed_precondition` while the device is
    /// mounted or open, unless `force`.
    ///
    /// Blocking: call from a blocking thread.
    ///
    /// # Errors
    /// `not_found` for an unknown volume, `failed_precondition` when busy.
    pub fn detach(&self, name: &VolumeName, force: bool) -> Result<Attachment, ControlError> {
        let _op = self.ops.lock().expect("attach lock");
        let device = self.frontend.device(name);
        if device.is_none() {
            // Unknown volume that is not attached either.
            self.source.exists(name)?;
        }
        if !force && self.frontend.busy(name) {
            return Err(ControlError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "volume {name} is in use (its device is mounted or open); unmount or close \
                     it first, or detach with --force"
                ),
            ));
        }
        self.frontend.detach(name);
        if device.is_some() {
            self.source.release(name);
        }
        let link = self.link(name);
        if let Some(dev) = &device {
            if std::fs::read_link(&link).is_ok_and(|t| &t == dev) {
                let _ = std::fs::remove_file(&link);
            }
        }
        let mut names = self.load()?;
        if names.iter().any(|n| n == name.as_str()) {
            names.retain(|n| n != name.as_str());
            self.save(&names)?;
        }
        if device.is_some() {
            tracing::info!(volume = %name, force, "volume detached");
        }
        Ok(Attachment {
            volume: name.to_string(),
            path: link.display().to_string(),
            device: device.map(|d| d.display().to_string()).unwrap_or_default(),
            attached: false,
        })
    }

    /// Make the attached device of `name` show the volume's current size (after a resize).
    /// Blocking.
    ///
    /// # Errors
    /// `failed_precondition` when it is not attached here.
    pub fn refresh(&self, name: &VolumeName) -> Result<u64, ControlError> {
        let _op = self.ops.lock().expect("attach lock");
        self.frontend.refresh(name)
    }

    /// The kernel device of `name`, if it is attached on this node.
    pub fn device(&self, name: &VolumeName) -> Option<PathBuf> {
        self.frontend.device(name)
    }

    /// Attach again every volume recorded as attached. Blocking.
    pub fn restore(&self) {
        let names = match self.load() {
            Ok(names) => names,
            Err(e) => {
                tracing::error!(error = %e.full_message(), "cannot attach volumes again after restart");
                return;
            }
        };
        for name in names {
            let Ok(vn) = VolumeName::new(&name) else {
                continue;
            };
            if let Err(e) = self.attach(&vn, false) {
                tracing::error!(volume = %name, error = %e.full_message(), "cannot attach again after restart");
            }
        }
        self.frontend.restored();
    }

    /// Detach every device (keeping the recorded set for the next start) and stop the
    /// frontend, or leave the devices and their links to the next daemon when the frontend
    /// hands them over ([`Frontend::shutdown`]). Blocking.
    pub fn shutdown(&self) {
        let _op = self.ops.lock().expect("attach lock");
        let links: Vec<(PathBuf, PathBuf)> = self
            .load()
            .unwrap_or_default()
            .iter()
            .filter_map(|name| {
                let vn = VolumeName::new(name).ok()?;
                Some((self.link(&vn), self.frontend.device(&vn)?))
            })
            .collect();
        if self.frontend.shutdown() {
            return;
        }
        for (link, dev) in links {
            if std::fs::read_link(&link).is_ok_and(|t| t == dev) {
                let _ = std::fs::remove_file(&link);
            }
        }
    }
}
