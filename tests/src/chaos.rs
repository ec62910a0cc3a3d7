//! Seeded fault runs of a real cluster (issue 13): three or four real daemons over a real etcd,
//! one three-replica volume attached on one of them, the verifying workload
//! ([`crate::workload`]) writing and reading through its device, and a sequence of faults drawn
//! from the seed:
//!
//! - a replica node SIGKILLed and started again, or SIGSTOPped and continued;
//! - a replica node's replica port cut both ways, or one way (requests, or only the replies:
//!   the writes land but are never acknowledged);
//! - etcd killed and restarted (shorter than the 3 s lease);
//! - a block of the attached node's replica corrupted on disk (while another replica is
//!   healthy), then read through the device;
//! - the volume moved to another node: cleanly (detach, attach), or by a forced takeover while
//!   the attached node is SIGSTOPped, which is continued afterwards (a zombie writer);
//! - the attached node SIGKILLed and started again (it takes the attach session over from
//!   the holder: the writer only pauses);
//! - one replica node's disk failing every write, or holding every request, for a while
//!   (debug builds of the daemon, `volume::io::faults`), the attached node's included;
//! - a power cut of one replica node, the attached one included: the daemon is SIGKILLed and
//!   each write its disk had not made durable is undone, kept, or torn at 4 KiB
//!   ([`crate::power`]) before it starts again.
//!
//! **The checker.** While the workload runs, every read is checked against the last write
//! acknowledged before it began (a stale read is counted). After every move, the whole volume
//! is audited on the new device against every acknowledged write. A zombie writer must get no
//! write acknowledged after its node was taken over, none of its later writes may land (they
//! would audit as writes never made), and reads through its old device must fail or return
//! nothing older than what the new node had acknowledged. At the end every fault is healed, every node
//! runs, the volume must be back to three healthy replicas, and it is audited from **each**
//! replica node in turn (reads prefer the local replica). I/O errors are allowed only in the
//! writer on a node that was killed or fenced; anywhere else they count as application errors.
//!
//! A trial is named by its seed: [`Plan::from_seed`] gives the same fault schedule every time,
//! and a failing seed is printed as a one-line command (the timing of real processes is not
//! replayed, only the schedule).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::Signal;

use crate::cluster::{
    cluster_args, find_blocks, node_dirs, pread_direct, pwrite_direct, try_read_direct, Cleanup,
    Partition,
};
use crate::etcd::Etcd;
use crate::workload::{Config, Ledger, Rng, Workload, MAGIC};
use crate::{Daemon, NodeDir};

/// The volume a trial writes: named after the process, so runs side by side (each with its
/// own etcd and daemons) do not share `/dev/ballast/NAME`.
fn volume_name() -> String {
    format!("chaos-{}", std::process::id())
}
/// Slots of the workload (4 KiB each: the first 8 MiB of the volume).
const SLOTS: u64 = 2048;
/// Acknowledged writes to wait for after each fault.
const PROGRESS: u64 = 40;
/// How long that may take (2 shared cores, debug daemons: generous).
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the volume may take to get three healthy replicas back at the end.
const HEAL_TIMEOUT: Duration = Duration::from_secs(180);

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// SIGKILL a replica node (not the attached one), start it again after the hold.
    KillReplica,
    /// SIGSTOP a replica node for the hold, then SIGCONT.
    PauseReplica,
    /// Cut a replica node's replica port both ways for the hold.
    CutReplica,
    /// Drop what is sent to a replica node's replica port for the hold.
    CutRequests,
    /// Drop only the replies from a replica node's replica port for the hold.
    CutReplies,
    /// Kill etcd for the hold, then restart it.
    EtcdOutage,
    /// Corrupt one written block in one replica's pool file.
    CorruptBlock,
    /// Detach, then attach on another replica node.
    MoveClean,
    /// SIGSTOP the attached node, take the volume over with `--force` on another node, go on
    /// writing there, then SIGCONT the old node (whose writer goes on trying).
    TakeoverForce,
    /// SIGKILL the attached node and start it again: it attaches the volume again.
    KillAttached,
    /// Make one replica node's disk fail every write (and flush) for the hold.
    DiskErrors,
    /// Make one replica node's disk hold every request for the hold.
    DiskHang,
    /// Cut the power of one replica node (the attached one included): SIGKILL it, undo each
    /// write its disk had not made durable (all of it, none, or some 4 KiB sectors), start it
    /// again after the hold.
    PowerCut,
}

impl FaultKind {
    /// The kinds drawn for the main schedule (the disk faults are drawn apart, so adding
    /// them kept every earlier seed's schedule).
    const MAIN: [Self; 10] = [
        Self::KillReplica,
        Self::PauseReplica,
        Self::CutReplica,
        Self::CutRequests,
        Self::CutReplies,
        Self::EtcdOutage,
        Self::CorruptBlock,
        Self::MoveClean,
        Self::TakeoverForce,
        Self::KillAttached,
    ];

