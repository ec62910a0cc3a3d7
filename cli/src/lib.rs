//! The `ballast` command-line client: the commands that talk to a running daemon's local API
//! (`volume …`, `pool list`, `status`, `node list`).
//!
//! - [`args`]: the command line (clap);
//! - [`client`]: the HTTP client of the local API on its unix socket, and [`ClientError`];
//! - [`commands`], [`mount`]: what each command sends and how its answer is rendered;
//! - [`table`]: aligned text output; [`exit_code`]: the stable exit codes.
//!
//! Depends only on the `api` crate (names, sizes, statuses and the [`api::http`] bodies): the
//! client knows the daemon only through its API.

pub mod args;
pub mod client;
pub mod commands;
pub mod exit_code;
pub mod mount;
pub mod table;

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

pub use client::{ApiClient, ClientError};

use args::{ClientCommand, VolumeCommand};

/// Run one client command against the daemon at `socket`: print its output on standard
/// output, or its error (and a hint, when there is one) on standard error, and return the
/// command's exit code.
pub fn run(command: ClientCommand, socket: &Path) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit_code::GENERIC);
        }
    };
    let client = ApiClient::new(socket);
    let result: Result<String, ClientError> = runtime.block_on(async {
        match command {
            ClientCommand::Volume(VolumeCommand::Inspect {
                name,
                watch: true,
                output,
            }) => {
                let tty = std::io::stdout().is_terminal();
                let mut emit = |frame: &str| {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(frame.as_bytes());
                    let _ = out.flush();
                };
                commands::watch_volume(&client, &name, output.format, tty, &mut emit).await
            }
            ClientCommand::Volume(c) => commands::volume(&client, c).await,
            ClientCommand::Snapshot(c) => commands::snapshot(&client, c).await,
            ClientCommand::Pool(c) => commands::pool(&client, c).await,
            ClientCommand::Status(o) => commands::status(&client, o.format).await,
            ClientCommand::Node(c) => commands::node(&client, c).await,
        }
    });
    match result {
        Ok(output) => {
            // A closed pipe (`ballast volume list | head -1`) is not an error of ours.
            let _ = std::io::stdout().lock().write_all(output.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", api::error_chain(&e));
            if let Some(hint) = commands::hint(&e) {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(exit_code::for_error(&e))
        }
    }
}
