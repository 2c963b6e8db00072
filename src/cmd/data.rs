//! `rlhf data …`: generate the built-in world's datasets, validate and summarise dataset files,
//! and inspect the world and its simulated labeler.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use rlhf_data::formats::{Format, ReadOptions};
use rlhf_data::generate::{generate, GenerateOptions, Kind};
use rlhf_data::labeler::{measure_agreement, Labeler};
use rlhf_data::stats::{dataset_stats, is_jsonl_path, text_file_stats};
use rlhf_data::{Family, Rng, Split, World};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Write a dataset of the built-in world (JSON Lines; `.gz` compressed by extension).
    Generate(GenerateArgs),
    /// Validate a dataset (`.jsonl`, `.jsonl.gz`) or plain text file and summarise it.
    Stats(StatsArgs),
    /// Measure how often two simulated labelers with independent noise agree on typical pairs.
    Agreement(AgreementArgs),
    /// List the world's task families with an example of each.
    Families {
        /// World seed (decides which questions are held out).
        #[arg(long, default_value_t = 0)]
        world_seed: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Demos,
    Comparisons,
    Prompts,
    Corpus,
}

#[derive(Clone, Copy, ValueEnum)]
enum SplitArg {
    Train,
    HeldoutPrompts,
    HeldoutFamilies,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Demos,
    Pairwise,
    HhRlhf,
    Kwise,
    Prompts,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// What to write: demonstrations, labeler-ranked comparisons, prompts, or pretraining text.
    #[arg(long, value_enum)]
    kind: KindArg,
    /// Number of records (corpus: documents).
    #[arg(long)]
    n: usize,
    /// Seed of the draws; the same seeds give byte-identical files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Seed of the world, which fixes the splits: keep it the same for every file of one run.
    #[arg(long, default_value_t = 0)]
    world_seed: u64,
    /// Split the prompts come from (the corpus always uses training questions).
    #[arg(long, value_enum, default_value = "train")]
    split: SplitArg,
    /// Responses ranked per prompt (comparisons; 2..=9).
    #[arg(long, default_value_t = 4)]
    k: usize,
    /// Write comparisons as pairwise {"prompt","chosen","rejected"} (sets K to 2).
    #[arg(long)]
    pairwise: bool,
    /// Output file.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct StatsArgs {
    /// The file: `.jsonl` / `.jsonl.gz` datasets, anything else is read as UTF-8 text.
    file: PathBuf,
    /// Skip malformed lines (they are counted and the first few listed) instead of failing.
    #[arg(long)]
    skip_invalid: bool,
    /// The dataset format, instead of detecting it from the first record.
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
}

#[derive(Args)]
pub struct AgreementArgs {
    /// Number of comparisons.
    #[arg(long, default_value_t = 2000)]
    n: usize,
    /// Seed of the pairs and of the two labelers' noise.
    #[arg(long, default_value_t = 2024)]
    seed: u64,
    /// World seed.
    #[arg(long, default_value_t = 0)]
    world_seed: u64,
    /// Labeler noise temperature (default: the calibrated one).
    #[arg(long)]
    temperature: Option<f64>,
}

pub fn run(cmd: DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Generate(a) => run_generate(a),
        DataCommand::Stats(a) => run_stats(a),
        DataCommand::Agreement(a) => run_agreement(a),
        DataCommand::Families { world_seed } => run_families(world_seed),
    }
}

fn run_generate(a: GenerateArgs) -> anyhow::Result<()> {
    let kind = match a.kind {
        KindArg::Demos => Kind::Demos,
        KindArg::Comparisons => Kind::Comparisons,
        KindArg::Prompts => Kind::Prompts,
        KindArg::Corpus => Kind::Corpus,
    };
    let split = match a.split {
        SplitArg::Train => Split::Train,
        SplitArg::HeldoutPrompts => Split::HeldOutPrompts,
        SplitArg::HeldoutFamilies => Split::HeldOutFamilies,
    };
    let opts = GenerateOptions {
        kind,
        n: a.n,
        seed: a.seed,
        world_seed: a.world_seed,
        split,
        k: if a.pairwise { 2 } else { a.k },
        pairwise: a.pairwise,
    };
    let written = generate(&opts, &a.out)
        .with_context(|| format!("generating {} into {}", kind.name(), a.out.display()))?;
    let unit = if kind == Kind::Corpus {
        "documents"
    } else {
        "records"
    };
    println!(
        "wrote {written} {unit} ({}, seed {}, world seed {}) to {}",
        kind.name(),
        a.seed,
        a.world_seed,
        a.out.display()
    );
    Ok(())
}

fn run_stats(a: StatsArgs) -> anyhow::Result<()> {
    if is_jsonl_path(&a.file) {
        let format = a.format.map(|f| match f {
            FormatArg::Demos => Format::Demos,
            FormatArg::Pairwise => Format::Pairwise,
            FormatArg::HhRlhf => Format::HhRlhf,
            FormatArg::Kwise => Format::KWise,
            FormatArg::Prompts => Format::Prompts,
        });
        let st = dataset_stats(
            &a.file,
            ReadOptions {
                format,
                skip_invalid: a.skip_invalid,
            },
        )?;
        println!("{st}");
    } else {
        if a.format.is_some() || a.skip_invalid {
            anyhow::bail!(
                "{}: --format and --skip-invalid apply to .jsonl / .jsonl.gz datasets; \
                 this file is read as plain text",
                a.file.display()
            );
        }
        println!("{}", text_file_stats(&a.file)?);
    }
    Ok(())
}

fn run_agreement(a: AgreementArgs) -> anyhow::Result<()> {
    let labeler = match a.temperature {
        Some(t) => Labeler::with_temperature(t)?,
        None => Labeler::new(),
    };
    let world = World::new(a.world_seed);
    let r = measure_agreement(&labeler, &world, a.n, a.seed)?;
    println!(
        "two labelers (temperature {}) agreed on {} of {} comparisons: {:.1}%",
        labeler.temperature(),
        r.agreed,
        r.comparisons,
        100.0 * r.rate()
    );
    Ok(())
}

fn run_families(world_seed: u64) -> anyhow::Result<()> {
    let world = World::new(world_seed);
    let mut rng = Rng::new(0);
    println!("{:<17} {:<17} {:<48} example", "family", "split", "task");
    for family in Family::ALL {
        let split = if family.is_held_out() {
            Split::HeldOutFamilies
        } else {
            Split::Train
        };
        let p = world.sample_prompt_of(family, split, &mut rng)?;
        println!(
            "{:<17} {:<17} {:<48} {:?} -> {:?}",
            family.name(),
            if family.is_held_out() {
                "held-out family"
            } else {
                "train"
            },
            family.description(),
            p.text,
            p.reference
        );
    }
    Ok(())
}
