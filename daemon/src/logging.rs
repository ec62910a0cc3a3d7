//! Log output of the daemon, through `tracing`.
//!
//! Logs go to standard error: human-readable lines by default, one JSON object per line with
//! `--log-format json` (for log shippers). Colours are used only when standard error is a
//! terminal. `RUST_LOG` selects what is logged, with the usual
//! `tracing_subscriber::EnvFilter` syntax; without it, `info` and above are logged, except
//! rustls's warnings about what a peer sent (clients such as qemu send an IP address as the
//! TLS server name; the daemon logs the handshakes that fail itself).
//!
//! Invariant: [`init`] installs the global subscriber at most once per process.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// The filter used when `RUST_LOG` is unset or empty.
const DEFAULT_FILTER: &str = "info,rustls=error";

/// Install the global subscriber. A second call, or an invalid `RUST_LOG` directive, is
/// reported on standard error and otherwise ignored; logging must never stop the daemon.
pub fn init(format: LogFormat) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            eprintln!("warning: ignoring invalid RUST_LOG {spec:?}: {e}");
            EnvFilter::new(DEFAULT_FILTER)
        }),
        _ => EnvFilter::new(DEFAULT_FILTER),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    if let Err(e) = result {
        eprintln!("warning: logging was already initialised: {e}");
    }
}
