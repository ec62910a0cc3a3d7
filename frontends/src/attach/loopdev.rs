//! Loop devices through the kernel's ioctl interface.
//!
//! Devices are always allocated with `LOOP_CTL_GET_FREE` on `/dev/loop-control`, never by a
//! fixed number, so any number of volumes can be attached (the kernel creates new nodes on
//! demand). A device is configured in one `LOOP_CONFIGURE` call with a 4 KiB logical block
//! size and direct I/O.
//!
//! Invariant: the daemon keeps no loop device open. A device stays configured when the daemon
//! exits or dies, so that the next daemon takes it over (see `fuse::session::Session::adopt`), and it
//! is detached explicitly (`LOOP_CLR_FD`, which the kernel defers to the last close while
//! anyone has it open). Holding it open would also be a hazard: a dying daemon's last close
//! of a loop device waits for the disk's open mutex, which `sync(2)` holds while it waits
//! for the device's writeback, which waits for the next daemon, which waits for the dying
//! one to be gone. Devices left behind by a session that nobody took over are detached at
//! the next start ([`release_under`]).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64` of `<linux/loop.h>` (field names as in the kernel).
#[repr(C)]
#[allow(clippy::struct_field_names)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// A configured loop device (not held open, see the module docs).
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    direct_io: bool,
}

impl LoopDevice {
    /// Put a new loop device on `backing` (already open read-write), with `block_size`.
    ///
    /// # Errors
    /// `/dev/loop-control` or the device cannot be used, or configuring fails.
    pub fn configure(backing: &File, name: &str, block_size: u32) -> std::io::Result<Self> {
        let control = File::open("/dev/loop-control")?;
        let mut last = None;
        // Another process may take the free device between GET_FREE and CONFIGURE: retry.
        for _ in 0..16 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
            let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let path = PathBuf::from(format!("/dev/loop{n}"));
            let file = match open_device(&path, n) {
                Ok(f) => f,
                // A device being torn down by its last closer (autoclear) refuses opens for
                // a moment: take another.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut result = Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            for flags in [LO_FLAGS_DIRECT_IO, 0] {
                result = loop_configure(&file, backing, name, block_size, flags);
                match &result {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                    _ => break,
                }
            }
            match result {
                Ok(direct_io) => return Ok(Self { path, direct_io }),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no free loop device")))
    }

    /// The loop device already set up on `backing` (by an earlier daemon whose attach session
    /// this one took over), opened, if there is one. Found by the kernel's record of each
    /// device's backing file (`/sys/block/loopN/loop/backing_file`).
    pub fn find(backing: &Path) -> Option<Self> {
        let want = backing.as_os_str().as_encoded_bytes();
        configured().find_map(|(path, sys, file)| {
            // One detached while held open goes at its last close: not a device to use.
            let flag =
                |f: &str| std::fs::read(sys.join(f)).unwrap_or_default().first() == Some(&b'1');
            (file == want && !flag("loop/autoclear")).then(|| Self {
                path,
                direct_io: flag("loop/dio"),
            })
        })
    }

    fn open(&self) -> std::io::Result<File> {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&self.path)
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the kernel accepted direct I/O on the backing file.
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// Make the device take its backing file's current size (after the volume grew); returns
    /// the device's size in bytes.
    ///
    /// # Errors
    /// The ioctls failed.
    pub fn set_capacity(&self) -> std::io::Result<u64> {
        let file = self.open()?;
        // SAFETY: LOOP_SET_CAPACITY takes no argument; `file` is an open loop device.
        if unsafe { libc::ioctl(file.as_raw_fd(), LOOP_SET_CAPACITY, 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
        if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &raw mut size) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(size)
    }

    /// Detach the device from its backing file. If someone still has it open, the kernel
    /// detaches it when they close it (autoclear).
    pub fn detach(self) {
        let file = match self.open() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(device = %self.path.display(), error = %e, "cannot open a loop device to detach it");
                return;
            }
        };
        // SAFETY: LOOP_CLR_FD takes no argument; `file` is an open loop device.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), LOOP_CLR_FD, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: already detached.
            if e.raw_os_error() != Some(libc::ENXIO) {
                tracing::warn!(device = %self.path.display(), error = %e, "LOOP_CLR_FD failed");
            }
        }
    }
}

fn loop_configure(
    dev: &File,
    backing: &File,
    name: &str,
    block_size: u32,
    flags: u32,
) -> std::io::Result<bool> {
    let mut file_name = [0u8; 64];
    let n = name.len().min(63);
    file_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let cfg = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: flags,
            lo_file_name: file_name,
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `cfg` is (repr(C), same
    // layout as the kernel's), alive for the duration of the call.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &raw const cfg) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(flags & LO_FLAGS_DIRECT_IO != 0)
}

/// Open `/dev/loopN`, waiting briefly for devtmpfs to create a new node, and creating it
/// ourselves if it never appears.
fn open_device(path: &Path, n: i32) -> std::io::Result<File> {
    for _ in 0..50 {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
    let dev = libc::makedev(7, n as u32);
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o660, dev) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
    OpenOptions::new().read(true).write(true).open(path)
}

/// Detach every loop device whose backing file is under `dir` except those at `keep`: the
/// devices of a session that was not taken over, or of volumes not attached again.
pub fn release_under(dir: &Path, keep: &[PathBuf]) {
    let want = dir.as_os_str().as_encoded_bytes();
    for (path, _, file) in configured() {
        if file.starts_with(want) && file.get(want.len()) == Some(&b'/') && !keep.contains(&path) {
            tracing::info!(device = %path.display(), "detaching a loop device left by an earlier daemon");
            LoopDevice {
                path,
                direct_io: false,
            }
            .detach();
        }
    }
}

/// The configured loop devices: `/dev/loopN`, its sysfs directory and its backing file's path.
fn configured() -> impl Iterator<Item = (PathBuf, PathBuf, Vec<u8>)> {
    let entries = std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten();
    entries.filter_map(|entry| {
        let n: i32 = entry
            .file_name()
            .to_str()?
            .strip_prefix("loop")?
            .parse()
            .ok()?;
        let sys = entry.path();
        let mut file = std::fs::read(sys.join("loop/backing_file")).ok()?;
        if file.last() == Some(&b'\n') {
            file.pop();
        }
        Some((PathBuf::from(format!("/dev/loop{n}")), sys, file))
    })
}

/// Whether the block device at `path` is in use by someone other than this process: mounted,
/// held by another device, or open in another process.
pub fn in_use(path: &Path) -> bool {
    // O_EXCL on a block device fails with EBUSY while it is mounted or exclusively held.
    if let Err(e) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(path)
    {
        if e.raw_os_error() == Some(libc::EBUSY) {
            return true;
        }
    }
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    for p in procs.flatten() {
        let pid = p.file_name();
        let Some(pid) = pid.to_str() else { continue };
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|t| t == path) {
                return true;
            }
        }
    }
    false
}
