//! Fault scenarios on a real three-node cluster over a real etcd, each with the verifying
//! workload ([`integration_tests::workload`]) writing through the attached device while the
//! fault happens, and a check of every acknowledged write at the end:
//!
//! - a network partition of a replica node (its replica port cut with `iptables`): no I/O
//!   error, the replica is ejected, after healing it is rebuilt to healthy, and the volume
//!   verifies — also from the surviving replica on another node;
//! - etcd outages: shorter than the lease TTL (I/O goes on without an error, the cluster is
//!   usable afterwards) and longer (the attached node fences itself: writes fail, nothing
//!   acknowledged is lost, and a re-attach after etcd is back serves the data);
//! - a corrupted block in the local replica's pool file: the read is answered from another
//!   replica, the bad copy is rewritten, and the checksum error is counted in `/metrics`.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Duration, Instant};

use integration_tests::cluster::{
    attach, create_volume, find_blocks, metric_sum, node_dirs, nodes, pattern, pread_direct,
    pwrite_direct, read_direct, replica_addr, replica_states, start, start_in_netns, three_nodes,
    try_read_direct, wait_for, write_direct, Cleanup, NetNs, Partition, MIB,
};
use integration_tests::etcd::Etcd;
use integration_tests::workload::{Config, Workload};
use integration_tests::Daemon;

/// Acknowledged writes to wait for between the steps of a scenario.
const STEP: u64 = 100;
/// How long one step may take (2 cores shared with other work: be generous).
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

fn state_of(states: &[(String, String)], node: &str) -> String {
    states
        .iter()
        .find(|(n, _)| n == node)
        .map_or_else(|| format!("<{node} absent>"), |(_, s)| s.clone())
}

fn volume_state(d: &Daemon, volume: &str) -> String {
    let out = d.cli(["volume", "inspect", volume, "-o", "json"]);
    out.success();
    out.json()["state"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn a_partitioned_replica_is_ejected_without_an_io_error_and_the_volume_verifies() {
    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["pvol"]);
    let [a, b, c] = three_nodes(&dirs, &etcd);
    create_volume(&a, "pvol");
    let dev = attach(&a, "pvol");
    let w = Workload::start(&dev, Config::default()).unwrap();
    w.wait_more_acked(STEP, STEP_TIMEOUT).unwrap();

    // Cut node-b's replica server off: A's writes to it time out (2 s) and B is ejected.
    let port = replica_addr(&a, "node-b").port();
    let mut cut = Partition::cut_port(port);
    let cut_at = Instant::now();
    wait_for("node-b to be ejected", Duration::from_secs(30), || {
        state_of(&replica_states(&a, "pvol"), "node-b") == "ejected"
    });
    eprintln!("node-b ejected {:?} after the cut", cut_at.elapsed());
    // Writes go on while B is cut off.
    w.wait_more_acked(STEP, STEP_TIMEOUT).unwrap();
    let states = replica_states(&a, "pvol");
    assert_eq!(state_of(&states, "node-a"), "healthy", "{states:?}");
    assert_eq!(state_of(&states, "node-c"), "healthy", "{states:?}");
    assert_eq!(volume_state(&a, "pvol"), "degraded");
    // Every node sees the ejection (it is recorded in etcd), B included.
    assert_eq!(
        state_of(&replica_states(&c, "pvol"), "node-b"),
        "ejected",
        "node-c's view"
    );

    cut.heal();
    w.wait_more_acked(STEP, STEP_TIMEOUT).unwrap();
    // Healed, node-b's replica is rebuilt while the workload goes on.
    wait_for("node-b to be rebuilt", Duration::from_secs(60), || {
        state_of(&replica_states(&a, "pvol"), "node-b") == "healthy"
    });
    assert_eq!(volume_state(&a, "pvol"), "online");
    w.wait_more_acked(STEP, STEP_TIMEOUT).unwrap();
    let report = w.stop();
    eprintln!(
        "workload: {} acked of {} in {:?}, longest write+sync {:?}",
        report.acked, report.attempted, report.ran, report.max_latency
    );
    assert_eq!(
        report.errors, 0,
        "no I/O error while a replica is cut off; first: {:?}",
        report.first_error
    );
    let verified = report.verify(&dev).unwrap();
    eprintln!("verified on node-a: {verified:?}");
    assert!(verified.acked > 0);

    // node-c's replica alone must hold every acknowledged write: move the volume there
    // (reads prefer the local replica) and verify again.
    a.cli(["volume", "detach", "pvol"]).success();
    let dev_c = attach(&c, "pvol");
    let verified = report.verify(&dev_c).unwrap();
    eprintln!("verified on node-c: {verified:?}");
    c.cli(["volume", "detach", "pvol"]).success();
    drop(b);
}

/// Stop etcd for `down` (plus the ~0.2 s a restart takes) while the workload runs on node-a,
/// and check that nothing noticed: no I/O error, no fencing, no ejection, and the cluster is
/// usable afterwards.
fn etcd_outage_without_fencing(down: Duration, volume: &str) {
    let mut etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &[volume]);
    let [a, _b, c] = three_nodes(&dirs, &etcd);
    create_volume(&a, volume);
    let dev = attach(&a, volume);
    let w = Workload::start(&dev, Config::default()).unwrap();
    w.wait_more_acked(STEP, STEP_TIMEOUT).unwrap();

    etcd.stop().unwrap();
    let stopped = Instant::now();
    let before = w.acked();
    std::thread::sleep(down);
    let during = w.acked() - before;
    etcd.restart().unwrap();
    let outage = stopped.elapsed();
    eprintln!("etcd was down {outage:?}; {during} writes acknowledged meanwhile");
    assert!(
        outage < down + Duration::from_millis(700),
        "the test's premise failed: etcd took {:?} to come back (the machine is too \
         loaded?)",
        outage.saturating_sub(down)
    );
    assert!(
        during > 0,
        "writes with every replica healthy need no store access, so they go on"
    );

    w.wait_more_acked(STEP, STEP_TIMEOUT).unwrap();
    let report = w.stop();
    assert_eq!(
        report.errors,
        0,
        "an etcd outage of {outage:?} (lease TTL 3 s) must not fail I/O; first: {:?}\nnode-a log:\n{}",
        report.first_error,
        a.log()
    );
    let log = a.log();
    assert!(
        !log.contains("fencing this node's attachments"),
        "node-a must not fence itself in an outage of {outage:?}:\n{log}"
    );
    // The cluster is usable again.
    wait_for("three nodes listed", Duration::from_secs(20), || {
        nodes(&c).len() == 3
    });
    let states = replica_states(&c, volume);
    assert!(
        states.iter().all(|(_, s)| s == "healthy"),
        "no replica is ejected by a store outage: {states:?}"
    );
    report.verify(&dev).unwrap();
    a.cli(["volume", "detach", volume]).success();
}

