//! Prometheus metrics, read from the storage engine at scrape time.
//!
//! Nothing is copied into metric objects ahead of time: on each scrape [`MetricsExporter`]
//! gathers a `Scrape` (the engine's per-volume I/O counters, the pool statuses, the volume
//! count and the daemon's own facts) and encodes it through a `prometheus-client`
//! [`Collector`]. The data path keeps its counters in atomics (`volume::pool::stats`); this
//! module only reads them.
//!
//! Every metric name starts with `ballast_`:
//!
//! | name | type | labels |
//! |---|---|---|
//! | `ballast_build_info` | info | `version`, `node`, `engine` |
//! | `ballast_ready` | gauge (0/1) | |
//! | `ballast_uptime_seconds` | gauge | |
//! | `ballast_volumes` | gauge | |
//! | `ballast_pool_capacity_bytes` | gauge | `pool`, `path` |
//! | `ballast_pool_allocated_bytes` | gauge | `pool`, `path` |
//! | `ballast_pool_free_bytes` | gauge | `pool`, `path` |
//! | `ballast_pool_volumes` | gauge | `pool`, `path` |
//! | `ballast_pool_checksum_errors_total` | counter | `pool`, `path` |
//! | `ballast_volume_io_operations_total` | counter | `volume`, `op` |
//! | `ballast_volume_io_errors_total` | counter | `volume`, `op` |
//! | `ballast_volume_io_bytes_total` | counter | `volume`, `op` |
//! | `ballast_volume_io_latency_seconds` | histogram | `volume`, `op` |
//! | `ballast_volume_checksum_errors_total` | counter | `volume` |
//!
//! Also the replicas of each volume attached on this node, as the record in the store said
//! when the node's repair task last read it (about once a second; a scrape itself asks the
//! store nothing, and names no volume this node does not serve). Each volume is reported by
//! the node it is attached on. `node` names the replica: its node, or `NODE/DEVICE` in
//! standalone mode (one replica per pool device):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `ballast_replica_state` | gauge (0/1) | `volume`, `node`, `state` |
//! | `ballast_rebuild_total_bytes` | gauge | `volume`, `node` (rebuilding replicas) |
//! | `ballast_rebuild_done_bytes` | gauge | `volume`, `node` |
//! | `ballast_rebuild_eta_seconds` | gauge | `volume`, `node` |
//!
//! and for the volumes attached on this node:
//!
//! | name | type | labels |
//! |---|---|---|
//! | `ballast_nexus_repairs_total` | counter | `volume` (blocks repaired after checksum failures) |
//! | `ballast_nexus_ejections_total` | counter | `volume` |
//! | `ballast_nexus_rebuild_bytes_total` | counter | `volume` |
//!
//! `op` is `read`, `write`, `flush` or `discard` (discard and write-zeroes together).
//! Storage metrics appear once storage is open; before that only the daemon's own are there.

use std::fmt;
use std::sync::{Arc, OnceLock};

use ::api::{PoolStatus, VolumeControl};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric, NoLabelSet,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use volume::pool::stats::{OpStats, VolumeIoStats, LATENCY_BUCKETS_SECONDS};
use volume::pool::Storage;

use crate::node_info::{NodeInfo, Phase, VERSION};
use cluster::model::{ReplicaState, VolumeRecord};
use cluster::Cluster;

/// The content type of [`MetricsExporter::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A source of per-volume data-path counters.
pub trait IoStatsSource {
    /// A snapshot of every volume's I/O statistics.
    fn io_stats(&self) -> Vec<VolumeIoStats>;
}

impl IoStatsSource for Storage {
    fn io_stats(&self) -> Vec<VolumeIoStats> {
        Storage::io_stats(self)
    }
}

/// Renders the metrics of one daemon; storage is attached once it is open.
#[derive(Debug)]
pub struct MetricsExporter<S> {
    node: Arc<NodeInfo>,
    storage: OnceLock<Arc<S>>,
    cluster: OnceLock<Arc<Cluster>>,
}

impl<S: VolumeControl + IoStatsSource> MetricsExporter<S> {
    /// An exporter for the daemon described by `node`, with no storage yet.
    pub fn new(node: Arc<NodeInfo>) -> Self {
        Self {
            node,
            storage: OnceLock::new(),
            cluster: OnceLock::new(),
        }
    }

