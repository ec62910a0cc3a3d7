//! The local child and `Register`: once a registration of a newer epoch has returned, no write
//! carrying the older epoch lands on this node's replica, whether it came from a peer (the
//! replica server) or from the local data path ([`Child::Local`]). Both are admitted by the
//! same guard in the fence table.

use std::sync::Arc;

use replication::device::{Child, LocalChild, LOCAL_IO_TIMEOUT};
use replication::fence::FenceTable;
use volume::device::{BlockDevice, DeviceErrorKind, WriteFlags};
use volume::io::IoBuf;

mod common;

use common::MIB;
/// Writers racing each registration.
const WRITERS: u8 = 8;
/// Registrations (each of a newer epoch), each against a fresh set of writers.
const ROUNDS: u64 = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_older_epoch_write_lands_after_register_returns() {
    let (dir, storage, replica) = common::one_volume("n0", 2).await;
    let fence = Arc::new(FenceTable::open(dir.path().join("fence.json")).unwrap());

    for epoch in 1..=ROUNDS {
        fence.register("v", epoch).await.unwrap();
        let child = Child::Local(LocalChild {
            replica: replica.clone(),
            fence: Arc::clone(&fence),
            epoch,
        });
        // Writers overwrite the same MiB with their own pattern until they are fenced out.
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let child = child.clone();
            writers.push(tokio::spawn(async move {
                let mut landed = 0u32;
                loop {
                    let pattern = (epoch as u8).wrapping_mul(WRITERS).wrapping_add(w + 1);
                    let buf = IoBuf::from_slice(&vec![pattern; MIB as usize]);
                    match child.write(0, buf, WriteFlags::default()).await {
                        Ok(_) => landed += 1,
                        Err(e) => {
                            assert_eq!(e.error.kind, DeviceErrorKind::Fenced, "{e:?}");
                            return landed;
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        fence.register("v", epoch + 100).await.unwrap();
        // The replica as the registration left it...
        let after_register = replica.read(0, IoBuf::zeroed(MIB as usize)).await.unwrap();
        let mut landed = 0;
        for w in writers {
            landed += w.await.unwrap();
        }
        assert!(
            landed > 0,
            "round {epoch}: no write landed before the registration"
        );
        // ...is the replica once every older-epoch writer has given up.
        let settled = replica.read(0, IoBuf::zeroed(MIB as usize)).await.unwrap();
        assert!(
            after_register[..] == settled[..],
            "round {epoch}: a write of the fenced epoch landed after the registration returned"
        );
        // Registering an older epoch than the one in force is refused.
        assert!(fence.register("v", epoch).await.is_err());
        fence.forget("v").unwrap();
    }
    storage.close().await.unwrap();
}

/// A filesystem image loop-mounted on a directory, frozen with `fsfreeze` to make every write
/// to it hang as on a dead disk. Dropping it thaws and unmounts, even when the test fails.
struct Freezable {
    dir: tempfile::TempDir,
    frozen: bool,
}

impl Freezable {
    fn new() -> Self {
        let dir = common::test_dir("ballast-hang-test-");
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(160 * MIB)
            .unwrap();
        std::fs::create_dir(dir.path().join("mnt")).unwrap();
        run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
        let f = Self { dir, frozen: false };
        run(
            "mount",
            &[
                "-o",
                "loop",
                image.to_str().unwrap(),
                f.mnt().to_str().unwrap(),
            ],
        );
        f
    }

    fn mnt(&self) -> std::path::PathBuf {
        self.dir.path().join("mnt")
    }

    fn freeze(&mut self) {
        run("fsfreeze", &["-f", self.mnt().to_str().unwrap()]);
        self.frozen = true;
    }

    fn thaw(&mut self) {
        if std::mem::take(&mut self.frozen) {
            run("fsfreeze", &["-u", self.mnt().to_str().unwrap()]);
        }
    }
}

impl Drop for Freezable {
    fn drop(&mut self) {
        if self.frozen {
            let _ = std::process::Command::new("fsfreeze")
                .args(["-u", self.mnt().to_str().unwrap()])
                .status();
        }
        let _ = std::process::Command::new("umount")
            .arg(self.mnt())
            .status();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A hung local disk fails the local child's request after its timeout instead of stalling
/// the nexus; the hung request keeps its admission, so a registration waits until the disk
/// answers and nothing written under the old epoch lands after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_local_disk_times_out_and_keeps_registrations_ordered() {
    let mut disk = Freezable::new();
    let (storage, replica) = common::volume_in(&disk.mnt(), "n0", 2).await;
    let fence = Arc::new(FenceTable::open(disk.dir.path().join("fence.json")).unwrap());
    fence.register("v", 1).await.unwrap();
    let child = Child::Local(LocalChild {
        replica: replica.clone(),
        fence: Arc::clone(&fence),
        epoch: 1,
    });
    child
        .write(0, IoBuf::from_slice(&[1u8; 4096]), WriteFlags::default())
        .await
        .unwrap();
    child.flush().await.unwrap();

    disk.freeze();
    let started = std::time::Instant::now();
    let e = child
        .write(0, IoBuf::from_slice(&[2u8; 4096]), WriteFlags::default())
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert_eq!(e.error.kind, DeviceErrorKind::Io, "{}", e.error);
    assert!(e.error.message.contains("did not answer"), "{}", e.error);
    assert!(
        waited >= LOCAL_IO_TIMEOUT && waited < LOCAL_IO_TIMEOUT * 2,
        "failed after {waited:?}"
    );
    // The hung write still holds its admission: a new epoch cannot be registered yet.
    let register = tokio::spawn({
        let fence = Arc::clone(&fence);
        async move { fence.register("v", 2).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !register.is_finished(),
        "registered over a write still in flight"
    );
    disk.thaw();
    register.await.unwrap().unwrap();
    // The write landed before the registration returned, and nothing after it.
    let got = replica.read(0, IoBuf::zeroed(4096)).await.unwrap();
    assert!(
        got.iter().all(|&b| b == 2),
        "the hung write was lost or torn"
    );
    storage.close().await.unwrap();
}
