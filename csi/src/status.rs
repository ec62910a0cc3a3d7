//! The one mapping from Ballast errors to gRPC status codes, and the per-volume operation
//! locks that make a second concurrent call on one volume `ABORTED`, as the spec asks.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use api::{ControlError, ErrorKind};
use tonic::{Code, Status};

/// The gRPC code of a control-plane error kind.
pub fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::Conflict => Code::AlreadyExists,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Unimplemented => Code::Unimplemented,
        ErrorKind::Unavailable => Code::Unavailable,
        _ => Code::Internal,
    }
}

/// A control-plane error as a gRPC status, with its full message.
pub fn from_control(e: &ControlError) -> Status {
    Status::new(code(e.kind()), e.full_message())
}

/// `INVALID_ARGUMENT` with `message`.
pub fn invalid(message: impl Into<String>) -> Status {
    Status::invalid_argument(message)
}

/// `INVALID_ARGUMENT` for a missing required field.
pub fn missing(field: &str) -> Status {
    Status::invalid_argument(format!("{field} is required"))
}

/// Volumes with an operation in progress.
#[derive(Debug, Default)]
pub struct OpLocks {
    busy: Mutex<HashSet<String>>,
}

/// Held while an operation on one volume runs; releases it when dropped.
#[derive(Debug)]
pub struct OpGuard {
    locks: Arc<OpLocks>,
    volume: String,
}

impl OpLocks {
    /// Take `volume` for one operation, or `ABORTED` if another is running on it.
    pub fn acquire(self: &Arc<Self>, volume: &str) -> Result<OpGuard, Status> {
        let mut busy = self.busy.lock().expect("op locks");
        if !busy.insert(volume.to_owned()) {
            return Err(Status::aborted(format!(
                "an operation on volume {volume} is already in progress; retry when it finishes"
            )));
        }
        Ok(OpGuard {
            locks: Arc::clone(self),
            volume: volume.to_owned(),
        })
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.locks
            .busy
            .lock()
            .expect("op locks")
            .remove(&self.volume);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_code() {
        assert_eq!(code(ErrorKind::Conflict), Code::AlreadyExists);
        assert_eq!(code(ErrorKind::NotFound), Code::NotFound);
        assert_eq!(code(ErrorKind::ResourceExhausted), Code::ResourceExhausted);
        assert_eq!(code(ErrorKind::Internal), Code::Internal);
    }

    #[test]
    fn a_second_operation_on_one_volume_is_aborted_until_the_first_ends() {
        let locks = Arc::new(OpLocks::default());
        let first = locks.acquire("v").unwrap();
        assert_eq!(locks.acquire("v").unwrap_err().code(), Code::Aborted);
        let _other = locks.acquire("w").unwrap();
        drop(first);
        assert!(locks.acquire("v").is_ok());
    }
}