/// Renewals run every TTL/3 = 1 s and a failed one is retried only a full interval later, so
/// an outage is surely survived only while it is shorter than one interval: ~0.7 s here.
/// Node-b runs in its own network namespace, reaching etcd and its peers over a veth pair,
/// and the whole namespace is cut off (replica traffic and etcd alike): node-b is ejected, its
/// lease expires so it leaves the node list, and after healing it registers again.
#[test]
fn a_replica_node_cut_off_from_everything_is_ejected_and_comes_back_after_healing() {
    let ns = NetNs::create();
    let etcd = Etcd::start_also_on(Some(ns.host_ip())).unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["nvol"]);
    let a = start(&dirs[0], "node-a", "zone-a", &etcd);
    let b = start_in_netns(&dirs[1], "node-b", "zone-b", &etcd, &ns);
    let c = start(&dirs[2], "node-c", "zone-c", &etcd);
    wait_for("three nodes registered", Duration::from_secs(10), || {
        nodes(&a).len() == 3
    });
    assert_eq!(replica_addr(&a, "node-b").ip(), ns.ns_ip());
    create_volume(&a, "nvol");
    let dev = attach(&a, "nvol");
    let w = Workload::start(&dev, Config::default()).unwrap();
    w.wait_more_acked(STEP, STEP_TIMEOUT).unwrap();

    let mut cut = Partition::cut_interface(ns.host_if());
    let cut_at = Instant::now();
    wait_for("node-b to be ejected", Duration::from_secs(30), || {
        state_of(&replica_states(&a, "nvol"), "node-b") == "ejected"
    });
    eprintln!("node-b ejected {:?} after the cut", cut_at.elapsed());
    w.wait_more_acked(STEP, STEP_TIMEOUT).unwrap();
    // node-b cannot renew its lease: it drops out of the node list.
    wait_for("node-b's lease to expire", Duration::from_secs(30), || {
        !nodes(&c).contains(&"node-b".to_owned())
    });
    eprintln!(
        "node-b left the node list {:?} after the cut",
        cut_at.elapsed()
    );
    w.wait_more_acked(STEP, STEP_TIMEOUT).unwrap();
    let states = replica_states(&a, "nvol");
    assert_eq!(state_of(&states, "node-a"), "healthy", "{states:?}");
    assert_eq!(state_of(&states, "node-c"), "healthy", "{states:?}");

    cut.heal();
    wait_for("node-b to register again", Duration::from_secs(30), || {
        nodes(&c).len() == 3
    });
    eprintln!("node-b is back {:?} after the cut", cut_at.elapsed());
    w.wait_more_acked(STEP, STEP_TIMEOUT).unwrap();
    // Back in the cluster, node-b's replica is rebuilt while the workload goes on.
    wait_for("node-b to be rebuilt", Duration::from_secs(60), || {
        state_of(&replica_states(&a, "nvol"), "node-b") == "healthy"
    });
    assert_eq!(volume_state(&a, "nvol"), "online");
    w.wait_more_acked(STEP, STEP_TIMEOUT).unwrap();
    let report = w.stop();
    eprintln!(
        "workload: {} acked of {} in {:?}, longest write+sync {:?}",
        report.acked, report.attempted, report.ran, report.max_latency
    );
    assert_eq!(report.errors, 0, "first: {:?}", report.first_error);
    report.verify(&dev).unwrap();
    a.cli(["volume", "detach", "nvol"]).success();
    let dev_c = attach(&c, "nvol");
    report.verify(&dev_c).unwrap();
    c.cli(["volume", "detach", "nvol"]).success();
    drop(b);
}

