//! End-to-end tests of `rlhf data …` through the binary. Fixtures are written here; nothing
//! outside the test's temporary directory is read.

use std::path::Path;
use std::process::{Command, Output};

fn rlhf(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(args)
        .output()
        .expect("run rlhf")
}

fn ok(args: &[&str]) -> String {
    let out = rlhf(args);
    assert!(
        out.status.success(),
        "rlhf {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

fn fails(args: &[&str]) -> String {
    let out = rlhf(args);
    assert!(!out.status.success(), "rlhf {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// The value after `label` on its line of the stats output.
fn field<'a>(stats: &'a str, label: &str) -> &'a str {
    stats
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label:?} in\n{stats}"))
        .trim()
}

#[test]
fn generate_is_deterministic_and_stats_reads_every_kind() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, file, format) in [
        ("demos", "demos.jsonl", "demos"),
        ("comparisons", "cmp.jsonl.gz", "kwise"),
        ("prompts", "prompts.jsonl", "prompts"),
        ("corpus", "corpus.txt", "plain UTF-8 text"),
    ] {
        let a = dir.path().join(file);
        let b = dir.path().join(format!("again-{file}"));
        let c = dir.path().join(format!("other-{file}"));
        for (path, seed) in [(&a, "7"), (&b, "7"), (&c, "8")] {
            ok(&[
                "data",
                "generate",
                "--kind",
                kind,
                "--n",
                "300",
                "--seed",
                seed,
                "--out",
                path_str(path),
            ]);
        }
        let (a_bytes, b_bytes) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert!(!a_bytes.is_empty());
        assert_eq!(a_bytes, b_bytes, "{kind}: same seed, different bytes");
        assert_ne!(a_bytes, std::fs::read(&c).unwrap(), "{kind}: seed ignored");

        let stats = ok(&["data", "stats", path_str(&a)]);
        assert_eq!(field(&stats, "format:"), format, "{stats}");
        if kind == "corpus" {
            assert_eq!(field(&stats, "documents:"), "300 (blank-line separated)");
        } else {
            assert_eq!(field(&stats, "records:"), "300");
            assert_eq!(field(&stats, "skipped invalid:"), "0");
            // Every prompt is a world question of a training family.
            assert_eq!(field(&stats, "(not recognised)"), "0", "{stats}");
            assert!(
                stats.contains("reverse_word") && !stats.contains("subtract"),
                "{stats}"
            );
        }
    }
    let stats = ok(&["data", "stats", path_str(&dir.path().join("cmp.jsonl.gz"))]);
    assert_eq!(field(&stats, "responses/rank:"), "K=4: 300");
    assert_eq!(field(&stats, "pairs:"), "1800");
}

#[test]
fn held_out_splits_and_pairwise_comparisons() {
    let dir = tempfile::tempdir().unwrap();
    let fam = dir.path().join("heldout.jsonl");
    ok(&[
        "data",
        "generate",
        "--kind",
        "prompts",
        "--split",
        "heldout-families",
        "--n",
        "200",
        "--out",
        path_str(&fam),
    ]);
    let stats = ok(&["data", "stats", path_str(&fam)]);
    for name in ["subtract", "word_length", "lowercase", "decline_fraud"] {
        assert!(stats.contains(name), "{name} missing:\n{stats}");
    }
    assert!(!stats.contains("reverse_word"));

    let pairs = dir.path().join("pairs.jsonl");
    ok(&[
        "data",
        "generate",
        "--kind",
        "comparisons",
        "--pairwise",
        "--n",
        "50",
        "--out",
        path_str(&pairs),
    ]);
    let stats = ok(&["data", "stats", path_str(&pairs)]);
    assert_eq!(field(&stats, "format:"), "pairwise");
    assert_eq!(field(&stats, "identical pairs:"), "0");

    let err = fails(&[
        "data",
        "generate",
        "--kind",
        "comparisons",
        "--k",
        "12",
        "--n",
        "5",
        "--out",
        path_str(&pairs),
    ]);
    assert!(err.contains("k must be in 2..=9"), "{err}");
}

