//! The pure rules of a fan-out: how each child's answer counts, and what the nexus does.

use volume::device::{DeviceError, DeviceErrorKind};

/// How one child's answer counts in a fan-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// It has the data.
    Ok,
    /// An error every child would give (the request is bad).
    Caller,
    /// A newer attachment owns the volume.
    Fenced,
    /// The child failed on its own.
    Failed,
}

impl Answer {
    /// Classify a device error.
    pub fn of(e: &DeviceError) -> Self {
        match e.kind {
            DeviceErrorKind::Unaligned | DeviceErrorKind::OutOfRange => Answer::Caller,
            DeviceErrorKind::Fenced => Answer::Fenced,
            _ => Answer::Failed,
        }
    }
}

/// What to do after a fan-out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Acknowledge, after committing the ejection of these children (indexes).
    Ack { eject: Vec<usize> },
    /// Fail with the error of this child (index); eject nobody.
    Fail { from: usize },
    /// The volume was taken over: fail this and every later request.
    Fenced { from: usize },
}

/// The pure rule of a fan-out: `answers[i]` is child `i`'s, and `complete[i]` says whether
/// child `i` holds the whole volume (healthy), not only what a rebuild copied so far.
///
/// A write counts as taken only once a complete child took it: a rebuilding child alone is
/// not a copy of the volume, and ejecting the last complete one in its favour would leave
/// no replica that can serve it.
pub fn decide(answers: &[Answer], complete: &[bool]) -> Decision {
    if let Some(i) = answers.iter().position(|a| *a == Answer::Fenced) {
        return Decision::Fenced { from: i };
    }
    if let Some(i) = answers.iter().position(|a| *a == Answer::Caller) {
        return Decision::Fail { from: i };
    }
    let failed: Vec<usize> = (0..answers.len())
        .filter(|&i| answers[i] == Answer::Failed)
        .collect();
    let taken = (0..answers.len()).any(|i| answers[i] == Answer::Ok && complete[i]);
    if !taken {
        // No complete child took it: keep every child (ejecting them would lose the volume).
        return Decision::Fail {
            from: failed.first().copied().unwrap_or(0),
        };
    }
    Decision::Ack { eject: failed }
}

#[cfg(test)]
mod tests {
    use super::*;

    use Answer::{Caller, Failed, Fenced, Ok as Good};

    #[test]
    fn all_good_acks_without_ejection() {
        assert_eq!(
            decide(&[Good, Good, Good], &[true; 3]),
            Decision::Ack { eject: vec![] }
        );
    }

    #[test]
    fn failed_children_are_ejected_while_one_took_the_write() {
        assert_eq!(
            decide(&[Good, Failed, Failed], &[true; 3]),
            Decision::Ack { eject: vec![1, 2] }
        );
        assert_eq!(
            decide(&[Failed, Good], &[true; 2]),
            Decision::Ack { eject: vec![0] }
        );
    }

    #[test]
    fn nobody_is_ejected_when_every_child_failed() {
        assert_eq!(
            decide(&[Failed, Failed], &[true; 2]),
            Decision::Fail { from: 0 }
        );
    }

    /// Found by the cluster fault runs (seed 22): the last healthy replica's disk failed a
    /// write that a rebuilding replica took; the healthy one was ejected, and no replica
    /// could serve the volume any more.
    #[test]
    fn a_rebuilding_child_alone_does_not_take_a_write() {
        assert_eq!(
            decide(&[Failed, Good], &[true, false]),
            Decision::Fail { from: 0 }
        );
        assert_eq!(
            decide(&[Good, Failed], &[true, false]),
            Decision::Ack { eject: vec![1] }
        );
    }

    #[test]
    fn caller_errors_eject_nobody() {
        assert_eq!(
            decide(&[Good, Caller, Failed], &[true; 3]),
            Decision::Fail { from: 1 }
        );
    }

    #[test]
    fn fencing_wins_over_everything() {
        assert_eq!(
            decide(&[Failed, Caller, Fenced], &[true; 3]),
            Decision::Fenced { from: 2 }
        );
    }
}