#[test]
fn an_etcd_outage_shorter_than_a_renewal_interval_does_not_interrupt_io() {
    etcd_outage_without_fencing(Duration::from_millis(500), "evol");
}

/// The lease counts as held until TTL (3 s) after the last renewal sent, so an outage of
/// ~2 s is survived too (the last good renewal was at most 1 s before the outage, and failed
/// renewals are retried every TTL / 30 until the deadline).
#[test]
fn an_etcd_outage_shorter_than_the_lease_does_not_interrupt_io() {
    etcd_outage_without_fencing(Duration::from_millis(1800), "evol2");
}

#[test]
fn an_etcd_outage_longer_than_the_lease_fences_writes_but_loses_no_acknowledged_write() {
    let mut etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["fvol"]);
    let [a, _b, c] = three_nodes(&dirs, &etcd);
    create_volume(&a, "fvol");
    let dev = attach(&a, "fvol");
    let w = Workload::start(&dev, Config::default()).unwrap();
    w.wait_more_acked(STEP, STEP_TIMEOUT).unwrap();

    // Down for well over the 3 s TTL: node-a cannot prove it still holds its lease, so it
    // fences its attachment (another node could take the volume over once the lease expires).
    etcd.stop().unwrap();
    let down = Instant::now();
    wait_for(
        "the workload to see an error",
        Duration::from_secs(15),
        || w.errors() > 0,
    );
    let fenced_after = down.elapsed();
    let acked_at_fence = w.acked();
    // Keep etcd down for 6 s in all (twice the TTL), at least 2 s past the first error.
    std::thread::sleep(
        Duration::from_secs(6)
            .saturating_sub(down.elapsed())
            .max(Duration::from_secs(2)),
    );
    assert_eq!(
        w.acked(),
        acked_at_fence,
        "no write may be acknowledged once the node fenced itself"
    );
    etcd.restart().unwrap();
    eprintln!(
        "writes failed {fenced_after:?} into the outage; etcd back after {:?}",
        down.elapsed()
    );
    assert!(
        fenced_after >= Duration::from_secs(1),
        "I/O failed too early ({fenced_after:?}): writes need no store access while every replica is healthy"
    );
    let log = a.log();
    assert!(
        log.contains("fencing this node's attachments"),
        "node-a should report that it fenced itself:\n{log}"
    );

    // The nodes register again with new leases.
    wait_for("three nodes listed again", Duration::from_secs(30), || {
        nodes(&c).len() == 3
    });
    // The fenced attachment stays fenced, also with etcd back: it may never write again.
    std::thread::sleep(Duration::from_secs(1));
    let errors = w.errors();
    let report = w.stop();
    assert!(report.errors >= errors);
    eprintln!(
        "workload: {} acked of {} attempted, {} errors {:?}, first: {:?}",
        report.acked, report.attempted, report.errors, report.errnos, report.first_error
    );
    assert!(
        report
            .errnos
            .iter()
            .all(|&e| e == libc::EIO || e == libc::EROFS),
        "a fenced write fails with EIO or EROFS, not {:?}",
        report.errnos
    );
    assert!(
        try_read_direct(&dev, 0, 4096).is_err(),
        "the fenced attachment serves no reads either"
    );

    // Detach and attach again: the data is all there and the volume takes writes.
    a.cli(["volume", "detach", "fvol"]).success();
    let dev = attach(&a, "fvol");
    let verified = report.verify(&dev).unwrap();
    eprintln!("verified after re-attaching: {verified:?}");
    let states = replica_states(&a, "fvol");
    assert!(
        states.iter().all(|(_, s)| s == "healthy"),
        "fencing ejects no replica: {states:?}"
    );
    let w = Workload::start(&dev, Config::default()).unwrap();
    w.wait_more_acked(STEP, STEP_TIMEOUT).unwrap();
    let again = w.stop();
    assert_eq!(again.errors, 0, "{:?}", again.first_error);
    a.cli(["volume", "detach", "fvol"]).success();
    drop(c);
}

