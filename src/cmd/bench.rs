//! `rlhf bench …`: timed kernels with warm-up and a median over several runs.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// This machine's f32 FMA peak.
    Peak,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Peak => anyhow::bail!("not built yet"),
    }
}