    /// The disk faults.
    const DISK: [Self; 2] = [Self::DiskErrors, Self::DiskHang];

    /// Every kind, in table order.
    pub fn all() -> impl Iterator<Item = Self> {
        Self::MAIN
            .into_iter()
            .chain(Self::DISK)
            .chain([Self::PowerCut])
    }

    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::KillReplica => "kill replica node",
            Self::PauseReplica => "SIGSTOP replica node",
            Self::CutReplica => "partition (both ways)",
            Self::CutRequests => "partition (requests)",
            Self::CutReplies => "partition (replies)",
            Self::EtcdOutage => "etcd restart",
            Self::CorruptBlock => "corrupt block",
            Self::MoveClean => "move (detach, attach)",
            Self::TakeoverForce => "takeover --force (zombie)",
            Self::KillAttached => "kill attached node",
            Self::DiskErrors => "disk write errors",
            Self::DiskHang => "disk hang",
            Self::PowerCut => "power cut (unflushed writes undone or torn)",
        }
    }

    /// How long the fault lasts, in ms, drawn from `rng`.
    fn hold_ms(self, rng: &mut Rng) -> u64 {
        match self {
            Self::KillReplica => rng.below(3000),
            Self::PauseReplica => 500 + rng.below(5500),
            Self::CutReplica | Self::CutRequests | Self::CutReplies => 1000 + rng.below(4000),
            Self::EtcdOutage => 200 + rng.below(800),
            Self::DiskErrors => 500 + rng.below(3500),
            Self::DiskHang => 1000 + rng.below(5000),
            Self::PowerCut => rng.below(2000),
            Self::CorruptBlock | Self::MoveClean | Self::TakeoverForce | Self::KillAttached => 0,
        }
    }
}

/// One fault of a plan.
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    /// What it does.
    pub kind: FaultKind,
    /// Which node or block it hits, resolved against the cluster as it is when it happens.
    pub pick: u64,
    /// How long it lasts.
    pub hold: Duration,
}

/// The schedule of one trial, a pure function of its seed.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The seed.
    pub seed: u64,
    /// Daemons (3 or 4).
    pub nodes: usize,
    /// The workload's `fdatasync` interval.
    pub sync_every: u32,
    /// The faults, one after another.
    pub faults: Vec<Fault>,
}

impl Plan {
    /// The plan of `seed`, with `steps` faults.
    pub fn from_seed(seed: u64, steps: usize) -> Self {
        let mut rng = Rng::new(seed ^ 0xC4A0_5EED);
        let nodes = 3 + rng.below(2) as usize;
        let sync_every = [1, 1, 2, 4, 8][rng.below(5) as usize];
        let mut disk = Rng::new(seed ^ 0xD15C_FA17);
        let mut power = Rng::new(seed ^ 0x90E4_C075);
        let mut faults = Vec::new();
        for _ in 0..steps {
            let kind = FaultKind::MAIN[rng.below(FaultKind::MAIN.len() as u64) as usize];
            faults.push(Fault {
                kind,
                hold: Duration::from_millis(kind.hold_ms(&mut rng)),
                pick: rng.next(),
            });
            // One step in three is followed by a disk fault.
            if disk.below(3) == 0 {
                let kind = FaultKind::DISK[disk.below(2) as usize];
                faults.push(Fault {
                    kind,
                    hold: Duration::from_millis(kind.hold_ms(&mut disk)),
                    pick: disk.next(),
                });
            }
            // And one in four by a power cut (drawn apart too, for the same reason).
            if power.below(4) == 0 {
                let kind = FaultKind::PowerCut;
                faults.push(Fault {
                    kind,
                    hold: Duration::from_millis(kind.hold_ms(&mut power)),
                    pick: power.next(),
                });
            }
        }
        Self {
            seed,
            nodes,
            sync_every,
            faults,
        }
    }

    /// One line: the nodes, the sync interval and the faults.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "seed {}: {} nodes, fdatasync every {} writes;",
            self.seed, self.nodes, self.sync_every
        );
        for f in &self.faults {
            let _ = write!(s, " [{} {:?}]", f.kind.name(), f.hold);
        }
        s
    }
}

