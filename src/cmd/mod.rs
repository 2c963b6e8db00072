//! One module per subcommand.

pub mod bench;
pub mod data;
pub mod inspect;
