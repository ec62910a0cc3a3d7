//! Filesystems on attached volumes: probe, format when empty, mount and unmount.
//!
//! These are plain helpers over a block device path and a directory, with no knowledge of
//! volumes or of the daemon, so that the local API (`ballast volume mount`), the CSI node
//! service and the Docker volume plugin all format and mount in exactly the same way.
//! [`ensure_mounted`] is the whole "stage" step; the smaller functions are its parts;
//! [`bind_mount`], [`usage`] and [`grow_filesystem`] are the publish, stats and expand steps.
//!
//! Invariants:
//! - a device is formatted only when `blkid -p` (a low-level probe that reads the device
//!   itself, not a cache) positively reports that it carries no signature at all — no
//!   filesystem, no partition table, no RAID or LVM member. Any other answer, including a
//!   probe failure or an ambiguous probe, means "do not format": a volume with data is never
//!   reformatted;
//! - a device that holds a different filesystem than the one asked for is never touched; the
//!   caller gets [`MountError::FsMismatch`] (when no type is asked for, what is there is mounted);
//! - mounting is idempotent: the device already mounted at the path in the same mode
//!   (read-only or not) is success; anything else mounted there is refused. Unmounting a
//!   path where nothing is mounted is success;
//! - "mounted" is decided from `/proc/self/mountinfo` by device number (major:minor), never by
//!   the source string, so a device reached through a symlink (`/dev/ballast/NAME`) matches.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use api::{ControlError, ErrorKind};

/// Filesystems that [`ensure_mounted`] creates.
pub const SUPPORTED_FS: &[&str] = &["ext4", "xfs"];

/// The filesystem created when none is asked for.
pub const DEFAULT_FS: &str = "ext4";

/// Why a mount helper failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The mount point is not an existing directory.
    #[error("mount point {path}: {reason}")]
    BadMountPoint {
        /// The path asked for.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The filesystem type cannot be created here.
    #[error("unsupported filesystem {0:?} (supported: ext4, xfs)")]
    UnsupportedFs(String),
    /// The device holds another filesystem than the one asked for; it is left untouched.
    #[error(
        "{device} already holds a {found} filesystem, not {wanted}; it is never reformatted \
         (mount it without --fs, or with --fs {found})"
    )]
    FsMismatch {
        /// The device.
        device: PathBuf,
        /// The type blkid reported.
        found: String,
        /// The type asked for.
        wanted: String,
    },
    /// The device carries a signature that is not a mountable filesystem (a partition table,
    /// a RAID member…), or the probe could not tell; it is left untouched.
    #[error("{device} is not empty but holds no filesystem that can be mounted ({what}); refusing to format it")]
    NotAFilesystem {
        /// The device.
        device: PathBuf,
        /// What the probe said.
        what: String,
    },
    /// A read-only mount of a device without a filesystem.
    #[error("{0} has no filesystem yet; mount it read-write once so that it is formatted")]
    EmptyReadOnly(PathBuf),
    /// Something else is mounted at the path.
    #[error("{path} is already a mount point of another device ({source_dev})")]
    OtherMount {
        /// The mount point.
        path: PathBuf,
        /// What is mounted there.
        source_dev: String,
    },
    /// The device is already mounted at the path, but read-only where read-write was asked
    /// for or the other way round.
    #[error("{path} is already mounted {actual}; unmount it first to mount it {wanted}")]
    ModeMismatch {
        /// The mount point.
        path: PathBuf,
        /// How it is mounted (`read-only` or `read-write`).
        actual: &'static str,
        /// How it was asked for.
        wanted: &'static str,
    },
    /// The filesystem is in use and cannot be unmounted.
    #[error("{path} is busy: {detail}")]
    Busy {
        /// The mount point.
        path: PathBuf,
        /// umount's message.
        detail: String,
    },
    /// A tool (blkid, mkfs, mount, umount) failed or could not run.
    #[error("{tool} failed: {detail}")]
    Tool {
        /// The command.
        tool: String,
        /// Its exit status and message.
        detail: String,
    },
    /// An I/O error on a path.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl MountError {
    /// The control-plane kind of this error: bad arguments are `InvalidArgument`, a device or
    /// mount point in the wrong state is `FailedPrecondition`, a failing tool is `Internal`.
    pub fn kind(&self) -> ErrorKind {
        match self {
            MountError::BadMountPoint { .. } | MountError::UnsupportedFs(_) => {
                ErrorKind::InvalidArgument
            }
            MountError::FsMismatch { .. }
            | MountError::NotAFilesystem { .. }
            | MountError::EmptyReadOnly(_)
            | MountError::OtherMount { .. }
            | MountError::ModeMismatch { .. }
            | MountError::Busy { .. } => ErrorKind::FailedPrecondition,
            MountError::Tool { .. } | MountError::Io { .. } => ErrorKind::Internal,
        }
    }

    /// This error as a [`ControlError`], its message followed by its sources.
    pub fn to_control(&self) -> ControlError {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            message.push_str(": ");
            message.push_str(&e.to_string());
            source = e.source();
        }
        ControlError::new(self.kind(), message)
    }
}

