//! The built-in instruction world, the simulated labeler, corpora and the JSON Lines dataset
//! formats the RLHF stages read (see issue 5).
//!
//! - [`world`]: task families with programmatic reference answers, decline families, the fixed
//!   instruction format, and train / held-out splits fixed by a seed.
//! - [`labeler`]: scores for any (prompt, response) and noisy Plackett-Luce rankings calibrated to
//!   73% inter-labeler agreement.
//! - [`responses`]: perturbations of reference answers, the candidates comparison data ranks.
//! - [`corpus`]: the pretraining corpus generator and a streaming UTF-8 text reader.
//! - [`formats`]: demonstrations, pairwise, HH-RLHF, K-wise and prompt records in `.jsonl` /
//!   `.jsonl.gz`, with format detection and file:line errors.
//! - [`generate`] and [`stats`]: what `rlhf data generate` and `rlhf data stats` do.
//!
//! Every random choice goes through [`rng::Rng`], seeded by the caller: the same seeds give
//! byte-identical datasets. Nothing here depends on the tensor engine.

pub mod corpus;
pub mod error;
pub mod formats;
pub mod generate;
pub mod labeler;
pub mod responses;
pub mod rng;
pub mod stats;
pub mod world;

pub use error::{DataError, Result};
pub use formats::{Format, ReadOptions, Record};
pub use labeler::{Judgement, Labeler};
pub use rng::Rng;
pub use world::{Family, Prompt, Split, World};
