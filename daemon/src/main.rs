//! The `ballast` binary: parse the command line, then run the daemon or a client command.
//!
//! This is the only place that uses `anyhow`, and the only place that prints errors and
//! chooses exit codes: the daemon exits 1 on any start-up or shutdown failure (after printing
//! one `error: …` line) and 0 after a clean SIGTERM/SIGINT shutdown; client commands exit with
//! the codes of [`cli::exit_code`], through [`cli::run`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use daemon::cli::{Cli, Command};
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
        Command::Holder {
            socket,
            mountpoint,
            give_up_after,
            standing,
        } => {
            let limit = std::time::Duration::from_secs(give_up_after);
            match frontends::attach::holder::run(&socket, &mountpoint, limit, standing) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: the FUSE descriptor holder: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ca(daemon::cli::CaCommand::Init { dir }) => {
            report(daemon::certs::ca_init(&dir).map(|[cert, key]| {
                format!(
                    "wrote {} (give it to every node as --tls-ca) and {} (keep it secret)",
                    cert.display(),
                    key.display()
                )
            }))
        }
        Command::Cert(daemon::cli::CertCommand::Issue {
            node,
            client,
            address,
            ca_dir,
            out_dir,
            days,
        }) => report(match (node, client) {
            (Some(node), _) => daemon::certs::cert_issue(&node, &address, &ca_dir, &out_dir, days)
                .map(|[cert, key]| {
                    format!(
                        "wrote {} (--tls-cert) and {} (--tls-key) for node {node}",
                        cert.display(),
                        key.display()
                    )
                }),
            (None, Some(client)) => daemon::certs::client_issue(&client, &ca_dir, &out_dir, days)
                .map(|_| {
                    format!(
                        "wrote NBD client {client}'s CA, certificate and key in {} (qemu: \
                         --object tls-creds-x509,id=tls0,endpoint=client,dir={0}; libnbd: \
                         nbds://HOST/NAME?tls-certificates={0})",
                        out_dir.display()
                    )
                }),
            (None, None) => Err(anyhow::anyhow!("give --node NAME or --client NAME")),
        }),
        Command::Client(command) => {
            let socket = cli
                .api_socket
                .unwrap_or_else(|| PathBuf::from(::cli::args::DEFAULT_API_SOCKET));
            ::cli::run(command, &socket)
        }
    }
}

/// Print what a local command did, or its error (exit 1).
fn report(done: anyhow::Result<String>) -> ExitCode {
    match done {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", error_chain(&*e));
            ExitCode::FAILURE
        }
    }
}

fn run_daemon(args: &daemon::cli::DaemonArgs, api_socket: Option<&Path>) -> anyhow::Result<()> {
    let cfg = DaemonConfig::resolve(args, api_socket)?;
    logging::init(cfg.log_format);
    if let Err(e) = frontends::attach::raise_fd_limit() {
        tracing::warn!(error = %e, "cannot raise the open-descriptor limit");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ballast-control")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(node::run(cfg))?;
    tracing::info!("ballast daemon stopped");
    Ok(())
}
