//! One module per subcommand.

pub mod bench;
pub mod bench_attention;
pub mod bench_model;
pub mod common;
pub mod data;
pub mod generate;
pub mod inspect;
pub mod plot;
pub mod pretrain;