#[test]
fn a_corrupt_block_in_the_local_replica_is_read_from_another_and_repaired() {
    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["xvol"]);
    let [a, _b, _c] = three_nodes(&dirs, &etcd);
    create_volume(&a, "xvol");
    let dev = attach(&a, "xvol");
    // The workload keeps the first 32 MiB busy; the known data goes to 40 MiB.
    let w = Workload::start(&dev, Config::default()).unwrap();
    w.wait_more_acked(STEP, STEP_TIMEOUT).unwrap();

    let base = 40 * MIB;
    let marker = format!("BALLAST-CORRUPTION-{}-", std::process::id()).into_bytes();
    let mut known = Vec::new();
    for i in 0..4u8 {
        let mut b = pattern(i + 1, base + usize::from(i) * 4096, 4096);
        b[..marker.len()].copy_from_slice(&marker);
        b[marker.len()] = b'0' + i;
        known.extend_from_slice(&b);
    }
    write_direct(&dev, base, &known).unwrap();
    let target = &known[4096..8192]; // the second block: corrupt it
    let mut tag = marker.clone();
    tag.push(b'1');

    // Find it in node-a's pool file (the local replica, which serves reads first).
    let pool = dirs[0].pool();
    let hits = find_blocks(&pool, &tag);
    assert_eq!(
        hits.len(),
        1,
        "the block is in node-a's pool exactly once: {hits:?}"
    );
    let at = hits[0];
    assert_eq!(pread_direct(&pool, at, 4096), target);

    // Flip bytes in the middle of it (past the marker).
    let before_pool = metric_sum(&a, "ballast_pool_checksum_errors_total");
    let before_vol = metric_sum(&a, "ballast_volume_checksum_errors_total");
    let mut bad = target.to_vec();
    for x in &mut bad[1000..1100] {
        *x ^= 0xff;
    }
    pwrite_direct(&pool, at, &bad);
    assert_eq!(pread_direct(&pool, at, 4096), bad);

    // The read through the device is right: answered by another replica.
    assert_eq!(
        read_direct(&dev, base + 4096, 4096),
        target,
        "the first read"
    );
    let after_pool = metric_sum(&a, "ballast_pool_checksum_errors_total");
    let after_vol = metric_sum(&a, "ballast_volume_checksum_errors_total");
    eprintln!(
        "checksum errors: pool {before_pool} -> {after_pool}, volume {before_vol} -> {after_vol}"
    );
    assert!(
        after_pool > before_pool,
        "node-a's pool counts the checksum error ({before_pool} -> {after_pool})"
    );
    assert!(
        after_vol > before_vol,
        "the volume counts the checksum error ({before_vol} -> {after_vol})"
    );
    let repairs = metric_sum(&a, "ballast_nexus_repairs_total");
    assert!(
        (repairs - 1.0).abs() < f64::EPSILON,
        "the nexus counts the repair: {repairs}"
    );
    // The bad copy was rewritten: node-a's pool holds the right bytes again, the local read
    // succeeds without a new checksum error.
    assert_eq!(
        pread_direct(&pool, at, 4096),
        target,
        "the nexus rewrites the bad copy in node-a's pool"
    );
    assert_eq!(read_direct(&dev, base, 4 * 4096), known, "the second read");
    assert!(
        metric_sum(&a, "ballast_pool_checksum_errors_total") <= after_pool,
        "the repaired block reads without a checksum error"
    );
    let log = a.log();
    assert!(
        log.contains("repaired a block"),
        "node-a logs the repair:\n{log}"
    );
    let states = replica_states(&a, "xvol");
    assert!(
        states.iter().all(|(_, s)| s == "healthy"),
        "a checksum error ejects nobody: {states:?}"
    );

    w.wait_more_acked(STEP, STEP_TIMEOUT).unwrap();
    let report = w.stop();
    assert_eq!(report.errors, 0, "{:?}", report.first_error);
    report.verify(&dev).unwrap();
    a.cli(["volume", "detach", "xvol"]).success();
}

