//! Shared by the property suites (prop_algebra.rs, prop_gradients.rs): proptest configuration
//! and a runner usable from plain, rustfmt-formatted functions.

use proptest::prelude::*;
use proptest::test_runner::TestRunner;

/// `cases` per property, unless `PROPTEST_CASES` asks for another count (a long soak, say).
/// Failing inputs are saved beside `source_file` (the caller's `file!()`) and replayed first on
/// later runs.
pub fn config_for(source_file: &'static str, cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        source_file: Some(source_file),
        // Each case is cheap, but shrinking a failure through many cases is not: keep the
        // failure report fast.
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    }
}

/// Runs `test` on values drawn from `strategy` under `config`, shrinking a failure to a
/// minimal input, as the `proptest!` macro does (but in plain Rust that rustfmt lays out).
pub fn run<S: Strategy>(
    config: ProptestConfig,
    strategy: &S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    if let Err(e) = TestRunner::new(config).run(strategy, test) {
        panic!("{e}");
    }
}