/// What one trial found.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// Faults applied, by kind.
    pub faults: BTreeMap<FaultKind, u64>,
    /// Writes acknowledged to the application, over every writer.
    pub acked: u64,
    /// Slot checks of an acknowledged write (every audit, every replica node).
    pub checked: u64,
    /// Acknowledged writes found missing (zeros or an older block).
    pub lost: u64,
    /// Slots holding a block never written there (a zombie's write, corruption let through).
    pub wrong: u64,
    /// Reads by the stale-read checker.
    pub reads: u64,
    /// Reads that returned data older than acknowledged.
    pub stale_reads: u64,
    /// I/O errors the application saw where no fault took the node it ran on.
    pub app_errors: u64,
    /// I/O errors in writers on a node that was killed or taken over (expected).
    pub expected_errors: u64,
    /// Writes a fenced zombie got acknowledged after the takeover.
    pub zombie_acks: u64,
    /// Forced takeovers refused because every healthy replica was on the stopped node (the
    /// right answer; the old node then goes on writing).
    pub refused_takeovers: u64,
    /// Corruptions not made because no other replica was healthy to repair from.
    pub skipped_corruptions: u64,
    /// Faults on a replica node or disk not made because they would have hit the only
    /// healthy replica (every complete copy: errors would then be right).
    pub skipped_faults: u64,
    /// Writes not durable when a power cut came, and of those, how many were undone
    /// completely or torn.
    pub power_cut: crate::power::Cut,
    /// What stopped the trial early or failed a check, if anything.
    pub failure: Option<String>,
    /// The first stale read or application error, and the audits' first bad slots.
    pub details: Vec<String>,
}

impl Outcome {
    /// Nothing lost, nothing stale, no unexpected error, no zombie write, no failure.
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.wrong == 0
            && self.stale_reads == 0
            && self.app_errors == 0
            && self.zombie_acks == 0
            && self.failure.is_none()
    }

    /// A multi-line account, for a failed assertion.
    pub fn explain(&self) -> String {
        format!("{self:#?}")
    }
}

/// The command that replays `seed`.
pub fn replay_command(seed: u64, steps: usize) -> String {
    format!(
        "BALLAST_BIN=$PWD/target/debug/ballast cargo run -p integration-tests --bin cluster-chaos -- --seed {seed} --steps {steps}"
    )
}

/// Run the trial of `seed` with `steps` faults.
pub fn run(seed: u64, steps: usize) -> Outcome {
    let plan = Plan::from_seed(seed, steps);
    let mut out = Outcome {
        seed,
        ..Outcome::default()
    };
    if let Err(e) = Trial::run(&plan, &mut out) {
        out.failure = Some(format!("{e:#}"));
    }
    out
}

/// A running trial's cluster. Fields drop in declaration order: the writers first, then the
/// daemons, attachments, directories and etcd.
struct Trial<'a> {
    /// The logs of each node's earlier (killed) daemons.
    old_logs: Vec<String>,
    volume: String,
    out: &'a mut Outcome,
    rng: Rng,
    ids: Vec<String>,
    attached: usize,
    dev: String,
    corrupted: BTreeSet<u64>,
    zombie: Option<Workload>,
    workload: Option<Workload>,
    daemons: Vec<Option<Daemon>>,
    _cleanup: Cleanup,
    dirs: Vec<NodeDir>,
    etcd: Etcd,
}