/// What a probe found on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No signature at all: safe to format.
    Empty,
    /// A filesystem of this type.
    Filesystem(String),
    /// Some other signature (partition table, RAID member…), described.
    Other(String),
}

/// Probe `device` with `blkid -p` (reads the device, bypasses the blkid cache).
///
/// # Errors
/// blkid could not run, or failed in a way that does not mean "nothing found" (exit 2).
/// An ambiguous probe (exit 8) is [`Probe::Other`], never [`Probe::Empty`].
pub fn probe(device: &Path) -> Result<Probe, MountError> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(device)
        .output()
        .map_err(|e| tool_error("blkid", &e.to_string()))?;
    match out.status.code() {
        Some(0) => {}
        Some(2) => return Ok(Probe::Empty),
        Some(8) => return Ok(Probe::Other("ambivalent probe result".to_owned())),
        _ => {
            return Err(tool_error(
                "blkid",
                &format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ))
        }
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('=').map(str::to_owned))
    };
    let usage = field("USAGE");
    match (field("TYPE"), usage.as_deref()) {
        (Some(t), Some("filesystem") | None) => Ok(Probe::Filesystem(t)),
        (Some(t), Some(u)) => Ok(Probe::Other(format!("{t} ({u})"))),
        (None, _) => Ok(Probe::Other(field("PTTYPE").map_or_else(
            || text.trim().replace('\n', " "),
            |p| format!("{p} partition table"),
        ))),
    }
}

/// The filesystem type on `device`, if `blkid -p` finds one.
#[must_use]
pub fn probe_filesystem(device: &Path) -> Option<String> {
    match probe(device) {
        Ok(Probe::Filesystem(t)) => Some(t),
        _ => None,
    }
}

/// Format `device` with `fs` only if it carries no signature at all. Returns whether it
/// formatted. `mkfs_options` are passed to `mkfs.<fs>` before the device.
///
/// # Errors
/// The type is unsupported, the device holds something other than `fs`, or mkfs failed.
pub fn format_if_empty(
    device: &Path,
    fs: &str,
    mkfs_options: &[String],
) -> Result<bool, MountError> {
    check_fs(fs)?;
    match probe(device)? {
        Probe::Empty => {}
        Probe::Filesystem(found) if found == fs => return Ok(false),
        Probe::Filesystem(found) => {
            return Err(MountError::FsMismatch {
                device: device.to_owned(),
                found,
                wanted: fs.to_owned(),
            })
        }
        Probe::Other(what) => {
            return Err(MountError::NotAFilesystem {
                device: device.to_owned(),
                what,
            })
        }
    }
    run(
        Command::new(format!("mkfs.{fs}"))
            .arg("-q")
            .args(block_size_option(fs, mkfs_options))
            .args(mkfs_options)
            .arg(device),
        &format!("mkfs.{fs}"),
    )?;
    tracing::info!(device = %device.display(), fs, "formatted an empty device");
    Ok(true)
}

