//! Reconciliation at attach: the healthy children agree where a writer that died mid-write
//! left them different.

use std::sync::atomic::Ordering::SeqCst;

use volume::device::BlockDevice;
use volume::device::DeviceError;
use volume::device::Generations;
use volume::device::GENERATION_UNKNOWN;

use super::{check_generations, Nexus};

impl<D: BlockDevice + Clone + Send + Sync + 'static> Nexus<D> {
    /// Make the healthy children agree on every extent and set the next generation above
    /// every one they hold. Run before the first I/O of an attachment: a writer that died
    /// mid-write can leave an unacknowledged write on some children and not others, and crash
    /// recovery leaves extents whose generation is unknown. For each extent that differs, the
    /// child with the newest known generation is copied to the others.
    ///
    /// # Errors
    /// A child failed; the caller should not serve the volume.
    pub async fn reconcile(&self) -> Result<u64, DeviceError> {
        let children = self.readers();
        let mut maps = Vec::with_capacity(children.len());
        for c in &children {
            let g = c.dev.generations().await?;
            check_generations(&c.id, &g)?;
            maps.push(g);
        }
        let top = maps
            .iter()
            .flat_map(|m| m.extents.iter().map(|e| e.generation))
            .filter(|&g| g != GENERATION_UNKNOWN)
            .max()
            .unwrap_or(0);
        {
            let mut s = self.seq.lock().expect("sequencer lock");
            s.next = s.next.max(top + 1);
        }
        if children.len() < 2 {
            return Ok(0);
        }
        let mut extents: Vec<u64> = maps
            .iter()
            .flat_map(|m| m.extents.iter().map(|e| e.extent))
            .collect();
        extents.sort_unstable();
        extents.dedup();
        let lookup = |m: &Generations, e: u64| {
            m.extents
                .binary_search_by_key(&e, |x| x.extent)
                .ok()
                .map(|i| m.extents[i].generation)
        };
        let mut fixed = 0;
        for e in extents {
            let gens: Vec<Option<u64>> = maps.iter().map(|m| lookup(m, e)).collect();
            let agree = gens.iter().all(|g| *g == gens[0]) && gens[0] != Some(GENERATION_UNKNOWN);
            if agree {
                continue;
            }
            // Allocated beats released, a known generation beats an unknown one, newer
            // beats older; the local child (first) wins ties.
            let rank = |g: Option<u64>| match g {
                None => (0, 0),
                Some(GENERATION_UNKNOWN) => (1, 0),
                Some(g) => (2, g),
            };
            let best = (0..gens.len())
                .rev()
                .max_by_key(|&i| rank(gens[i]))
                .unwrap_or(0);
            for (i, c) in children.iter().enumerate() {
                if i != best && (gens[i] != gens[best] || gens[i] == Some(GENERATION_UNKNOWN)) {
                    self.copy_extent(Some(&children[best]), c, e, gens[best])
                        .await?;
                }
            }
            fixed += 1;
        }
        if fixed > 0 {
            self.stats.reconciled_extents.fetch_add(fixed, SeqCst);
            tracing::warn!(volume = %self.name, extents = fixed, "reconciled extents where replicas differed");
        }
        Ok(fixed)
    }
}