/// Found by the seeded fault runs (`integration_tests::chaos`, seed 6): a node whose
/// attachment was taken over with `--force` while it was stopped kept that fenced attachment,
/// and attaching the volume there again later returned the dead device (every read failed
/// with EIO). Attaching again must give a working device with the newest data, and a handle
/// still open on the old device must keep failing: never reach the new attachment.
#[test]
fn a_node_taken_over_attaches_again_afresh_and_its_old_handles_stay_fenced() {
    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["tvol"]);
    let [a, b, c] = three_nodes(&dirs, &etcd);
    create_volume(&a, "tvol");
    let dev_a = attach(&a, "tvol");
    write_direct(&dev_a, 0, &pattern(1, 0, MIB)).unwrap();
    // An application's handle on node-a's device, kept open throughout.
    let old = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev_a)
        .unwrap();

    // Take the volume over while node-a is stopped, write there, and give it up.
    a.signal(nix::sys::signal::Signal::SIGSTOP).unwrap();
    let taken = b.cli(["volume", "attach", "tvol", "--force", "-o", "json"]);
    a.signal(nix::sys::signal::Signal::SIGCONT).unwrap();
    taken.success();
    let dev_b = taken.json()["device"].as_str().unwrap().to_owned();
    write_direct(&dev_b, 0, &pattern(2, 0, MIB)).unwrap();
    b.cli(["volume", "detach", "tvol"]).success();

    // node-a never did I/O since: attaching there again must still see it was superseded.
    let dev_a2 = attach(&a, "tvol");
    assert_eq!(
        try_read_direct(&dev_a2, 0, MIB).expect("the new attachment on node-a must serve"),
        pattern(2, 0, MIB),
        "node-a must read what node-b wrote"
    );
    // The old handle is fenced: its write fails (now or at the sync) and lands nowhere.
    let mut buf = volume::io::IoBuf::zeroed(4096);
    buf.copy_from_slice(&pattern(3, 0, 4096));
    let wrote = old.write_all_at(&buf, 0).and_then(|()| old.sync_data());
    assert!(wrote.is_err(), "a write through the old handle must fail");
    assert_eq!(read_direct(&dev_a2, 0, 4096), pattern(2, 0, 4096));
    drop(old);
    a.cli(["volume", "detach", "tvol"]).success();
    drop(c);
}

/// Found while building the seeded fault runs: a node whose volume was taken over while it was
/// stopped served reads from its own (now stale) replica when it was continued, until its next
/// write found the newer epoch. An attachment now serves only while confirmed against the
/// store, and a takeover waits out the old one's confirmation: the continued node's read fails
/// or returns the newest data, never the old.
#[test]
fn a_stopped_node_taken_over_serves_no_stale_read_when_continued() {
    const LEN: usize = 64 << 10;
    let etcd = Etcd::start().unwrap();
    let dirs = node_dirs(3);
    let _cleanup = Cleanup::new(&dirs, &["zvol"]);
    let [a, b, c] = three_nodes(&dirs, &etcd);
    create_volume(&a, "zvol");
    let dev_a = attach(&a, "zvol");
    write_direct(&dev_a, 0, &pattern(1, 0, LEN)).unwrap();

    a.signal(nix::sys::signal::Signal::SIGSTOP).unwrap();
    let started = Instant::now();
    let taken = b.cli(["volume", "attach", "zvol", "--force", "-o", "json"]);
    let took = started.elapsed();
    let written = taken.code == Some(0) && {
        let dev_b = taken.json()["device"].as_str().unwrap().to_owned();
        write_direct(&dev_b, 0, &pattern(2, 0, LEN)).is_ok()
    };
    a.signal(nix::sys::signal::Signal::SIGCONT).unwrap();
    taken.success();
    assert!(written, "node-b must write after the takeover");
    eprintln!("the takeover took {took:?}");

    match try_read_direct(&dev_a, 0, LEN) {
        Err(e) => eprintln!("node-a's old device fails as it should: {e}"),
        Ok(data) => assert!(
            data == pattern(2, 0, LEN),
            "node-a served {} after node-b's write was acknowledged",
            if data == pattern(1, 0, LEN) {
                "its own stale data"
            } else {
                "unknown data"
            }
        ),
    }
    b.cli(["volume", "detach", "zvol"]).success();
    drop(c);
}
