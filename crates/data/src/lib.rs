//! The built-in instruction world, the simulated labeler, corpora and the JSON Lines dataset
//! formats the RLHF stages read (see issue 5).
