//! The `rlhf` command line: one module per subcommand under `cmd/`.

mod cmd;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rlhf",
    version,
    about = "InstructGPT-style RLHF on a from-scratch tensor engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks of the engine's kernels.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
    /// Lists a safetensors file's tensors (name, dtype, shape, bytes), totals and metadata.
    Inspect {
        /// The .safetensors file.
        file: PathBuf,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Train a GPT on next-token prediction (a text file or the built-in corpus).
    Pretrain(cmd::pretrain::PretrainArgs),
    /// Sample continuations from a checkpoint.
    Generate(cmd::generate::GenerateArgs),
    /// Datasets: the built-in instruction world, its labeler, and JSON Lines files.
    #[command(subcommand)]
    Data(cmd::data::DataCommand),
    /// Draw the curves in a metrics file (JSON Lines) to a PNG or SVG image.
    Plot(cmd::plot::PlotArgs),
}

fn main() -> std::process::ExitCode {
    restore_sigpipe();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(c) => cmd::bench::run(c),
        Command::Inspect { file, json } => cmd::inspect::run(&file, json),
        Command::Data(c) => cmd::data::run(c),
        Command::Pretrain(a) => cmd::pretrain::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Plot(a) => cmd::plot::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The message and its causes, one per line; no stack trace (RUST_BACKTRACE is for
            // debugging panics, not for telling a user which file or device was wrong).
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// Rust starts programs with SIGPIPE ignored, so writing to a pipe whose reader has gone
/// (`rlhf inspect big.safetensors | head`) makes `println!` panic. A command-line tool should
/// end quietly there, as Unix tools do: restore the default disposition.
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: signal(2) with a valid signal number and SIG_DFL, before any other thread exists
    // (nothing else is changing signal dispositions concurrently).
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