    /// Report the cluster's replica states and this node's nexuses from now on.
    pub fn attach_cluster(&self, cluster: Arc<Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// Report `storage`'s metrics from now on. Only the first call has an effect.
    pub fn attach(&self, storage: Arc<S>) {
        let _ = self.storage.set(storage);
    }

    /// Gather the current values and encode them in the OpenMetrics text format.
    pub async fn render(&self) -> String {
        let scrape = Scrape {
            node_id: self.node.node_id().to_owned(),
            engine: self.node.engine(),
            ready: self.node.phase() == Phase::Ready,
            uptime_seconds: self.node.uptime().as_secs_f64(),
            storage: match self.storage.get() {
                Some(storage) => Some(StorageScrape::gather(storage.as_ref()).await),
                None => None,
            },
            cluster: self.cluster.get().map(|c| ClusterScrape::gather(c)),
        };
        let mut registry = Registry::with_prefix("ballast");
        registry.register_collector(Box::new(scrape));
        let mut out = String::new();
        // Writing into a String cannot fail, and our collector returns no other errors.
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("encoding metrics into a String cannot fail");
        out
    }
}

/// Everything one scrape reports.
#[derive(Debug)]
struct Scrape {
    node_id: String,
    engine: &'static str,
    ready: bool,
    uptime_seconds: f64,
    storage: Option<StorageScrape>,
    cluster: Option<ClusterScrape>,
}

/// The cluster part of a scrape.
#[derive(Debug)]
struct ClusterScrape {
    volumes: Vec<VolumeRecord>,
    nexuses: Vec<(String, [u64; 3])>,
}

impl ClusterScrape {
    fn gather(cluster: &Cluster) -> Self {
        // Local state only: a scrape must not load the store (nor list every volume of the
        // cluster to whoever reaches the port).
        let volumes = cluster.attached_views();
        let nexuses = cluster
            .nexus_stats()
            .into_iter()
            .map(|(name, n)| {
                let s = n.stats();
                let get =
                    |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                (
                    name,
                    [get(&s.repairs), get(&s.ejections), get(&s.rebuild_bytes)],
                )
            })
            .collect();
        Self { volumes, nexuses }
    }

    fn encode(&self, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let states = [
            ReplicaState::Healthy,
            ReplicaState::Rebuilding,
            ReplicaState::Ejected,
        ];
        gauge(
            enc,
            "replica_state",
            "1 for each replica's current state (healthy, rebuilding, ejected), 0 for the others.",
            None,
            self.volumes.iter().flat_map(|v| {
                v.placement.iter().flat_map(move |r| {
                    states.map(|s| {
                        (
                            [
                                ("volume", v.name.clone()),
                                ("node", r.id()),
                                ("state", s.as_str().to_owned()),
                            ],
                            u64::from(r.state == s),
                        )
                    })
                })
            }),
        )?;
        let rebuilding = || {
            self.volumes.iter().flat_map(|v| {
                v.placement.iter().filter_map(move |r| {
                    r.rebuild
                        .as_ref()
                        .map(|b| ([("volume", v.name.clone()), ("node", r.id())], b))
                })
            })
        };
        gauge(
            enc,
            "rebuild_total",
            "Bytes the running rebuild of a replica copies.",
            Some(&Unit::Bytes),
            rebuilding().map(|(l, b)| (l, b.total_bytes)),
        )?;
        gauge(
            enc,
            "rebuild_done",
            "Bytes the running rebuild of a replica has copied.",
            Some(&Unit::Bytes),
            rebuilding().map(|(l, b)| (l, b.done_bytes)),
        )?;
        gauge(
            enc,
            "rebuild_eta",
            "Estimated seconds until the running rebuild of a replica finishes.",
            Some(&Unit::Seconds),
            rebuilding().filter_map(|(l, b)| b.eta_seconds.map(|e| (l, e))),
        )?;
        let nexus = |i: usize| {
            self.nexuses
                .iter()
                .map(move |(name, v)| ([("volume", name.as_str())], v[i]))
        };
        counter(
            enc,
            "nexus_repairs",
            "Blocks of an attached volume rewritten from a healthy replica after a checksum failure.",
            None,
            nexus(0),
        )?;
        counter(
            enc,
            "nexus_ejections",
            "Replicas of an attached volume ejected.",
            None,
            nexus(1),
        )?;
        counter(
            enc,
            "nexus_rebuild",
            "Bytes copied by rebuilds and reconciliation of an attached volume.",
            Some(&Unit::Bytes),
            nexus(2),
        )
    }
}

/// The storage part of a scrape. A part the engine fails to report is left out (and logged)
/// rather than failing the whole scrape.
#[derive(Debug)]
struct StorageScrape {
    pools: Vec<PoolStatus>,
    volumes: Option<usize>,
    io: Vec<VolumeIoStats>,
}

impl StorageScrape {
    async fn gather<S: VolumeControl + IoStatsSource>(storage: &S) -> Self {
        let pools = storage.list_pools().await.unwrap_or_else(|e| {
            tracing::warn!(error = %e.full_message(), "metrics: cannot list pools");
            Vec::new()
        });
        let volumes = match storage.list_volumes().await {
            Ok(v) => Some(v.len()),
            Err(e) => {
                tracing::warn!(error = %e.full_message(), "metrics: cannot list volumes");
                None
            }
        };
        Self {
            pools,
            volumes,
            io: storage.io_stats(),
        }
    }
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let mut info = enc.encode_descriptor(
            "build",
            "Version, node and I/O engine of this daemon (always 1).",
            None,
            MetricType::Info,
        )?;
        info.encode_info(&[
            ("version", VERSION),
            ("node", &self.node_id),
            ("engine", self.engine),
        ])?;
        single_gauge(
            &mut enc,
            "ready",
            "1 once storage is open and the local API is serving.",
            None,
            u64::from(self.ready),
        )?;
        single_gauge(
            &mut enc,
            "uptime",
            "Seconds since the daemon started.",
            Some(&Unit::Seconds),
            self.uptime_seconds,
        )?;
        if let Some(storage) = &self.storage {
            storage.encode(&mut enc)?;
        }
        if let Some(cluster) = &self.cluster {
            cluster.encode(&mut enc)?;
        }
        Ok(())
    }
}

