//! Power cuts of a real daemon's disk: undo what no flush had made durable.
//!
//! A daemon started with [`crate::NodeDir::power_journal`] present (a debug build, or one with
//! the `failpoints` feature) records the old bytes under every write until the write is
//! durable (`volume::io::faults`, which documents the format). After the daemon is killed,
//! [`cut`] models its volatile write cache losing power: each write not yet durable is undone
//! completely, kept, or torn (some of its 4 KiB sectors undone, others kept), newest first.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use crate::workload::Rng;

/// The sector a torn write is torn at.
const SECTOR: usize = 4096;

/// What a power cut did to the writes that were not durable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cut {
    /// Writes not durable when the power went.
    pub pending: u64,
    /// Undone completely.
    pub undone: u64,
    /// Torn: some sectors undone.
    pub torn: u64,
}

/// One segment's old bytes.
struct Old {
    id: u64,
    offset: u64,
    path: String,
    bytes: Vec<u8>,
}

fn parse(journal: &[u8]) -> Result<(Vec<Old>, BTreeSet<u64>)> {
    let (mut olds, mut durable) = (Vec::new(), BTreeSet::new());
    let mut at = 0;
    while at < journal.len() {
        // A record cut short by the kill is the last, of a write never submitted.
        let Some(end) = journal[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|n| at + n)
        else {
            break;
        };
        let line = std::str::from_utf8(&journal[at..end]).context("journal line")?;
        at = end + 1;
        let mut words = line.splitn(5, ' ');
        let num = |w: Option<&str>| -> Result<u64> {
            w.ok_or_else(|| anyhow!("short journal line {line:?}"))?
                .parse()
                .with_context(|| format!("journal line {line:?}"))
        };
        match words.next() {
            Some("D") => {
                durable.insert(num(words.next())?);
            }
            Some("W") => {
                let id = num(words.next())?;
                let offset = num(words.next())?;
                let len = usize::try_from(num(words.next())?)?;
                let path = words
                    .next()
                    .ok_or_else(|| anyhow!("journal line {line:?} names no file"))?
                    .to_owned();
                let Some(bytes) = journal.get(at..at + len).map(<[u8]>::to_vec) else {
                    break;
                };
                at += len;
                olds.push(Old {
                    id,
                    offset,
                    path,
                    bytes,
                });
            }
            _ => bail!("unknown journal line {line:?}"),
        }
    }
    Ok((olds, durable))
}

/// Cut the power of the (killed) daemon whose journal is `journal`: undo its writes that were
/// not durable as `rng` draws (a third each undone, kept, torn), then empty the journal.
///
/// # Errors
/// The journal is malformed, or a file cannot be written.
pub fn cut(journal: &Path, rng: &mut Rng) -> Result<Cut> {
    let text = std::fs::read(journal).with_context(|| format!("reading {}", journal.display()))?;
    let (olds, durable) = parse(&text)?;
    let mut out = Cut::default();
    let mut fate = std::collections::BTreeMap::new();
    for old in olds.iter().rev() {
        if durable.contains(&old.id) {
            continue;
        }
        let f = *fate.entry(old.id).or_insert_with(|| {
            out.pending += 1;
            match rng.below(3) {
                0 => {
                    out.undone += 1;
                    0
                }
                1 => 1,
                _ => {
                    out.torn += 1;
                    2
                }
            }
        });
        if f == 1 {
            continue;
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&old.path)
            .with_context(|| format!("opening {}", old.path))?;
        for (n, sector) in old.bytes.chunks(SECTOR).enumerate() {
            if f == 2 && rng.below(2) == 0 {
                continue;
            }
            file.write_all_at(sector, old.offset + (n * SECTOR) as u64)
                .with_context(|| format!("undoing a write to {}", old.path))?;
        }
        file.sync_all()?;
    }
    std::fs::File::create(journal)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(j: &mut Vec<u8>, id: u64, offset: u64, path: &Path, bytes: &[u8]) {
        j.extend_from_slice(
            format!("W {id} {offset} {} {}\n", bytes.len(), path.display()).as_bytes(),
        );
        j.extend_from_slice(bytes);
    }

    #[test]
    fn a_cut_undoes_only_what_was_not_durable_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data file");
        // Now on disk: write 1 put 1s in sector 0 (durable), writes 2 then 3 put 2s then 3s
        // in sector 1 (not durable).
        let mut now = vec![1u8; SECTOR];
        now.extend_from_slice(&[3u8; SECTOR]);
        std::fs::write(&data, &now).unwrap();
        let mut j = Vec::new();
        record(&mut j, 1, 0, &data, &[0u8; SECTOR]);
        record(&mut j, 2, SECTOR as u64, &data, &[0u8; SECTOR]);
        j.extend_from_slice(b"D 1\n");
        record(&mut j, 3, SECTOR as u64, &data, &[2u8; SECTOR]);
        let journal = dir.path().join("j");
        std::fs::write(&journal, &j).unwrap();
        // Over seeds, each outcome of sector 1 is one a volatile cache allows: 3s (both
        // kept), 2s (3 undone), 0s (both undone); sector 0 is always kept.
        let mut seen = BTreeSet::new();
        for seed in 0..40 {
            std::fs::write(&data, &now).unwrap();
            std::fs::write(&journal, &j).unwrap();
            let cut = cut(&journal, &mut Rng::new(seed)).unwrap();
            assert_eq!(cut.pending, 2);
            let after = std::fs::read(&data).unwrap();
            assert!(
                after[..SECTOR].iter().all(|&b| b == 1),
                "durable write undone"
            );
            let s1 = after[SECTOR];
            assert!(after[SECTOR..].iter().all(|&b| b == s1));
            assert!([0, 2, 3].contains(&s1), "sector 1 holds {s1}");
            seen.insert(s1);
            assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0);
        }
        assert_eq!(seen.len(), 3, "every outcome drawn: {seen:?}");
    }

    #[test]
    fn a_malformed_journal_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("j");
        std::fs::write(&journal, b"X 1\n").unwrap();
        assert!(cut(&journal, &mut Rng::new(1)).is_err());
        std::fs::write(&journal, b"W 1 zero 4096 /nonexistent\n").unwrap();
        assert!(cut(&journal, &mut Rng::new(1)).is_err());
    }

    #[test]
    fn a_record_cut_short_by_the_kill_is_of_a_write_never_made() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("j");
        for tail in [&b"W 1 0 4096 /nonexistent\nshort"[..], b"W 1 0 40"] {
            std::fs::write(&journal, tail).unwrap();
            assert_eq!(cut(&journal, &mut Rng::new(1)).unwrap(), Cut::default());
        }
    }
}
