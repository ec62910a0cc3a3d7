//! The `ballast` binary: parse the command line, then run the daemon or a client command.
//!
//! This is the only place that uses `anyhow`, and the only place that prints errors and
//! chooses exit codes: the daemon exits 1 on any start-up or shutdown failure (after printing
//! one `error: …` line) and 0 after a clean SIGTERM/SIGINT shutdown; client commands exit with
//! the codes of [`daemon::client::exit_code`].

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use daemon::cli::{Cli, Command, VolumeCommand, DEFAULT_API_SOCKET};
use daemon::client::{commands, exit_code, ApiClient, ClientError};
use daemon::config::DaemonConfig;
use daemon::{error_chain, logging, node};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Daemon(args) => match run_daemon(&args, cli.api_socket.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {}", error_chain(&*e));
                ExitCode::FAILURE
            }
        },
        command => {
            let socket = cli
                .api_socket
                .unwrap_or_else(|| PathBuf::from(DEFAULT_API_SOCKET));
            run_client(command, &socket)
        }
    }
}

fn run_daemon(args: &daemon::cli::DaemonArgs, api_socket: Option<&Path>) -> anyhow::Result<()> {
    let cfg = DaemonConfig::resolve(args, api_socket)?;
    logging::init(cfg.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ballast-control")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(node::run(cfg))?;
    tracing::info!("ballast daemon stopped");
    Ok(())
}

fn run_client(command: Command, socket: &Path) -> ExitCode {
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
            Command::Volume(VolumeCommand::Inspect {
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
            Command::Volume(c) => commands::volume(&client, c).await,
            Command::Pool(c) => commands::pool(&client, c).await,
            Command::Status(o) => commands::status(&client, o.format).await,
            Command::Node(c) => commands::node(&client, c).await,
            Command::Daemon(_) => unreachable!("the daemon command is handled by main"),
        }
    });
    match result {
        Ok(output) => {
            // A closed pipe (`ballast volume list | head -1`) is not an error of ours.
            let _ = std::io::stdout().lock().write_all(output.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            if let Some(hint) = commands::hint(&e) {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(exit_code::for_error(&e))
        }
    }
}