impl StorageScrape {
    fn encode(&self, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
        if let Some(volumes) = self.volumes {
            single_gauge(
                enc,
                "volumes",
                "Volumes on this node.",
                None,
                volumes as u64,
            )?;
        }

        let pool_labels = |p: &PoolStatus| [("pool", p.id.clone()), ("path", p.path.clone())];
        let pools = || self.pools.iter().map(|p| (pool_labels(p), p));
        gauge(
            enc,
            "pool_capacity",
            "Bytes of the pool device usable for volume data.",
            Some(&Unit::Bytes),
            pools().map(|(l, p)| (l, p.capacity_bytes)),
        )?;
        gauge(
            enc,
            "pool_allocated",
            "Bytes of the pool device allocated to volumes.",
            Some(&Unit::Bytes),
            pools().map(|(l, p)| (l, p.allocated_bytes)),
        )?;
        gauge(
            enc,
            "pool_free",
            "Bytes of the pool device still free.",
            Some(&Unit::Bytes),
            pools().map(|(l, p)| (l, p.free_bytes)),
        )?;
        gauge(
            enc,
            "pool_volumes",
            "Replicas on the pool device.",
            None,
            pools().map(|(l, p)| (l, u64::from(p.volumes))),
        )?;
        counter(
            enc,
            "pool_checksum_errors",
            "Checksum mismatches detected on the pool device since it was opened.",
            None,
            pools().map(|(l, p)| (l, p.checksum_errors)),
        )?;

        let ops = || {
            self.io.iter().flat_map(|v| {
                [
                    ("read", &v.read),
                    ("write", &v.write),
                    ("flush", &v.flush),
                    ("discard", &v.discard),
                ]
                .map(|(op, stats)| ([("volume", v.volume.as_str()), ("op", op)], stats))
            })
        };
        counter(
            enc,
            "volume_io_operations",
            "I/O operations completed, successful or not.",
            None,
            ops().map(|(l, s)| (l, s.count)),
        )?;
        counter(
            enc,
            "volume_io_errors",
            "I/O operations that failed.",
            None,
            ops().map(|(l, s)| (l, s.errors)),
        )?;
        counter(
            enc,
            "volume_io",
            "Bytes transferred by successful I/O operations.",
            Some(&Unit::Bytes),
            ops().map(|(l, s)| (l, s.bytes)),
        )?;

        let mut latency = enc.encode_descriptor(
            "volume_io_latency",
            "Latency of I/O operations.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (labels, stats) in ops() {
            encode_histogram(&mut latency.encode_family(&labels)?, stats)?;
        }

        counter(
            enc,
            "volume_checksum_errors",
            "Blocks of the volume that failed checksum verification on read.",
            None,
            self.io
                .iter()
                .map(|v| ([("volume", v.volume.as_str())], v.checksum_errors)),
        )
    }
}

/// A gauge without labels.
fn single_gauge<V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: V,
) -> fmt::Result {
    ConstGauge::new(value).encode(enc.encode_descriptor(name, help, unit, MetricType::Gauge)?)
}