/// 4 KiB filesystem blocks, matching the volume's block size, unless the caller chose. For
/// ext4 this matters beyond speed: mke2fs picks 1 KiB blocks for small devices, and the
/// kernel then refuses to grow the filesystem online (resize2fs: "Permission denied").
fn block_size_option(fs: &str, mkfs_options: &[String]) -> Vec<&'static str> {
    let chosen = mkfs_options.iter().any(|o| o.starts_with("-b"));
    if fs == "ext4" && !chosen {
        vec!["-b", "4096"]
    } else {
        Vec::new()
    }
}

/// Mount `device` (type `fs`) at `path` with extra mount `options` (`noatime`, …). Not
/// idempotent by itself: see [`ensure_mounted`].
///
/// # Errors
/// An option is malformed, or mount(8) failed.
pub fn mount(
    device: &Path,
    path: &Path,
    fs: &str,
    read_only: bool,
    options: &[String],
) -> Result<(), MountError> {
    let mut all: Vec<&str> = Vec::with_capacity(options.len() + 1);
    if read_only {
        all.push("ro");
    }
    for o in options {
        if o.is_empty() || o.contains(char::is_whitespace) || o.starts_with('-') {
            return Err(tool_error(
                "mount",
                &format!("invalid mount option {o:?}: options are single words such as noatime"),
            ));
        }
        all.push(o);
    }
    let mut cmd = Command::new("mount");
    cmd.arg("-t").arg(fs);
    if !all.is_empty() {
        cmd.arg("-o").arg(all.join(","));
    }
    run(cmd.arg(device).arg(path), "mount")
}

/// Unmount whatever is mounted at `path`; success if nothing is.
///
/// # Errors
/// The filesystem is busy, or umount(8) failed.
pub fn unmount(path: &Path) -> Result<bool, MountError> {
    if !is_mounted(path) {
        return Ok(false);
    }
    let out = Command::new("umount")
        .arg(path)
        .output()
        .map_err(|e| tool_error("umount", &e.to_string()))?;
    if out.status.success() {
        return Ok(true);
    }
    let detail = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if detail.contains("busy") {
        Err(MountError::Busy {
            path: path.to_owned(),
            detail,
        })
    } else {
        Err(tool_error("umount", &format!("{}: {detail}", out.status)))
    }
}

/// Whether `path` is a mount point.
#[must_use]
pub fn is_mounted(path: &Path) -> bool {
    mount_at(path).is_some()
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The device number, `(major, minor)`.
    pub dev: (u64, u64),
    /// The mount point.
    pub mount_point: PathBuf,
    /// The filesystem type.
    pub fs_type: String,
    /// The mount source as the kernel reports it.
    pub source: String,
    /// Whether mounted read-only.
    pub read_only: bool,
    /// The mounted directory or file within its filesystem (`/` for a whole filesystem).
    pub root: String,
}

/// The top-most mount at `path` (canonicalised when it exists), if any.
#[must_use]
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mountinfo(&info)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
}

/// Parse the text of a mountinfo file.
#[must_use]
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            let (major, minor) = l.get(2)?.split_once(':')?;
            Some(MountEntry {
                dev: (major.parse().ok()?, minor.parse().ok()?),
                mount_point: PathBuf::from(unescape(l.get(4)?)),
                read_only: l.get(5)?.split(',').any(|o| o == "ro"),
                root: unescape(l.get(3)?),
                fs_type: (*r.first()?).to_owned(),
                source: unescape(r.get(1)?),
            })
        })
        .collect()
}

/// The mountinfo escapes: `\040` (space), `\011`, `\012`, `\134`.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if let Some(v) = s
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The device number of the block device at `device` (symlinks followed).
///
/// # Errors
/// It does not exist or is not a block device.
pub fn device_number(device: &Path) -> Result<(u64, u64), MountError> {
    let meta = std::fs::metadata(device).map_err(|e| MountError::Io {
        context: format!("cannot stat {}", device.display()),
        source: e,
    })?;
    if !meta.file_type().is_block_device() {
        return Err(MountError::Tool {
            tool: "stat".to_owned(),
            detail: format!("{} is not a block device", device.display()),
        });
    }
    Ok(split_dev(meta.rdev()))
}

