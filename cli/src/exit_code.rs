//! The CLI's exit codes: the one mapping from client failures to process exit statuses.
//!
//! Scripts rely on these, so they are stable and documented in `ballast --help`:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | generic or internal error (including daemon errors without a code of their own) |
//! | 2 | usage error (clap: bad flags or arguments) |
//! | 3 | the daemon is not reachable on its API socket |
//! | 4 | not found |
//! | 5 | conflict |
//! | 6 | invalid argument (from the CLI's own validation or from the daemon) |

use ::api::ErrorKind;

use crate::client::ClientError;

/// Success.
pub const SUCCESS: u8 = 0;
/// A generic or internal error.
pub const GENERIC: u8 = 1;
/// A usage error; clap exits with this code itself.
pub const USAGE: u8 = 2;
/// The daemon is not reachable.
pub const NOT_REACHABLE: u8 = 3;
/// The named volume (or pool) does not exist.
pub const NOT_FOUND: u8 = 4;
/// The request conflicts with existing state.
pub const CONFLICT: u8 = 5;
/// A bad name, size or option.
pub const INVALID_ARGUMENT: u8 = 6;

/// The exit code for a failed command.
pub fn for_error(err: &ClientError) -> u8 {
    match err {
        ClientError::NotRunning { .. } | ClientError::PermissionDenied { .. } => NOT_REACHABLE,
        ClientError::InvalidArgument(_) => INVALID_ARGUMENT,
        ClientError::Api { code, .. } => match parse_kind(code) {
            Some(ErrorKind::NotFound) => NOT_FOUND,
            Some(ErrorKind::Conflict) => CONFLICT,
            Some(ErrorKind::InvalidArgument) => INVALID_ARGUMENT,
            _ => GENERIC,
        },
        ClientError::Timeout { .. } | ClientError::Protocol { .. } => GENERIC,
    }
}

/// The [`ErrorKind`] whose wire code is `code`, if any.
pub fn parse_kind(code: &str) -> Option<ErrorKind> {
    serde_json::from_value(serde_json::Value::String(code.to_owned())).ok()
}

#[cfg(test)]
mod tests {
    use hyper::StatusCode;

    use super::*;

    fn api(code: &str) -> ClientError {
        ClientError::Api {
            status: StatusCode::BAD_REQUEST,
            code: code.into(),
            message: String::new(),
        }
    }

    #[test]
    fn codes_are_stable() {
        assert_eq!(for_error(&api("not_found")), 4);
        assert_eq!(for_error(&api("conflict")), 5);
        assert_eq!(for_error(&api("invalid_argument")), 6);
        assert_eq!(for_error(&api("internal")), 1);
        assert_eq!(for_error(&api("something_new")), 1);
        assert_eq!(for_error(&ClientError::InvalidArgument("x".into())), 6);
        let not_running = ClientError::NotRunning {
            socket: "/x".into(),
            source: std::io::ErrorKind::NotFound.into(),
        };
        assert_eq!(for_error(&not_running), 3);
        for kind in [
            ErrorKind::NotFound,
            ErrorKind::Conflict,
            ErrorKind::ResourceExhausted,
        ] {
            assert_eq!(parse_kind(kind.code()), Some(kind));
        }
    }
}
