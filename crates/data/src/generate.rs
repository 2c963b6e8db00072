//! Datasets of the built-in world (`rlhf data generate`).
//!
//! Two seeds: the world seed fixes the splits (which questions are held out), the sampling seed
//! the draws. Keep the world seed fixed across every dataset of one experiment, or a question
//! held out of one file can be a training question of another.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::corpus::CorpusGenerator;
use crate::error::{DataError, Result};
use crate::formats::{Comparison, Demo, JsonlWriter, PromptRecord, Ranked, Record};
use crate::labeler::Labeler;
use crate::responses::{sample_distinct_responses, MAX_K};
use crate::rng::Rng;
use crate::world::{Split, World};

/// What to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `{"prompt","completion"}` with reference completions.
    Demos,
    /// K-wise rankings (or pairwise with `pairwise`) of perturbed responses by the labeler.
    Comparisons,
    /// `{"prompt"}` records.
    Prompts,
    /// Plain-text pretraining documents.
    Corpus,
}

impl Kind {
    /// The kind's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Demos => "demos",
            Kind::Comparisons => "comparisons",
            Kind::Prompts => "prompts",
            Kind::Corpus => "corpus",
        }
    }
}

/// Options of [`generate`].
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub kind: Kind,
    /// Records (for the corpus: documents).
    pub n: usize,
    /// Seed of the draws.
    pub seed: u64,
    /// Seed of the world (the splits).
    pub world_seed: u64,
    /// Split the prompts come from (ignored for the corpus, which only uses training questions).
    pub split: Split,
    /// Responses per prompt for comparisons (2..=9).
    pub k: usize,
    /// Write comparisons as pairwise `{"prompt","chosen","rejected"}` (needs k = 2).
    pub pairwise: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            kind: Kind::Demos,
            n: 1000,
            seed: 0,
            world_seed: 0,
            split: Split::Train,
            k: 4,
            pairwise: false,
        }
    }
}

/// Builds the records of a JSON Lines kind (everything but the corpus).
pub fn records(opts: &GenerateOptions) -> Result<Vec<Record>> {
    let world = World::new(opts.world_seed);
    let mut prompt_rng = Rng::derive(opts.seed, "prompts");
    let prompts = world.sample_prompts(opts.split, opts.n, &mut prompt_rng);
    Ok(match opts.kind {
        Kind::Demos => prompts
            .iter()
            .map(|p| {
                Record::Demo(Demo {
                    prompt: p.formatted(),
                    completion: p.reference_completion(),
                })
            })
            .collect(),
        Kind::Prompts => prompts
            .iter()
            .map(|p| {
                Record::Prompt(PromptRecord {
                    prompt: p.formatted(),
                })
            })
            .collect(),
        Kind::Comparisons => {
            if !(2..=MAX_K).contains(&opts.k) || (opts.pairwise && opts.k != 2) {
                return Err(DataError::invalid(
                    "generate comparisons",
                    format!(
                        "k must be in 2..={MAX_K} (and 2 for pairwise), got k={} pairwise={}",
                        opts.k, opts.pairwise
                    ),
                ));
            }
            let labeler = Labeler::new();
            let mut response_rng = Rng::derive(opts.seed, "responses");
            let mut labeler_rng = Rng::derive(opts.seed, "labeler");
            let mut out = Vec::with_capacity(prompts.len());
            for p in &prompts {
                let responses = sample_distinct_responses(&world, p, opts.k, &mut response_rng)?;
                let ranking = labeler.rank(p, &responses, &mut labeler_rng);
                out.push(if opts.pairwise {
                    // Distinct responses never tie, so one is ranked 1 and the other 2.
                    let (chosen, rejected) = if ranking[0] < ranking[1] {
                        (0, 1)
                    } else {
                        (1, 0)
                    };
                    Record::Comparison(Comparison {
                        prompt: p.formatted(),
                        chosen: responses[chosen].clone(),
                        rejected: responses[rejected].clone(),
                    })
                } else {
                    Record::Ranked(Ranked {
                        prompt: p.formatted(),
                        responses,
                        ranking,
                    })
                });
            }
            out
        }
        Kind::Corpus => {
            return Err(DataError::invalid(
                "generate",
                "the corpus is plain text; use generate() to write it",
            ))
        }
    })
}

/// Writes the dataset to `path` (`.gz` compressed by extension); returns the number of records
/// (documents for the corpus).
pub fn generate(opts: &GenerateOptions, path: impl AsRef<Path>) -> Result<u64> {
    let path = path.as_ref();
    if opts.kind == Kind::Corpus {
        let gen = CorpusGenerator::new(World::new(opts.world_seed));
        let mut rng = Rng::derive(opts.seed, "corpus");
        let file = File::create(path).map_err(|e| DataError::io(path, e))?;
        let io = |e| DataError::io(path, e);
        let out = BufWriter::with_capacity(1 << 16, file);
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gz"))
        {
            let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
            gen.write_documents(opts.n, &mut rng, &mut gz).map_err(io)?;
            gz.finish().map_err(io)?.flush().map_err(io)?;
        } else {
            let mut out = out;
            gen.write_documents(opts.n, &mut rng, &mut out)
                .map_err(io)?;
            out.flush().map_err(io)?;
        }
        return Ok(opts.n as u64);
    }
    let records = records(opts)?;
    let mut w = JsonlWriter::create(path)?;
    for r in &records {
        w.write(r)?;
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labeler::judge;

    #[test]
    fn comparisons_rank_references_high_and_are_deterministic() {
        let opts = GenerateOptions {
            kind: Kind::Comparisons,
            n: 400,
            seed: 3,
            k: 4,
            ..Default::default()
        };
        let a = records(&opts).unwrap();
        assert_eq!(a, records(&opts).unwrap());
        let world = World::new(0);
        // The labeler's top pick beats its bottom pick in score far more often than not.
        let mut agree = 0;
        for r in &a {
            let Record::Ranked(r) = r else {
                panic!("kwise")
            };
            let p = world.parse(&r.prompt).unwrap();
            let best = r.ranking.iter().position(|&x| x == 1).unwrap();
            let worst = r.ranking.iter().position(|&x| x == 4).unwrap();
            agree += usize::from(
                judge(&p, &r.responses[best]).score >= judge(&p, &r.responses[worst]).score,
            );
        }
        assert!(agree > 340, "{agree}/400");
        let pairwise = GenerateOptions {
            pairwise: true,
            k: 2,
            ..opts.clone()
        };
        assert!(matches!(
            records(&pairwise).unwrap()[0],
            Record::Comparison(_)
        ));
        let bad = GenerateOptions { k: 3, ..pairwise };
        assert!(records(&bad).is_err());
    }

    #[test]
    fn training_data_never_holds_held_out_questions() {
        let world = World::new(0);
        for kind in [Kind::Demos, Kind::Comparisons, Kind::Prompts] {
            let opts = GenerateOptions {
                kind,
                n: 500,
                seed: 1,
                ..Default::default()
            };
            for r in records(&opts).unwrap() {
                let p = world.parse(&r.prompt().unwrap()).unwrap();
                assert_eq!(p.split, Split::Train);
            }
        }
    }
}