/// Check that `path` is an existing directory; returns it canonicalised.
///
/// # Errors
/// [`MountError::BadMountPoint`].
pub fn check_mount_point(path: &Path) -> Result<PathBuf, MountError> {
    let bad = |reason: &str| MountError::BadMountPoint {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if !path.is_absolute() {
        return Err(bad("not an absolute path"));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => std::fs::canonicalize(path).map_err(|e| bad(&e.to_string())),
        Ok(_) => Err(bad("not a directory")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(bad("does not exist (create the directory first)"))
        }
        Err(e) => Err(bad(&e.to_string())),
    }
}

/// What [`ensure_mounted`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOutcome {
    /// The canonical mount point.
    pub path: PathBuf,
    /// The filesystem type mounted.
    pub fs: String,
    /// Whether the device was formatted now.
    pub formatted: bool,
    /// Whether it was already mounted there (nothing done).
    pub already_mounted: bool,
}

/// Mount `device` at `path` (with `mount_options`), formatting it with `fs` (default
/// [`DEFAULT_FS`]) first only if it carries no signature. With `fs` `None`, an existing filesystem of any type is mounted;
/// with `Some`, a different existing type is refused. Idempotent.
///
/// # Errors
/// See [`MountError`].
pub fn ensure_mounted(
    device: &Path,
    path: &Path,
    fs: Option<&str>,
    mkfs_options: &[String],
    read_only: bool,
    mount_options: &[String],
) -> Result<MountOutcome, MountError> {
    if let Some(fs) = fs {
        check_fs(fs)?;
    }
    let path = check_mount_point(path)?;
    let dev = device_number(device)?;
    if let Some(m) = mount_at(&path) {
        if m.dev == dev {
            if m.read_only != read_only {
                let mode = |ro| if ro { "read-only" } else { "read-write" };
                return Err(MountError::ModeMismatch {
                    path,
                    actual: mode(m.read_only),
                    wanted: mode(read_only),
                });
            }
            return Ok(MountOutcome {
                path,
                fs: m.fs_type,
                formatted: false,
                already_mounted: true,
            });
        }
        return Err(MountError::OtherMount {
            path,
            source_dev: m.source,
        });
    }
    let (fs_type, formatted) = match probe(device)? {
        Probe::Filesystem(found) => match fs {
            Some(wanted) if wanted != found => {
                return Err(MountError::FsMismatch {
                    device: device.to_owned(),
                    found,
                    wanted: wanted.to_owned(),
                })
            }
            _ => (found, false),
        },
        Probe::Other(what) => {
            return Err(MountError::NotAFilesystem {
                device: device.to_owned(),
                what,
            })
        }
        Probe::Empty if read_only => return Err(MountError::EmptyReadOnly(device.to_owned())),
        Probe::Empty => {
            let fs = fs.unwrap_or(DEFAULT_FS);
            let formatted = format_if_empty(device, fs, mkfs_options)?;
            (fs.to_owned(), formatted)
        }
    };
    mount(device, &path, &fs_type, read_only, mount_options)?;
    tracing::info!(device = %device.display(), path = %path.display(), fs = %fs_type, formatted, read_only, "mounted");
    Ok(MountOutcome {
        path,
        fs: fs_type,
        formatted,
        already_mounted: false,
    })
}