impl Trial<'_> {
    fn run(plan: &Plan, out: &mut Outcome) -> Result<()> {
        let etcd = Etcd::start()?;
        let dirs = node_dirs(plan.nodes);
        let volume = volume_name();
        let cleanup = Cleanup::new(&dirs, &[volume.as_str()]);
        let ids = (0..plan.nodes)
            .map(|i| format!("node-{}", char::from(b'a' + i as u8)))
            .collect();
        let mut t = Trial {
            old_logs: vec![String::new(); plan.nodes],
            volume,
            out,
            rng: Rng::new(plan.seed),
            ids,
            attached: 0,
            dev: String::new(),
            corrupted: BTreeSet::new(),
            zombie: None,
            workload: None,
            daemons: Vec::new(),
            _cleanup: cleanup,
            dirs,
            etcd,
        };
        let r = t.body(plan);
        if r.is_err() || !t.out.ok() || std::env::var_os("BALLAST_CHAOS_KEEP_LOGS").is_some() {
            t.save_logs(plan.seed);
        }
        r
    }

    fn body(&mut self, plan: &Plan) -> Result<()> {
        let t = self;
        for i in 0..plan.nodes {
            let d = t.start_node(i)?;
            t.daemons.push(Some(d));
        }
        t.wait("every node registered", Duration::from_secs(30), |t| {
            Ok(t.node_list()?.len() == plan.nodes)
        })?;
        cli(
            t.any(),
            &[
                "volume",
                "create",
                &t.volume,
                "--size",
                "64MiB",
                "--replicas",
                "3",
            ],
        )?;
        let holders = t.holders()?;
        t.attached = holders[t.rng.below(holders.len() as u64) as usize];
        t.dev = t.attach(t.attached, false)?;
        let cfg = Config {
            slots: SLOTS,
            seed: plan.seed,
            sync_every: plan.sync_every,
            check_reads: true,
            ..Config::default()
        };
        t.workload = Some(Workload::start(&t.dev, cfg)?);
        t.progress()?;
        for (n, fault) in plan.faults.iter().enumerate() {
            t.apply(fault)
                .with_context(|| format!("fault {} ({})", n + 1, fault.kind.name()))?;
            *t.out.faults.entry(fault.kind).or_default() += 1;
            t.progress()
                .with_context(|| format!("after fault {} ({})", n + 1, fault.kind.name()))?;
        }
        t.finish()
    }

    /// Keep every node's daemon logs in `/tmp/ballast-chaos-SEED/` (named in the failure; kept
    /// for every trial when `BALLAST_CHAOS_KEEP_LOGS` is set).
    fn save_logs(&mut self, seed: u64) {
        let dir = std::env::temp_dir().join(format!("ballast-chaos-{seed}"));
        if std::fs::create_dir_all(&dir).is_err() {
            return;
        }
        for (i, id) in self.ids.iter().enumerate() {
            let now = self
                .daemons
                .get(i)
                .and_then(Option::as_ref)
                .map(Daemon::log);
            let text = format!("{}{}", self.old_logs[i], now.unwrap_or_default());
            let _ = std::fs::write(dir.join(format!("{id}.log")), text);
        }
        self.out
            .details
            .push(format!("daemon logs: {}", dir.display()));
    }

    /// Kill daemon `i`, keeping its log.
    fn kill(&mut self, i: usize) {
        if let Some(mut d) = self.daemons[i].take() {
            let _ = d.kill();
            self.old_logs[i].push_str(&d.log());
            self.old_logs[i].push_str("---- killed ----\n");
        }
    }

    /// The running daemon `i`.
    fn node(&self, i: usize) -> Result<&Daemon> {
        self.daemons[i]
            .as_ref()
            .ok_or_else(|| anyhow!("{} is not running", self.ids[i]))
    }

    /// The attached node, which always runs between faults.
    fn any(&self) -> &Daemon {
        self.daemons[self.attached]
            .as_ref()
            .expect("the attached node runs")
    }

    fn start_node(&self, i: usize) -> Result<Daemon> {
        // The power-cut journal is kept when this file exists as the daemon starts.
        let journal = self.dirs[i].power_journal();
        std::fs::File::create(&journal)
            .with_context(|| format!("creating {}", journal.display()))?;
        let zone = format!("zone-{i}");
        let args = cluster_args(&self.dirs[i], &self.ids[i], &zone, &self.etcd);
        let mut d = Daemon::spawn(&self.dirs[i], args)?;
        d.wait_ready(Duration::from_secs(60))?;
        Ok(d)
    }

    fn node_list(&self) -> Result<Vec<serde_json::Value>> {
        let v = cli(self.any(), &["node", "list", "-o", "json"])?;
        v.as_array()
            .cloned()
            .ok_or_else(|| anyhow!("node list is not an array"))
    }

    /// `(node index, state)` of each replica of the volume.
    fn replicas(&self) -> Result<Vec<(usize, String)>> {
        let v = cli(
            self.any(),
            &["volume", "inspect", &self.volume, "-o", "json"],
        )?;
        let list = v["replica_status"]
            .as_array()
            .ok_or_else(|| anyhow!("inspect has no replica_status: {v}"))?;
        list.iter()
            .map(|r| {
                let id = r["node_id"].as_str().unwrap_or_default();
                let i = self
                    .ids
                    .iter()
                    .position(|n| n == id)
                    .ok_or_else(|| anyhow!("unknown node {id:?}"))?;
                Ok((i, r["state"].as_str().unwrap_or_default().to_owned()))
            })
            .collect()
    }

    /// The nodes holding a replica of the volume.
    fn holders(&self) -> Result<Vec<usize>> {
        Ok(self.replicas()?.into_iter().map(|(i, _)| i).collect())
    }

    /// A replica node other than the attached one, chosen by `pick`.
    fn other_holder(&self, pick: u64) -> Result<usize> {
        let others: Vec<usize> = self
            .holders()?
            .into_iter()
            .filter(|&i| i != self.attached)
            .collect();
        if others.is_empty() {
            bail!("no replica node other than the attached one");
        }
        Ok(others[(pick % others.len() as u64) as usize])
    }

    /// The node a replica-node fault hits: another holder than the attached node, never the
    /// only healthy replica (that would take every complete copy away, and errors would then
    /// be right). `None`: no such node now.
    fn fault_target(&self, pick: u64) -> Result<Option<usize>> {
        let states = self.replicas()?;
        let healthy = states.iter().filter(|(_, st)| st == "healthy").count();
        let fair: Vec<usize> = states
            .iter()
            .filter(|(n, st)| *n != self.attached && (st != "healthy" || healthy > 1))
            .map(|(n, _)| *n)
            .collect();
        Ok((!fair.is_empty()).then(|| fair[(pick % fair.len() as u64) as usize]))
    }

    fn attach(&self, i: usize, force: bool) -> Result<String> {
        let mut args = vec!["volume", "attach", &self.volume, "-o", "json"];
        if force {
            args.push("--force");
        }
        let v = cli(self.node(i)?, &args)?;
        v["device"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("attach printed no device: {v}"))
    }

    /// Attach on node `i`, retrying for up to 30 s while the answer is "unavailable": the
    /// node holding the only healthy replica may be briefly unlisted (its lease lapsed while
    /// it was stopped, and it is registering again), and an orchestrator retries that.
    fn attach_retrying(&self, i: usize) -> Result<String> {
        let start = Instant::now();
        loop {
            match self.attach(i, false) {
                Err(e)
                    if format!("{e:#}").contains("can be reached")
                        && start.elapsed() < Duration::from_secs(30) =>
                {
                    std::thread::sleep(Duration::from_millis(500));
                }
                r => return r,
            }
        }
    }

    fn wait(
        &self,
        what: &str,
        within: Duration,
        mut ok: impl FnMut(&Self) -> Result<bool>,
    ) -> Result<()> {
        let start = Instant::now();
        let mut last = None;
        loop {
            match ok(self) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last = Some(e),
            }
            if start.elapsed() > within {
                bail!("{what} did not happen within {within:?} (last error: {last:?})");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Wait for the workload to make progress with no I/O error and no stale read.
    fn progress(&mut self) -> Result<()> {
        let w = self.workload.as_ref().expect("a workload runs");
        let waited = w.wait_more_acked(PROGRESS, PROGRESS_TIMEOUT);
        if w.stale_reads() > 0 {
            bail!("stale reads while writing");
        }
        waited
    }

    /// Stop the running writer and account for it: its errors are application errors unless
    /// `expected` (its node was killed or fenced).
    fn stop_writer(&mut self, w: Workload, expected: bool) -> Ledger {
        let r = w.stop();
        self.out.acked += r.acked;
        self.out.reads += r.reads;
        self.out.stale_reads += r.stale_reads;
        if let Some(s) = &r.first_stale {
            self.out.details.push(format!("stale read: {s}"));
        }
        let errors = r.errors + r.read_errors;
        if expected {
            self.out.expected_errors += errors;
        } else {
            self.out.app_errors += errors;
            if let Some(e) = &r.first_error {
                self.out.details.push(format!("application error: {e}"));
            }
        }
        r.ledger
    }

    /// Audit the whole volume on `dev` against `ledger`.
    fn audit(&mut self, ledger: &Ledger, dev: &str, on: &str) -> Result<()> {
        let a = ledger
            .audit(dev)
            .with_context(|| format!("audit on {on}"))?;
        self.out.checked += a.verified.acked;
        self.out.lost += a.lost;
        self.out.wrong += a.wrong;
        for e in a.examples.iter().take(5) {
            self.out.details.push(format!("audit on {on}: {e}"));
        }
        Ok(())
    }

    /// Resume writing on the current device from `ledger`.
    fn resume(&mut self, ledger: Ledger) -> Result<()> {
        let from = ledger.last_seq() + 1_000_000;
        self.workload = Some(Workload::resume(&self.dev, ledger, from)?);
        Ok(())
    }

    fn apply(&mut self, f: &Fault) -> Result<()> {
        match f.kind {
            FaultKind::KillReplica => {
                let Some(i) = self.fault_target(f.pick)? else {
                    self.out.skipped_faults += 1;
                    return Ok(());
                };
                self.kill(i);
                std::thread::sleep(f.hold);
                self.daemons[i] = Some(self.start_node(i)?);
            }
            FaultKind::PauseReplica => {
                let Some(i) = self.fault_target(f.pick)? else {
                    self.out.skipped_faults += 1;
                    return Ok(());
                };
                let d = self.node(i)?;
                d.signal(Signal::SIGSTOP)?;
                std::thread::sleep(f.hold);
                d.signal(Signal::SIGCONT)?;
            }
            FaultKind::CutReplica | FaultKind::CutRequests | FaultKind::CutReplies => {
                let Some(i) = self.fault_target(f.pick)? else {
                    self.out.skipped_faults += 1;
                    return Ok(());
                };
                // A node whose lease lapsed (stopped earlier) is not listed until it registers
                // again: nothing to cut then.
                let listed = self.node_list()?.into_iter().find_map(|n| {
                    (n["id"].as_str() == Some(self.ids[i].as_str()))
                        .then(|| n["replica_addr"].as_str().map(str::to_owned))
                        .flatten()
                });
                let Some(port) = listed
                    .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                    .map(|a| a.port())
                else {
                    self.out.skipped_faults += 1;
                    return Ok(());
                };
                let cut = match f.kind {
                    FaultKind::CutReplica => Partition::cut_port(port),
                    k => Partition::cut_port_one_way(port, k == FaultKind::CutRequests),
                };
                std::thread::sleep(f.hold);
                drop(cut);
            }
            FaultKind::EtcdOutage => {
                self.etcd.stop()?;
                std::thread::sleep(f.hold);
                self.etcd.restart()?;
            }
            FaultKind::CorruptBlock => self.corrupt(f.pick)?,
            FaultKind::MoveClean => {
                let to = self.other_holder(f.pick)?;
                let w = self.workload.take().expect("a workload runs");
                let ledger = self.stop_writer(w, false);
                cli(self.any(), &["volume", "detach", &self.volume])?;
                self.attached = to;
                self.dev = self.attach_retrying(to)?;
                self.audit(&ledger, &self.dev.clone(), &self.ids[to].clone())?;
                self.resume(ledger)?;
            }
            FaultKind::TakeoverForce => self.takeover(f.pick)?,
            FaultKind::DiskErrors | FaultKind::DiskHang => {
                let Some(i) = self.disk_target(f.pick, "disk fault injection is on")? else {
                    self.out.skipped_faults += 1;
                    return Ok(());
                };
                let control = self.dirs[i].disk_faults();
                let word = if f.kind == FaultKind::DiskErrors {
                    "error"
                } else {
                    "hang"
                };
                std::fs::write(&control, word)?;
                std::thread::sleep(f.hold);
                std::fs::remove_file(&control)?;
            }
            FaultKind::KillAttached => self.restart_attached(None)?,
            FaultKind::PowerCut => {
                let Some(i) = self.disk_target(f.pick, "power-cut journal is on")? else {
                    self.out.skipped_faults += 1;
                    return Ok(());
                };
                if i == self.attached {
                    self.restart_attached(Some(f.pick))?;
                } else {
                    self.kill(i);
                    crate::kill_holder(&self.dirs[i]);
                    self.cut_power(i, f.pick)?;
                    std::thread::sleep(f.hold);
                    self.daemons[i] = Some(self.start_node(i)?);
                }
            }
        }
        Ok(())
    }

    /// The node a disk fault or power cut hits, the attached one included, chosen by `pick`:
    /// never the only healthy replica's (that takes every complete copy away, and writes must
    /// then fail: the application's errors would be right). `None`: no such node now. Its
    /// daemon must have logged `ready` (it can inject the fault).
    fn disk_target(&self, pick: u64, ready: &str) -> Result<Option<usize>> {
        let states = self.replicas()?;
        let healthy = states.iter().filter(|(_, st)| st == "healthy").count();
        let targets: Vec<usize> = states
            .iter()
            .filter(|(_, st)| st != "healthy" || healthy > 1)
            .map(|(n, _)| *n)
            .collect();
        if targets.is_empty() {
            return Ok(None);
        }
        let i = targets[(pick % targets.len() as u64) as usize];
        if !self.node(i)?.log().contains(ready) {
            bail!(
                "the daemon under test cannot inject disk faults or power cuts: use a debug \
                 build, or a release build with `--features daemon/failpoints`"
            );
        }
        Ok(Some(i))
    }

    /// Undo what node `i`'s (killed) daemon had not made durable, as `pick` draws.
    fn cut_power(&mut self, i: usize, pick: u64) -> Result<()> {
        let cut = crate::power::cut(&self.dirs[i].power_journal(), &mut Rng::new(pick))?;
        let total = &mut self.out.power_cut;
        total.pending += cut.pending;
        total.undone += cut.undone;
        total.torn += cut.torn;
        Ok(())
    }

    /// SIGKILL the attached node's daemon and start it again. Without a power cut the holder
    /// keeps the attach session, so the writer only pauses until the restarted daemon takes
    /// the session over: any error it sees counts as an application error. A power cut
    /// (drawn by `power`) takes the machine's holder too: the writer's I/O fails (expected),
    /// the disk loses what it had not made durable, and writing resumes once the restarted
    /// daemon has attached the volume again by itself.
    fn restart_attached(&mut self, power: Option<u64>) -> Result<()> {
        let i = self.attached;
        self.kill(i);
        let Some(pick) = power else {
            self.daemons[i] = Some(self.start_node(i)?);
            self.dev = self.attach(i, false)?;
            let w = self.workload.take().expect("a workload runs");
            let ledger = self.stop_writer(w, false);
            self.audit(&ledger, &self.dev.clone(), &self.ids[i].clone())?;
            return self.resume(ledger);
        };
        crate::kill_holder(&self.dirs[i]);
        let w = self.workload.take().expect("a workload runs");
        let ledger = self.stop_writer(w, true);
        self.cut_power(i, pick)?;
        self.daemons[i] = Some(self.start_node(i)?);
        // The restarted daemon attaches the volume again by itself; this waits for it.
        self.dev = self.attach(i, false)?;
        self.audit(&ledger, &self.dev.clone(), &self.ids[i].clone())?;
        self.resume(ledger)
    }

    /// Flip bytes in one workload block of the attached node's replica (never a slot
    /// corrupted before), then read that slot through the device: the local replica is read
    /// first, so the bad copy must be found, answered from another replica and repaired.
    ///
    /// Only while another replica is healthy: a bad block on a replica that is not read
    /// stays bad until it is (there is no background scrub yet), and could end up the last
    /// healthy copy; that is not what this fault tests.
    fn corrupt(&mut self, pick: u64) -> Result<()> {
        let states = self.replicas()?;
        let me = self.attached;
        let local_healthy = states.iter().any(|(n, st)| *n == me && st == "healthy");
        let other_healthy = states.iter().any(|(n, st)| *n != me && st == "healthy");
        if !local_healthy || !other_healthy {
            self.out.skipped_corruptions += 1;
            return Ok(());
        }
        let pool = self.dirs[me].pool();
        let mut blocks = find_blocks(&pool, MAGIC);
        blocks.retain(|at| {
            let b = pread_direct(&pool, *at, 4096);
            let slot = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
            !self.corrupted.contains(&slot)
        });
        if blocks.is_empty() {
            bail!("no written block found in {}", pool.display());
        }
        let at = blocks[(pick / 7 % blocks.len() as u64) as usize];
        let mut b = pread_direct(&pool, at, 4096);
        let slot = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        self.corrupted.insert(slot);
        for x in &mut b[1000..1016] {
            *x ^= 0x5A;
        }
        pwrite_direct(&pool, at, &b);
        let ledger = self.workload.as_ref().expect("a workload runs").ledger();
        let block = crate::workload::BLOCK;
        self.out.reads += 1;
        match try_read_direct(&self.dev, slot as usize * block, block) {
            Ok(data) => {
                if let Err(why) = ledger.check_read(slot, &data) {
                    self.out.stale_reads += 1;
                    self.out
                        .details
                        .push(format!("read of a corrupted block: {why}"));
                }
            }
            Err(e) => {
                self.out.app_errors += 1;
                self.out.details.push(format!(
                    "read of a corrupted block (slot {slot}) failed: {e}"
                ));
            }
        }
        Ok(())
    }

    /// SIGSTOP the attached node, take the volume over with `--force` elsewhere and write
    /// there, then SIGCONT the old node and let its writer (a zombie) try for a while.
    fn takeover(&mut self, pick: u64) -> Result<()> {
        let old = self.attached;
        let to = self.other_holder(pick)?;
        self.node(old)?.signal(Signal::SIGSTOP)?;
        let zombie = self.workload.take().expect("a workload runs");
        let taken = self.attach(to, true);
        if let Err(e) = &taken {
            if format!("{e:#}").contains("no healthy replica") {
                // Refused, rightly: the only healthy replicas are on the stopped node. It goes
                // on as the writer once continued.
                // Refusing took a lease TTL or more, so the stopped node may have lost its
                // lease and fenced itself: its writer's errors are expected, and the volume is
                // attached there again (which replaces a fenced attachment).
                self.node(old)?.signal(Signal::SIGCONT)?;
                self.out.refused_takeovers += 1;
                let ledger = self.stop_writer(zombie, true);
                let mut dev = Err(anyhow!("not tried"));
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(30) {
                    dev = self.attach(old, false);
                    if dev.is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                self.dev = dev.context("attaching again on the node that kept the volume")?;
                self.audit(&ledger, &self.dev.clone(), &self.ids[old].clone())?;
                return self.resume(ledger);
            }
        }
        let frozen = zombie.ledger();
        let last_before = frozen.last_seq();
        let old_dev = zombie.dev().to_owned();
        let resumed = taken.and_then(|dev| {
            self.attached = to;
            self.dev = dev;
            self.audit(&frozen, &self.dev.clone(), &self.ids[to].clone())?;
            self.resume(frozen)
        });
        // Continue the old node whatever happened, so a failure leaves no stopped process.
        self.node(old)?.signal(Signal::SIGCONT)?;
        resumed?;
        self.zombie = Some(zombie);
        self.progress()?;
        // Reads through the old node's device: each fails, or returns nothing older than
        // what the new node has had acknowledged.
        let now = self.workload.as_ref().expect("a workload runs").ledger();
        for _ in 0..32 {
            let slot = self.rng.below(now.slots());
            let at = slot as usize * crate::workload::BLOCK;
            self.out.reads += 1;
            if let Ok(b) = try_read_direct(&old_dev, at, crate::workload::BLOCK) {
                if let Err(why) = now.check_read(slot, &b) {
                    self.out.stale_reads += 1;
                    self.out.details.push(format!(
                        "the taken-over node {} served a stale read: {why}",
                        self.ids[old]
                    ));
                }
            }
        }
        // Let the zombie try for a while, then count what it got acknowledged.
        std::thread::sleep(Duration::from_secs(2));
        let zombie = self.zombie.take().expect("the zombie");
        let ledger = self.stop_writer(zombie, true);
        let acks = ledger.acked_above(last_before) as u64;
        if acks > 0 {
            self.out.details.push(format!(
                "the zombie writer on {} got {acks} writes acknowledged after the takeover",
                self.ids[old]
            ));
        }
        self.out.zombie_acks += acks;
        Ok(())
    }

    /// Heal everything, wait for three healthy replicas, and audit from every replica node.
    fn finish(&mut self) -> Result<()> {
        for i in 0..self.daemons.len() {
            if self.daemons[i].is_none() {
                self.daemons[i] = Some(self.start_node(i)?);
            }
        }
        self.wait(
            "three healthy replicas",
            HEAL_TIMEOUT,
            |t| -> Result<bool> {
                let r = t.replicas()?;
                Ok(r.len() == 3 && r.iter().all(|(_, s)| s == "healthy"))
            },
        )?;
        self.progress()?;
        let w = self.workload.take().expect("a workload runs");
        let ledger = self.stop_writer(w, false);
        self.audit(&ledger, &self.dev.clone(), &self.ids[self.attached].clone())?;
        for i in self.holders()? {
            if i == self.attached {
                continue;
            }
            cli(self.any(), &["volume", "detach", &self.volume])?;
            self.attached = i;
            self.dev = self.attach(i, false)?;
            self.audit(&ledger, &self.dev.clone(), &self.ids[i].clone())?;
        }
        cli(self.any(), &["volume", "detach", &self.volume])?;
        Ok(())
    }
}

/// Run `ballast <args>` against `d`; its output parsed as JSON with `-o json`, else `null`.
fn cli(d: &Daemon, args: &[&str]) -> Result<serde_json::Value> {
    let out = d.cli(args);
    if out.code != Some(0) {
        bail!("`{}` failed:\n{out}", out.command);
    }
    if !args.contains(&"json") {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(&out.stdout)
        .with_context(|| format!("`{}` printed invalid JSON:\n{out}", out.command))
}

/// The table of many trials: per fault kind, then the totals.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| fault | trials with it | times |");
    let _ = writeln!(s, "|---|---:|---:|");
    for k in FaultKind::all() {
        let trials = outcomes
            .iter()
            .filter(|o| o.faults.contains_key(&k))
            .count();
        let times: u64 = outcomes.iter().filter_map(|o| o.faults.get(&k)).sum();
        let _ = writeln!(s, "| {} | {trials} | {times} |", k.name());
    }
    let sum = |f: fn(&Outcome) -> u64| outcomes.iter().map(f).sum::<u64>();
    let failed = outcomes.iter().filter(|o| !o.ok()).count() as u64;
    let cut = |f: fn(&crate::power::Cut) -> u64| outcomes.iter().map(|o| f(&o.power_cut)).sum();
    let rows: [(&str, u64); 17] = [
        ("trials", outcomes.len() as u64),
        ("trials failed", failed),
        ("acknowledged writes", sum(|o| o.acked)),
        (
            "acknowledged slots checked (every audit, every replica node)",
            sum(|o| o.checked),
        ),
        ("**writes lost**", sum(|o| o.lost)),
        (
            "blocks never written there (zombie writes, corruption)",
            sum(|o| o.wrong),
        ),
        ("reads checked while writing", sum(|o| o.reads)),
        ("**stale reads**", sum(|o| o.stale_reads)),
        ("application I/O errors", sum(|o| o.app_errors)),
        (
            "writes a fenced zombie got acknowledged",
            sum(|o| o.zombie_acks),
        ),
        (
            "I/O errors of killed or fenced writers (expected)",
            sum(|o| o.expected_errors),
        ),
        (
            "takeovers refused: every healthy copy on the stopped node (right)",
            sum(|o| o.refused_takeovers),
        ),
        (
            "corruptions skipped: no other healthy replica to repair from",
            sum(|o| o.skipped_corruptions),
        ),
        (
            "node and disk faults skipped: only the last healthy replica was left to hit",
            sum(|o| o.skipped_faults),
        ),
        ("writes not yet durable at a power cut", cut(|c| c.pending)),
        ("... of which undone completely", cut(|c| c.undone)),
        ("... of which torn at 4 KiB", cut(|c| c.torn)),
    ];
    let _ = writeln!(s);
    let _ = writeln!(s, "| measure | value |");
    let _ = writeln!(s, "|---|---:|");
    for (what, n) in rows {
        let _ = writeln!(s, "| {what} | {n} |");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_is_a_function_of_its_seed() {
        let a = Plan::from_seed(7, 6);
        let b = Plan::from_seed(7, 6);
        assert_eq!(a.describe(), b.describe());
        assert_ne!(a.describe(), Plan::from_seed(8, 6).describe());
        assert!((3..=4).contains(&a.nodes));
        // Over many seeds every kind is drawn.
        let kinds: BTreeSet<FaultKind> = (0..50)
            .flat_map(|s| Plan::from_seed(s, 6).faults)
            .map(|f| f.kind)
            .collect();
        assert_eq!(kinds.len(), FaultKind::all().count());
    }
}
