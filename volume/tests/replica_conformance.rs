//! The block-device conformance suite, run against both I/O engines on real files:
//! every operation, bad requests, discard and write-zeroes semantics, accounting, persistence,
//! checksum verification, and the pool's refusal to format foreign devices.

mod common;

use std::sync::Arc;

use api::{ErrorKind, VolumeControl, VolumeName, VolumeSpec};
use common::{open, pattern, tempdir, try_open, volume, ENGINES};
use volume::device::{BlockDevice, DeviceErrorKind, WriteFlags};
use volume::io::{EngineKind, IoBuf};
use volume::pool::PoolError;

const MIB: u64 = 1 << 20;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn read_vec(r: &impl BlockDevice, offset: u64, len: usize) -> Vec<u8> {
    r.read(offset, IoBuf::zeroed(len))
        .await
        .expect("read")
        .to_vec()
}

fn for_each_engine(
    f: impl Fn(EngineKind) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>,
) {
    for kind in ENGINES {
        eprintln!("engine {kind:?}");
        rt().block_on(f(kind));
    }
}

#[test]
fn round_trip_across_extents_and_unwritten_zeros() {
    for_each_engine(|kind| {
        Box::pin(async move {
            let dir = tempdir();
            let s = open(&dir.path().join("pool"), 128 * MIB, kind).await;
            let r = volume(&s, "v", 16 * MIB).await;
            assert_eq!(r.size(), 16 * MIB);
            // A write that straddles an extent boundary, and a 1 MiB aligned one.
            let mut data = Vec::new();
            for b in 250..262 {
                data.extend(pattern(b, 1));
            }
            r.write(250 * 4096, IoBuf::from_slice(&data), WriteFlags::default())
                .await
                .unwrap();
            let big: Vec<u8> = (0..256).flat_map(|b| pattern(512 + b, 2)).collect();
            r.write(
                2 * MIB,
                IoBuf::from_slice(&big),
                WriteFlags {
                    fua: true,
                    ..WriteFlags::default()
                },
            )
            .await
            .unwrap();
            assert_eq!(read_vec(&r, 250 * 4096, data.len()).await, data);
            assert_eq!(read_vec(&r, 2 * MIB, big.len()).await, big);
            // Unwritten blocks, inside and outside allocated extents, read as zeros.
            assert!(read_vec(&r, 0, 4096).await.iter().all(|&b| b == 0));
            assert!(read_vec(&r, 10 * MIB, 8192).await.iter().all(|&b| b == 0));
            // A read spanning written and unwritten blocks: garbage in the buffer is replaced.
            let mut buf = IoBuf::zeroed(3 * 4096);
            buf.fill(0xAA);
            let got = r.read(248 * 4096, buf).await.unwrap();
            assert!(got[..8192].iter().all(|&b| b == 0));
            assert_eq!(&got[8192..], &data[..4096]);
            // Overwrite and read back.
            r.write(
                251 * 4096,
                IoBuf::from_slice(&pattern(251, 9)),
                WriteFlags::default(),
            )
            .await
            .unwrap();
            assert_eq!(read_vec(&r, 251 * 4096, 4096).await, pattern(251, 9));
            assert_eq!(r.allocated_bytes(), 3 * MIB);
            r.flush().await.unwrap();
        })
    });
}

#[test]
fn bad_requests_are_refused_with_the_buffer_returned() {
    for_each_engine(|kind| {
        Box::pin(async move {
            let dir = tempdir();
            let s = open(&dir.path().join("pool"), 64 * MIB, kind).await;
            let r = volume(&s, "v", 4 * MIB).await;
            let cases: [(u64, usize, DeviceErrorKind); 5] = [
                (1, 4096, DeviceErrorKind::Unaligned),
                (0, 100, DeviceErrorKind::Unaligned),
                (0, 0, DeviceErrorKind::Unaligned),
                (4 * MIB, 4096, DeviceErrorKind::OutOfRange),
                (4 * MIB - 4096, 8192, DeviceErrorKind::OutOfRange),
            ];
            for (off, len, kind) in cases {
                let e = r.read(off, IoBuf::zeroed(len)).await.unwrap_err();
                assert_eq!(e.error.kind, kind, "read {off} {len}");
                assert_eq!(e.buf.len(), len);
                let e = r
                    .write(off, IoBuf::zeroed(len), WriteFlags::default())
                    .await
                    .unwrap_err();
                assert_eq!(e.error.kind, kind, "write {off} {len}");
                assert!(!e.error.to_string().is_empty());
                assert_eq!(r.discard(off, len as u64).await.unwrap_err().kind, kind);
                assert_eq!(
                    r.write_zeroes(off, len as u64).await.unwrap_err().kind,
                    kind
                );
            }
            assert_eq!(r.allocated_bytes(), 0, "refused writes allocate nothing");
            let e = r
                .read(u64::MAX - 4095, IoBuf::zeroed(8192))
                .await
                .unwrap_err();
            assert_eq!(e.error.kind, DeviceErrorKind::OutOfRange);
        })
    });
}