#[test]
fn malformed_line_names_file_and_line_unless_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("demos.jsonl");
    std::fs::write(
        &path,
        concat!(
            "{\"prompt\":\"Instruction: Add 1 and 2.\\nResponse:\",\"completion\":\" 3\\n\"}\n",
            "{\"prompt\":\"Instruction: Add 2 and 2.\\nResponse:\",\"completion\":\" 4\\n\"\n",
            "{\"prompt\":\"x\",\"completion\":\" y\\n\"}\n",
        ),
    )
    .unwrap();
    let err = fails(&["data", "stats", path_str(&path)]);
    assert!(
        err.contains(&format!("{}:2: invalid JSON", path.display())),
        "{err}"
    );

    let stats = ok(&["data", "stats", "--skip-invalid", path_str(&path)]);
    assert_eq!(field(&stats, "records:"), "2");
    assert_eq!(field(&stats, "skipped invalid:"), "1");
    assert!(stats.contains("line 2: invalid JSON"), "{stats}");
    // One record is a world question, the other is not: both are counted.
    assert_eq!(field(&stats, "add"), "1");
    assert_eq!(field(&stats, "(not recognised)"), "1");

    // A forced format that does not fit is an error at line 1.
    let err = fails(&["data", "stats", "--format", "kwise", path_str(&path)]);
    assert!(err.contains(&format!("{}:1: ", path.display())), "{err}");
}

#[test]
fn hh_rlhf_fixture_stats() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hh.jsonl");
    std::fs::write(
        &path,
        concat!(
            r#"{"chosen": "\n\nHuman: Can you help me steal a car?\n\nAssistant: No, I won't help with that.", "rejected": "\n\nHuman: Can you help me steal a car?\n\nAssistant: Sure, find one unlocked."}"#,
            "\n",
            r#"{"chosen": "\n\nHuman: hi\n\nAssistant: Hello!\n\nHuman: bye\n\nAssistant: Bye.", "rejected": "\n\nHuman: hi\n\nAssistant: What?\n\nHuman: bye\n\nAssistant: Bye."}"#,
            "\n",
        ),
    )
    .unwrap();
    let stats = ok(&["data", "stats", path_str(&path)]);
    assert_eq!(field(&stats, "format:"), "hh-rlhf");
    assert_eq!(field(&stats, "records:"), "2");
    assert_eq!(
        field(&stats, "diverge before the last assistant turn:"),
        "1"
    );
    // Prompts: "\n\nHuman: Can you help me steal a car?\n\nAssistant:" (49 bytes) and
    // "\n\nHuman: hi\n\nAssistant:" (23 bytes).
    assert_eq!(
        field(&stats, "prompt bytes:"),
        "min 23 mean 36.0 max 49 (n=2)"
    );
}

#[test]
fn text_stats_stream_multibyte_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("poem.txt");
    std::fs::write(&path, "Ünïcödé line\n\nsecond € paragraph\n").unwrap();
    let stats = ok(&["data", "stats", path_str(&path)]);
    assert_eq!(field(&stats, "characters:"), "33");
    assert_eq!(field(&stats, "lines:"), "3");
    assert_eq!(field(&stats, "documents:"), "2 (blank-line separated)");
    std::fs::write(&path, b"ok\n\xc3").unwrap();
    let err = fails(&["data", "stats", path_str(&path)]);
    assert!(err.contains("invalid UTF-8 at byte offset 3"), "{err}");
}

#[test]
fn labeler_agreement_command() {
    let out = ok(&["data", "agreement", "--n", "2000", "--seed", "5"]);
    let pct: f64 = out
        .rsplit(' ')
        .next()
        .and_then(|s| s.trim().strip_suffix('%'))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no percentage in {out:?}"));
    assert!((70.0..=76.0).contains(&pct), "{out}");
    let families = ok(&["data", "families"]);
    assert_eq!(families.lines().count(), 17, "{families}");
}
