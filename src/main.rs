//! The `rlhf` command line: one module per subcommand under `cmd/`.

mod cmd;

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
    /// Draw the curves in a metrics file (JSON Lines) to a PNG or SVG image.
    Plot(cmd::plot::PlotArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(c) => cmd::bench::run(c),
        Command::Plot(a) => cmd::plot::run(a),
    }
}
