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

/// The pure rule of a fan-out: `answers[i]` is child `i`'s.
pub fn decide(answers: &[Answer]) -> Decision {
    if let Some(i) = answers.iter().position(|a| *a == Answer::Fenced) {
        return Decision::Fenced { from: i };
    }
    if let Some(i) = answers.iter().position(|a| *a == Answer::Caller) {
        return Decision::Fail { from: i };
    }
    let failed: Vec<usize> = (0..answers.len())
        .filter(|&i| answers[i] == Answer::Failed)
        .collect();
    if failed.len() == answers.len() {
        // Nobody took it: keep every child (ejecting all would lose the volume).
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
        assert_eq!(decide(&[Good, Good, Good]), Decision::Ack { eject: vec![] });
    }

    #[test]
    fn failed_children_are_ejected_while_one_took_the_write() {
        assert_eq!(
            decide(&[Good, Failed, Failed]),
            Decision::Ack { eject: vec![1, 2] }
        );
        assert_eq!(decide(&[Failed, Good]), Decision::Ack { eject: vec![0] });
    }

    #[test]
    fn nobody_is_ejected_when_every_child_failed() {
        assert_eq!(decide(&[Failed, Failed]), Decision::Fail { from: 0 });
    }

    #[test]
    fn caller_errors_eject_nobody() {
        assert_eq!(decide(&[Good, Caller, Failed]), Decision::Fail { from: 1 });
    }

    #[test]
    fn fencing_wins_over_everything() {
        assert_eq!(
            decide(&[Failed, Caller, Fenced]),
            Decision::Fenced { from: 2 }
        );
    }
}
