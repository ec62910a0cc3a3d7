//! Seeded fault runs of a real cluster (issue 13; see `integration_tests::chaos`), for
//! `bench/scripts/cluster-chaos.sh`. CI runs the fixed seeds of `tests/tests/cluster_chaos.rs`.
//!
//! ```text
//! cluster-chaos [--trials N] [--first S] [--steps K]   # seeds S..S+N (default 1..=20), K faults each
//! cluster-chaos --seed S [--steps K]                   # replay one seed
//! cluster-chaos --plan [--trials N] [--first S]        # print the schedules, run nothing
//! ```
//!
//! Needs root, etcd and iptables, and `BALLAST_BIN` (or a built `target/debug/ballast`).
//! Prints one line per trial, then the table; exits 1 if any trial failed.

use std::process::ExitCode;

use integration_tests::chaos::{self, Plan};

fn main() -> ExitCode {
    let mut trials = 20u64;
    let mut first = 1u64;
    let mut steps = 6usize;
    let mut plan_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage(&format!("{a} needs a number")))
        };
        match a.as_str() {
            "--trials" => trials = value(),
            "--first" => first = value(),
            "--steps" => steps = usize::try_from(value()).unwrap_or(6),
            "--plan" => plan_only = true,
            "--seed" => {
                first = value();
                trials = 1;
            }
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    let mut outcomes = Vec::new();
    for seed in first..first + trials {
        eprintln!("{}", Plan::from_seed(seed, steps).describe());
        if plan_only {
            continue;
        }
        let started = std::time::Instant::now();
        let o = chaos::run(seed, steps);
        println!(
            "seed {seed}: {} in {:.0?}: {} acked, {} checked, {} lost, {} wrong, {} stale reads, {} application errors, {} zombie acks{}",
            if o.ok() { "ok" } else { "FAILED" },
            started.elapsed(),
            o.acked,
            o.checked,
            o.lost,
            o.wrong,
            o.stale_reads,
            o.app_errors,
            o.zombie_acks,
            o.failure.as_ref().map(|f| format!("; {f}")).unwrap_or_default()
        );
        if !o.ok() {
            for d in &o.details {
                println!("  {d}");
            }
            println!("  replay: {}", chaos::replay_command(seed, steps));
        }
        outcomes.push(o);
    }
    if plan_only {
        return ExitCode::SUCCESS;
    }
    println!("\n{}", chaos::table(&outcomes));
    if outcomes.iter().all(chaos::Outcome::ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn usage(why: &str) -> ! {
    eprintln!("cluster-chaos: {why}\nusage: cluster-chaos [--trials N] [--first S] [--steps K] | --seed S [--steps K] | --plan [--trials N] [--first S]");
    std::process::exit(2)
}