/// A gauge with one sample per label set.
fn gauge<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut metric = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A counter with one sample per label set.
fn counter<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut metric = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encode `stats`' latency buckets; the encoder makes the per-bucket counts cumulative.
fn encode_histogram(
    metric: &mut prometheus_client::encoding::MetricEncoder<'_>,
    stats: &OpStats,
) -> fmt::Result {
    let bounds = LATENCY_BUCKETS_SECONDS
        .iter()
        .copied()
        .chain(std::iter::once(f64::MAX));
    let buckets: Vec<(f64, u64)> = bounds.zip(stats.buckets.iter().copied()).collect();
    metric.encode_histogram::<NoLabelSet>(
        stats.latency_sum_seconds,
        stats.buckets.iter().sum(),
        &buckets,
        None,
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ::api::{ControlError, VolumeName, VolumeSpec, VolumeStatus};
    use volume::pool::stats::IoCounters;

    use super::*;

    /// Just enough of a storage engine to be scraped: two pools, one volume with I/O.
    #[derive(Debug)]
    struct Scraped;

    impl IoStatsSource for Scraped {
        fn io_stats(&self) -> Vec<VolumeIoStats> {
            let c = IoCounters::default();
            c.read.record(4096, Duration::from_micros(30), true);
            c.read.record(4096, Duration::from_secs(2), false);
            c.write.record(8192, Duration::from_micros(200), true);
            vec![c.snapshot("db")]
        }
    }

    fn pool(id: &str) -> PoolStatus {
        PoolStatus {
            id: id.into(),
            pool_uuid: "u".into(),
            node_id: "n".into(),
            path: format!("/{id}.img"),
            capacity_bytes: 1 << 30,
            allocated_bytes: 1 << 20,
            free_bytes: (1 << 30) - (1 << 20),
            volumes: 1,
            checksum_errors: 0,
            state: "online".into(),
        }
    }

    impl VolumeControl for Scraped {
        async fn create_volume(&self, _: VolumeSpec) -> Result<VolumeStatus, ControlError> {
            unreachable!()
        }
        async fn delete_volume(&self, _: &VolumeName) -> Result<(), ControlError> {
            unreachable!()
        }
        async fn get_volume(&self, _: &VolumeName) -> Result<VolumeStatus, ControlError> {
            unreachable!()
        }
        async fn list_volumes(&self) -> Result<Vec<VolumeStatus>, ControlError> {
            Ok(Vec::new())
        }
        async fn resize_volume(
            &self,
            _: &VolumeName,
            _: u64,
        ) -> Result<VolumeStatus, ControlError> {
            unreachable!()
        }
        async fn list_pools(&self) -> Result<Vec<PoolStatus>, ControlError> {
            Ok(vec![pool("p0"), pool("p1")])
        }
    }

    #[tokio::test]
    async fn renders_every_family() {
        let node = Arc::new(NodeInfo::new("node-a", "sync"));
        let exporter = MetricsExporter::<Scraped>::new(Arc::clone(&node));
        let before = exporter.render().await;
        assert!(before.contains("ballast_ready 0"), "{before}");
        assert!(!before.contains("ballast_pool_capacity_bytes"), "{before}");

        exporter.attach(Arc::new(Scraped));
        node.advance(Phase::Ready);
        let text = exporter.render().await;
        for line in [
            &format!(
                "ballast_build_info{{version=\"{VERSION}\",node=\"node-a\",engine=\"sync\"}} 1"
            ),
            "ballast_ready 1",
            "ballast_volumes 0",
            "ballast_pool_capacity_bytes{pool=\"p0\",path=\"/p0.img\"} 1073741824",
            "ballast_pool_free_bytes{pool=\"p1\",path=\"/p1.img\"} 1072693248",
            "ballast_pool_checksum_errors_total{pool=\"p0\",path=\"/p0.img\"} 0",
            "ballast_volume_io_operations_total{volume=\"db\",op=\"read\"} 2",
            "ballast_volume_io_errors_total{volume=\"db\",op=\"read\"} 1",
            "ballast_volume_io_bytes_total{volume=\"db\",op=\"write\"} 8192",
            "ballast_volume_io_latency_seconds_count{volume=\"db\",op=\"read\"} 2",
            "ballast_volume_io_latency_seconds_bucket{le=\"0.00005\",volume=\"db\",op=\"read\"} 1",
            "ballast_volume_io_latency_seconds_bucket{le=\"+Inf\",volume=\"db\",op=\"read\"} 2",
            "ballast_volume_checksum_errors_total{volume=\"db\"} 0",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