#[test]
fn discard_and_write_zeroes_free_and_zero() {
    for_each_engine(|kind| {
        Box::pin(async move {
            let dir = tempdir();
            let s = open(&dir.path().join("pool"), 64 * MIB, kind).await;
            let r = volume(&s, "v", 8 * MIB).await;
            let data: Vec<u8> = (0..768).flat_map(|b| pattern(b, 3)).collect();
            r.write(0, IoBuf::from_slice(&data), WriteFlags::default())
                .await
                .unwrap();
            assert_eq!(r.allocated_bytes(), 3 * MIB);
            // Whole extent: freed.
            r.discard(MIB, MIB).await.unwrap();
            assert_eq!(r.allocated_bytes(), 2 * MIB);
            assert!(read_vec(&r, MIB, MIB as usize)
                .await
                .iter()
                .all(|&b| b == 0));
            // Partial: zeroed, still allocated; neighbours intact.
            r.write_zeroes(4096, 8192).await.unwrap();
            let got = read_vec(&r, 0, 4 * 4096).await;
            assert_eq!(&got[..4096], &data[..4096]);
            assert!(got[4096..3 * 4096].iter().all(|&b| b == 0));
            assert_eq!(&got[3 * 4096..], &data[3 * 4096..4 * 4096]);
            r.discard(2 * MIB + 4096, 4096).await.unwrap();
            assert!(read_vec(&r, 2 * MIB + 4096, 4096)
                .await
                .iter()
                .all(|&b| b == 0));
            assert_eq!(r.allocated_bytes(), 2 * MIB);
            // Rewriting a discarded extent works and reads back.
            r.write(
                MIB,
                IoBuf::from_slice(&pattern(256, 4)),
                WriteFlags::default(),
            )
            .await
            .unwrap();
            assert_eq!(read_vec(&r, MIB, 4096).await, pattern(256, 4));
            assert!(read_vec(&r, MIB + 4096, 4096).await.iter().all(|&b| b == 0));
            // Pool accounting is exact.
            let pools = s.list_pools().await.unwrap();
            assert_eq!(pools[0].allocated_bytes, 3 * MIB);
            assert_eq!(
                pools[0].free_bytes + pools[0].allocated_bytes,
                pools[0].capacity_bytes
            );
        })
    });
}

