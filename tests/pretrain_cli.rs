//! `rlhf pretrain` and `rlhf generate` end to end on the built-in corpus with the `tiny` preset:
//! metrics are written, the loss falls, a resumed run ends bitwise-identical to an uninterrupted
//! one, and generation from the checkpoint is reproducible.

use std::path::Path;
use std::process::Command;

fn rlhf(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(args)
        .output()
        .expect("run rlhf");
    assert!(
        out.status.success(),
        "rlhf {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn pretrain(out: &Path, steps: &str, extra: &[&str]) {
    let mut args = vec![
        "pretrain",
        "--preset",
        "tiny",
        "--batch",
        "4",
        "--seq",
        "32",
        "--corpus-docs",
        "1500",
        "--lr",
        "3e-3",
        "--warmup",
        "5",
        "--save-every",
        "10",
        "--eval-every",
        "10",
        "--quiet",
        "--sample-tokens",
        "0",
        "--threads",
        "2",
        "--steps",
        steps,
        "--out",
    ];
    args.push(out.to_str().unwrap());
    args.extend_from_slice(extra);
    rlhf(&args);
}

#[test]
fn pretrain_resume_and_generate() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    pretrain(&a, "30", &[]);
    let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 30);
    let first = lines[0]["loss"].as_f64().unwrap();
    let last = lines[29]["loss"].as_f64().unwrap();
    assert!(last < first - 0.5, "loss {first} -> {last}");
    assert!(lines[9]["heldout_loss"].is_number() && lines[29]["heldout_loss"].is_number());

    // Stop at 10, resume to 30: the final weights are the same bytes.
    pretrain(&b, "30", &["--stop-at", "10"]);
    let saved = dir.path().join("b10");
    std::fs::rename(b.join("checkpoint"), &saved).unwrap();
    rlhf(&[
        "pretrain",
        "--resume",
        saved.to_str().unwrap(),
        "--steps",
        "30",
        "--out",
        b.to_str().unwrap(),
        "--quiet",
        "--sample-tokens",
        "0",
        "--threads",
        "2",
    ]);
    let wa = std::fs::read(a.join("checkpoint/model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("checkpoint/model.safetensors")).unwrap();
    assert!(
        wa == wb,
        "resumed weights differ from the uninterrupted run"
    );

    let ck = a.join("checkpoint");
    let gen = |seed: &str| {
        let out = rlhf(&[
            "generate",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--prompt",
            "The ",
            "--max-tokens",
            "20",
            "--seed",
            seed,
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v
    };
    let (g1, g2) = (gen("1"), gen("1"));
    assert_eq!(g1, g2);
    assert!(g1["tokens"].as_array().unwrap().len() <= 20);
    assert_eq!(
        g1["tokens"].as_array().unwrap().len(),
        g1["logprobs"].as_array().unwrap().len()
    );

    // Bad input: a missing checkpoint is an error naming it.
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args([
            "generate",
            "--checkpoint",
            "/nonexistent/ck",
            "--prompt",
            "x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ck"));
}
