//! The local child and `Register`: once a registration of a newer epoch has returned, no write
//! carrying the older epoch lands on this node's replica, whether it came from a peer (the
//! replica server) or from the local data path ([`Child::Local`]). Both are admitted by the
//! same guard in the fence table.

use std::sync::Arc;

use replication::device::Child;
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
        let child = Child::Local {
            replica: replica.clone(),
            fence: Arc::clone(&fence),
            epoch,
        };
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