#[test]
fn control_operations_and_accounting() {
    rt().block_on(async {
        let dir = tempdir();
        let s = open(&dir.path().join("pool"), 64 * MIB, EngineKind::Auto).await;
        let cap = s.list_pools().await.unwrap()[0].capacity_bytes;
        assert!((56 * MIB..64 * MIB).contains(&cap), "{cap}");
        let name = VolumeName::new("db").unwrap();
        let spec = VolumeSpec {
            name: name.clone(),
            size_bytes: 10 * MIB + 1,
            replicas: 1,
        };
        let first = s.create_volume(spec.clone()).await.unwrap();
        assert_eq!(first.size_bytes, 11 * MIB, "rounded up to the extent size");
        let again = s.create_volume(spec.clone()).await.unwrap();
        assert_eq!(first.id, again.id, "identical create is idempotent");
        let e = s
            .create_volume(VolumeSpec {
                size_bytes: 20 * MIB,
                ..spec.clone()
            })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert!(e.message().contains("already exists"), "{}", e.message());
        let e = s
            .create_volume(VolumeSpec {
                replicas: 2,
                ..spec.clone()
            })
            .await
            .unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::Conflict,
            "an existing name with other replicas conflicts"
        );
        let other = VolumeName::new("other").unwrap();
        let e = s
            .create_volume(VolumeSpec {
                name: other.clone(),
                size_bytes: MIB,
                replicas: 3,
            })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(
            e.message()
                .contains("3 replicas need 3 pool devices; this node has 1"),
            "{}",
            e.message()
        );
        let e = s
            .create_volume(VolumeSpec {
                name: other.clone(),
                size_bytes: MIB,
                replicas: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let e = s
            .create_volume(VolumeSpec {
                name: other.clone(),
                size_bytes: 1 << 40,
                replicas: 1,
            })
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
        // Thin provisioning: volumes may overcommit the pool in total.
        for i in 0..8 {
            let n = VolumeName::new(&format!("thin-{i}")).unwrap();
            s.create_volume(VolumeSpec {
                name: n,
                size_bytes: 32 * MIB,
                replicas: 1,
            })
            .await
            .unwrap();
        }
        // Resize.
        let grown = s.resize_volume(&name, 16 * MIB).await.unwrap();
        assert_eq!(grown.size_bytes, 16 * MIB);
        let r = s.replica(&name).unwrap();
        r.write(
            15 * MIB,
            IoBuf::from_slice(&pattern(1, 1)),
            WriteFlags::default(),
        )
        .await
        .unwrap();
        let e = s.resize_volume(&name, 4 * MIB).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(s.get_volume(&name).await.unwrap().allocated_bytes, MIB);
        // Delete frees the space; unknown names are NotFound.
        s.delete_volume(&name).await.unwrap();
        assert_eq!(
            s.delete_volume(&name).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            s.get_volume(&name).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            s.resize_volume(&name, MIB).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        let e = r.read(0, IoBuf::zeroed(4096)).await.unwrap_err();
        assert_eq!(e.error.kind, DeviceErrorKind::Closed);
        assert_eq!(s.list_pools().await.unwrap()[0].allocated_bytes, 0);
        assert_eq!(s.list_volumes().await.unwrap().len(), 8);
    });
}

#[test]
fn writes_fill_the_pool_then_fail_cleanly_and_space_returns() {
    rt().block_on(async {
        let dir = tempdir();
        let s = open(&dir.path().join("pool"), 64 * MIB, EngineKind::Auto).await;
        let cap = s.list_pools().await.unwrap()[0].capacity_bytes;
        let a = volume(&s, "a", cap).await;
        let b = volume(&s, "b", cap).await;
        let chunk = IoBuf::zeroed(MIB as usize);
        let mut chunk = Some(chunk);
        for i in 0..cap / MIB {
            chunk = Some(
                a.write(i * MIB, chunk.take().unwrap(), WriteFlags::default())
                    .await
                    .unwrap(),
            );
        }
        let e = b
            .write(0, IoBuf::zeroed(4096), WriteFlags::default())
            .await
            .unwrap_err();
        assert_eq!(e.error.kind, DeviceErrorKind::NoSpace);
        // Discarding without any flush still makes the space reusable.
        a.discard(0, 4 * MIB).await.unwrap();
        b.write(0, IoBuf::from_slice(&pattern(0, 5)), WriteFlags::default())
            .await
            .unwrap();
        assert_eq!(read_vec(&b, 0, 4096).await, pattern(0, 5));
    });
}

#[test]
fn data_and_metadata_survive_reopen() {
    for_each_engine(|kind| {
        Box::pin(async move {
            let dir = tempdir();
            let path = dir.path().join("pool");
            let id;
            {
                let s = open(&path, 64 * MIB, kind).await;
                let r = volume(&s, "keep", 8 * MIB).await;
                id = s
                    .get_volume(&VolumeName::new("keep").unwrap())
                    .await
                    .unwrap()
                    .id;
                for b in 0..64u64 {
                    r.write(
                        b * 4096 * 7,
                        IoBuf::from_slice(&pattern(b, 6)),
                        WriteFlags::default(),
                    )
                    .await
                    .unwrap();
                }
                r.discard(4096 * 7, 4096).await.unwrap();
                r.flush().await.unwrap();
                s.close().await.unwrap();
            }
            let s = open(&path, 64 * MIB, kind).await;
            let name = VolumeName::new("keep").unwrap();
            let st = s.get_volume(&name).await.unwrap();
            assert_eq!(st.id, id);
            assert_eq!(st.size_bytes, 8 * MIB);
            let r = s.replica(&name).unwrap();
            for b in 0..64u64 {
                let want = if b == 1 { vec![0; 4096] } else { pattern(b, 6) };
                assert_eq!(read_vec(&r, b * 4096 * 7, 4096).await, want, "block {b}");
            }
        })
    });
}

#[test]
fn corrupted_block_fails_its_checksum_and_is_counted() {
    rt().block_on(async {
        let dir = tempdir();
        let path = dir.path().join("pool");
        {
            let s = open(&path, 64 * MIB, EngineKind::Auto).await;
            let r = volume(&s, "c", 4 * MIB).await;
            let data: Vec<u8> = (0..16).flat_map(|b| pattern(b, 7)).collect();
            r.write(0, IoBuf::from_slice(&data), WriteFlags::default())
                .await
                .unwrap();
            r.flush().await.unwrap();
            s.close().await.unwrap();
        }
        // The first extent allocated is physical extent 0; flip one byte of block 5.
        let layout = volume::pool::format::Layout::for_device(64 * MIB).unwrap();
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            let at = layout.data_offset + 5 * 4096 + 100;
            let mut byte = [0u8];
            f.read_exact_at(&mut byte, at).unwrap();
            byte[0] ^= 0x01;
            f.write_all_at(&byte, at).unwrap();
            f.sync_all().unwrap();
        }
        let s = open(&path, 64 * MIB, EngineKind::Auto).await;
        let name = VolumeName::new("c").unwrap();
        let r = s.replica(&name).unwrap();
        let e = r.read(5 * 4096, IoBuf::zeroed(4096)).await.unwrap_err();
        assert_eq!(e.error.kind, DeviceErrorKind::Checksum);
        assert!(e.error.to_string().contains("checksum"), "{}", e.error);
        // A larger read covering the block fails too, never returning wrong data.
        assert_eq!(
            r.read(0, IoBuf::zeroed(16 * 4096))
                .await
                .unwrap_err()
                .error
                .kind,
            DeviceErrorKind::Checksum
        );
        assert_eq!(r.checksum_errors(), 2);
        assert_eq!(s.list_pools().await.unwrap()[0].checksum_errors, 2);
        let stats = s.io_stats();
        assert_eq!(stats[0].checksum_errors, 2);
        assert_eq!(stats[0].read.errors, 2);
        // Every other block reads fine.
        for b in (0..16).filter(|&b| b != 5) {
            assert_eq!(
                read_vec(&r, b * 4096, 4096).await,
                pattern(b, 7),
                "block {b}"
            );
        }
        // Rewriting the block heals it.
        r.write(
            5 * 4096,
            IoBuf::from_slice(&pattern(5, 8)),
            WriteFlags::default(),
        )
        .await
        .unwrap();
        assert_eq!(read_vec(&r, 5 * 4096, 4096).await, pattern(5, 8));
    });
}

#[test]
fn concurrent_writers_and_readers_never_see_false_checksum_errors() {
    rt().block_on(async {
        let dir = tempdir();
        let s = open(&dir.path().join("pool"), 64 * MIB, EngineKind::Auto).await;
        let r = Arc::new(volume(&s, "hot", 2 * MIB).await);
        let mut tasks = Vec::new();
        for t in 0..16u64 {
            let r = r.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..200u64 {
                    let block = (t * 7 + i) % 32;
                    if t % 2 == 0 {
                        r.write(
                            block * 4096,
                            IoBuf::from_slice(&pattern(block, i)),
                            WriteFlags::default(),
                        )
                        .await
                        .unwrap();
                    } else {
                        let got = r
                            .read(block * 4096, IoBuf::zeroed(4096))
                            .await
                            .expect("no checksum error under races");
                        let zero = got.iter().all(|&b| b == 0);
                        assert!(
                            zero || got[..8] == block.to_le_bytes(),
                            "block {block} holds another block's data"
                        );
                    }
                    if i % 50 == 0 {
                        r.flush().await.unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // Overlapping writes raced, yet every block's data matches its published checksum.
        let all = r
            .read(0, IoBuf::zeroed(32 * 4096))
            .await
            .expect("no block is left mismatched");
        for block in 0..32u64 {
            let got = &all[(block * 4096) as usize..((block + 1) * 4096) as usize];
            assert!(got.iter().all(|&b| b == 0) || got[..8] == block.to_le_bytes());
        }
        assert_eq!(r.checksum_errors(), 0);
    });
}

#[test]
fn foreign_devices_are_never_formatted_without_force() {
    rt().block_on(async {
        let dir = tempdir();
        // An ext4-looking file.
        let path = dir.path().join("ext4");
        let mut head = vec![0u8; 64 * MIB as usize];
        head[1080] = 0x53;
        head[1081] = 0xEF;
        std::fs::write(&path, &head).unwrap();
        let e = try_open(&path, 64 * MIB, EngineKind::Auto, false)
            .await
            .unwrap_err();
        assert!(matches!(e, PoolError::Foreign { .. }), "{e}");
        assert!(
            e.to_string().contains("ext2/3/4") && e.to_string().contains("--force-format"),
            "{e}"
        );
        assert_eq!(std::fs::read(&path).unwrap()[1080], 0x53, "untouched");
        // Random data without a signature is refused too.
        let junk = dir.path().join("junk");
        let mut data = vec![0u8; 64 * MIB as usize];
        data[12_345] = 1;
        std::fs::write(&junk, &data).unwrap();
        assert!(try_open(&junk, 64 * MIB, EngineKind::Auto, false)
            .await
            .is_err());
        // Too small.
        let small = dir.path().join("small");
        let e = try_open(&small, MIB, EngineKind::Auto, false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("cannot hold a Ballast pool"), "{e}");
        let cause = std::error::Error::source(&e)
            .expect("the cause is attached")
            .to_string();
        assert!(cause.contains("at least"), "{cause}");
        // Missing without a size.
        let engine = volume::io::probe(EngineKind::Auto, 1).unwrap();
        let e = volume::pool::Storage::open(volume::pool::StorageConfig {
            devices: vec![volume::pool::DeviceSpec {
                path: dir.path().join("nope"),
                create_size: None,
            }],
            node_id: "n".into(),
            force_format: false,
            engine: engine.clone(),
        })
        .await
        .unwrap_err();
        assert!(matches!(e, PoolError::Missing { .. }), "{e}");
        // A device of another pool is refused when opened with this pool's devices.
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        drop(open(&a, 64 * MIB, EngineKind::Auto).await);
        drop(open(&b, 64 * MIB, EngineKind::Auto).await);
        let e = volume::pool::Storage::open(volume::pool::StorageConfig {
            devices: vec![
                volume::pool::DeviceSpec {
                    path: a.clone(),
                    create_size: None,
                },
                volume::pool::DeviceSpec {
                    path: b.clone(),
                    create_size: None,
                },
            ],
            node_id: "n".into(),
            force_format: false,
            engine: engine.clone(),
        })
        .await
        .unwrap_err();
        assert!(e.to_string().contains("another"), "{e}");
        // The same device twice is refused.
        let e = volume::pool::Storage::open(volume::pool::StorageConfig {
            devices: vec![
                volume::pool::DeviceSpec {
                    path: a.clone(),
                    create_size: None,
                },
                volume::pool::DeviceSpec {
                    path: a.clone(),
                    create_size: None,
                },
            ],
            node_id: "n".into(),
            force_format: false,
            engine,
        })
        .await
        .unwrap_err();
        assert!(matches!(e, PoolError::Duplicate { .. }), "{e}");
        // With force, the ext4 file is formatted.
        let s = try_open(&path, 64 * MIB, EngineKind::Auto, true)
            .await
            .unwrap();
        assert_eq!(s.list_pools().await.unwrap().len(), 1);
    });
}

#[test]
fn two_devices_form_one_pool_and_volumes_spread() {
    rt().block_on(async {
        let dir = tempdir();
        let engine = volume::io::probe(EngineKind::Auto, 2).unwrap();
        let cfg = volume::pool::StorageConfig {
            devices: vec![
                volume::pool::DeviceSpec {
                    path: dir.path().join("d1"),
                    create_size: Some(64 * MIB),
                },
                volume::pool::DeviceSpec {
                    path: dir.path().join("d2"),
                    create_size: Some(128 * MIB),
                },
            ],
            node_id: "n".into(),
            force_format: false,
            engine,
        };
        let s = volume::pool::Storage::open(cfg.clone()).await.unwrap();
        let pools = s.list_pools().await.unwrap();
        assert_eq!(pools.len(), 2);
        assert_eq!(pools[0].pool_uuid, pools[1].pool_uuid);
        assert_ne!(pools[0].id, pools[1].id);
        // The emptier (larger) device takes the first volume; a volume too big for d1 fits d2.
        let v = volume(&s, "big", 100 * MIB).await;
        v.write(0, IoBuf::from_slice(&pattern(0, 1)), WriteFlags::default())
            .await
            .unwrap();
        s.close().await.unwrap();
        drop(v);
        drop(s);
        let s = volume::pool::Storage::open(cfg).await.unwrap();
        let st = s
            .get_volume(&VolumeName::new("big").unwrap())
            .await
            .unwrap();
        assert_eq!(st.replica_status[0].pool_id, pools[1].id);
    });
}

#[test]
fn freed_extents_return_space_to_the_pool_file() {
    use std::os::unix::fs::MetadataExt;
    rt().block_on(async {
        let dir = tempdir();
        let path = dir.path().join("pool");
        let s = open(&path, 128 * MIB, EngineKind::Auto).await;
        let r = volume(&s, "v", 32 * MIB).await;
        let before = std::fs::metadata(&path).unwrap().blocks() * 512;
        let chunk: Vec<u8> = (0..256).flat_map(|b| pattern(b, 1)).collect();
        for e in 0..16 {
            r.write(e * MIB, IoBuf::from_slice(&chunk), WriteFlags::default())
                .await
                .unwrap();
        }
        r.flush().await.unwrap();
        let written = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(written >= before + 16 * MIB, "{before} -> {written}");
        r.discard(0, 16 * MIB).await.unwrap();
        // The free becomes durable at this commit; then the space goes back.
        r.flush().await.unwrap();
        let after = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            after + 15 * MIB <= written,
            "{written} -> {after}: space was not returned"
        );
        assert_eq!(r.allocated_bytes(), 0);
        // Reused space reads as zeros where unwritten and as data where written.
        r.write(
            3 * MIB,
            IoBuf::from_slice(&pattern(768, 2)),
            WriteFlags::default(),
        )
        .await
        .unwrap();
        assert_eq!(read_vec(&r, 3 * MIB, 4096).await, pattern(768, 2));
        assert!(read_vec(&r, 3 * MIB + 4096, 4096)
            .await
            .iter()
            .all(|&b| b == 0));
    });
}

#[test]
fn concurrent_flushes_each_make_their_writes_durable() {
    rt().block_on(async {
        let dir = tempdir();
        let path = dir.path().join("pool");
        {
            let s = open(&path, 64 * MIB, EngineKind::Auto).await;
            let r = Arc::new(volume(&s, "g", 8 * MIB).await);
            let mut tasks = Vec::new();
            for t in 0..16u64 {
                let r = r.clone();
                tasks.push(tokio::spawn(async move {
                    for i in 0..8u64 {
                        let block = t * 8 + i;
                        r.write(
                            block * 4096,
                            IoBuf::from_slice(&pattern(block, 9)),
                            WriteFlags::default(),
                        )
                        .await
                        .unwrap();
                        r.flush().await.unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            // Dropped without close: only what the flushes made durable counts.
        }
        let s = open(&path, 64 * MIB, EngineKind::Auto).await;
        let r = s.replica(&VolumeName::new("g").unwrap()).unwrap();
        for block in 0..128u64 {
            assert_eq!(
                read_vec(&r, block * 4096, 4096).await,
                pattern(block, 9),
                "block {block}"
            );
        }
    });
}