/// Bind-mount `source` (a directory or a device file) at `target`, read-only if asked.
/// Idempotent: the same source already bound there in the same mode is success.
///
/// A read-only bind needs a second `remount` step (the kernel ignores `ro` on the first bind);
/// if that step fails the bind is undone, so a caller never gets a writable mount it asked to
/// be read-only.
///
/// # Errors
/// Another mount at `target`, a mode mismatch, or mount(8) failed.
pub fn bind_mount(source: &Path, target: &Path, read_only: bool) -> Result<bool, MountError> {
    let (src_dev, src_root) = bind_source(source)?;
    if let Some(m) = mount_at(target) {
        if m.dev != src_dev || src_root.as_ref().is_some_and(|r| *r != m.root) {
            return Err(MountError::OtherMount {
                path: target.to_owned(),
                source_dev: m.source,
            });
        }
        if m.read_only != read_only {
            let mode = |ro| if ro { "read-only" } else { "read-write" };
            return Err(MountError::ModeMismatch {
                path: target.to_owned(),
                actual: mode(m.read_only),
                wanted: mode(read_only),
            });
        }
        return Ok(false);
    }
    run(
        Command::new("mount").arg("--bind").arg(source).arg(target),
        "mount --bind",
    )?;
    if read_only {
        if let Err(e) = run(
            Command::new("mount")
                .args(["-o", "remount,bind,ro"])
                .arg(target),
            "mount -o remount,bind,ro",
        ) {
            let _ = unmount(target);
            return Err(e);
        }
    }
    tracing::info!(source = %source.display(), target = %target.display(), read_only, "bind-mounted");
    Ok(true)
}

/// What a bind mount of `source` shows in mountinfo: the device of the filesystem holding it,
/// and for a device file (a bind of one devtmpfs node) also its path within that filesystem.
fn bind_source(source: &Path) -> Result<((u64, u64), Option<String>), MountError> {
    let meta = std::fs::metadata(source).map_err(|e| MountError::Io {
        context: format!("cannot stat {}", source.display()),
        source: e,
    })?;
    let root = if meta.file_type().is_block_device() {
        let real = std::fs::canonicalize(source).map_err(|e| MountError::Io {
            context: format!("cannot resolve {}", source.display()),
            source: e,
        })?;
        real.strip_prefix("/dev")
            .ok()
            .map(|rel| format!("/{}", rel.display()))
    } else {
        None
    };
    Ok((split_dev(meta.dev()), root))
}

fn split_dev(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

/// The bind mounts of the block device `device` (its device file bound elsewhere, as a CSI
/// block publish does).
#[must_use]
pub fn binds_of(device: &Path) -> Vec<MountEntry> {
    let Ok((dev, Some(root))) = bind_source(device) else {
        return Vec::new();
    };
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    parse_mountinfo(&info)
        .into_iter()
        .filter(|m| m.dev == dev && m.root == root)
        .collect()
}

/// `BLKROSET`: `_IO(0x12, 93)`.
const BLKROSET: libc::c_ulong = 0x125D;

/// Make the block device `device` read-only (or writable again) in the kernel, for every
/// opener: a read-only bind mount does not stop writes to a device file.
///
/// # Errors
/// The device cannot be opened or the ioctl failed.
pub fn set_read_only(device: &Path, read_only: bool) -> Result<(), MountError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(device).map_err(|e| MountError::Io {
        context: format!("cannot open {}", device.display()),
        source: e,
    })?;
    let flag: libc::c_int = i32::from(read_only);
    // SAFETY: BLKROSET reads one int through the pointer, which is valid for the call.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKROSET, &raw const flag) } < 0 {
        return Err(MountError::Io {
            context: format!("cannot set {} read-only={read_only}", device.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Space and inode use of the filesystem mounted at `path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes in the filesystem.
    pub total_bytes: u64,
    /// Bytes available to unprivileged users.
    pub available_bytes: u64,
    /// Bytes used.
    pub used_bytes: u64,
    /// Inodes in the filesystem.
    pub total_inodes: u64,
    /// Inodes free.
    pub free_inodes: u64,
    /// Inodes used.
    pub used_inodes: u64,
}

/// statvfs(2) of `path`.
///
/// # Errors
/// The path cannot be queried.
pub fn usage(path: &Path) -> Result<Usage, MountError> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        MountError::BadMountPoint {
            path: path.to_owned(),
            reason: "contains a NUL byte".to_owned(),
        }
    })?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer; the result is
    // checked.
    if unsafe { libc::statvfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(MountError::Io {
            context: format!("cannot statvfs {}", path.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    let frsize = st.f_frsize;
    Ok(Usage {
        total_bytes: st.f_blocks * frsize,
        available_bytes: st.f_bavail * frsize,
        used_bytes: st.f_blocks.saturating_sub(st.f_bfree) * frsize,
        total_inodes: st.f_files,
        free_inodes: st.f_ffree,
        used_inodes: st.f_files.saturating_sub(st.f_ffree),
    })
}

/// Grow the filesystem mounted at `path` (on `device`) to fill the device, online:
/// `resize2fs` for ext4, `xfs_growfs` for XFS. Returns the filesystem type.
///
/// # Errors
/// Nothing of ours is mounted there, the type cannot grow, or the tool failed.
pub fn grow_filesystem(device: &Path, path: &Path) -> Result<String, MountError> {
    let dev = device_number(device)?;
    let Some(m) = mount_at(path).filter(|m| m.dev == dev) else {
        return Err(MountError::BadMountPoint {
            path: path.to_owned(),
            reason: format!("{} is not mounted here", device.display()),
        });
    };
    match m.fs_type.as_str() {
        "ext4" => run(Command::new("resize2fs").arg(device), "resize2fs").map_err(|e| match e {
            MountError::Tool { tool, detail } if detail.contains("Permission denied") => {
                MountError::Tool {
                    tool,
                    detail: format!(
                        "{detail} (growing ext4 online needs CAP_SYS_RESOURCE: run the node \
                         plugin with it, e.g. privileged)"
                    ),
                }
            }
            other => other,
        })?,
        "xfs" => run(Command::new("xfs_growfs").arg(&m.mount_point), "xfs_growfs")?,
        other => return Err(MountError::UnsupportedFs(other.to_owned())),
    }
    tracing::info!(device = %device.display(), path = %m.mount_point.display(), fs = %m.fs_type, "grew the filesystem");
    Ok(m.fs_type)
}

fn check_fs(fs: &str) -> Result<(), MountError> {
    if SUPPORTED_FS.contains(&fs) {
        Ok(())
    } else {
        Err(MountError::UnsupportedFs(fs.to_owned()))
    }
}

fn tool_error(tool: &str, detail: &str) -> MountError {
    MountError::Tool {
        tool: tool.to_owned(),
        detail: detail.to_owned(),
    }
}

fn run(cmd: &mut Command, tool: &str) -> Result<(), MountError> {
    let out = cmd
        .output()
        .map_err(|e| tool_error(tool, &format!("cannot run it: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(tool_error(
            tool,
            &format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escapes() {
        let text = "36 35 7:3 / /mnt/a\\040b rw,relatime shared:1 - ext4 /dev/loop3 rw\n\
                    37 35 0:5 / /proc ro,nosuid - proc proc rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].dev, (7, 3));
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!(m[0].fs_type, "ext4");
        assert_eq!(m[0].source, "/dev/loop3");
        assert!(!m[0].read_only);
        assert!(m[1].read_only);
    }

    #[test]
    fn rejects_missing_and_non_directory_mount_points() {
        assert!(matches!(
            check_mount_point(Path::new("/nonexistent/ballast/x")),
            Err(MountError::BadMountPoint { .. })
        ));
        assert!(matches!(
            check_mount_point(Path::new("/proc/self/mountinfo")),
            Err(MountError::BadMountPoint { .. })
        ));
        assert!(matches!(
            check_mount_point(Path::new("relative")),
            Err(MountError::BadMountPoint { .. })
        ));
        assert!(check_mount_point(Path::new("/")).is_ok());
    }

    #[test]
    fn unsupported_fs_is_refused_before_touching_the_device() {
        assert!(matches!(
            format_if_empty(Path::new("/nonexistent"), "btrfs", &[]),
            Err(MountError::UnsupportedFs(_))
        ));
    }
}
