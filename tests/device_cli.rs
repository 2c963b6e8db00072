//! `--device` and `--precision` through the CLI on a machine without a GPU: asking for one is
//! a clear error with a non-zero exit (never a panic), bad values are usage errors, and the
//! CPU paths (including the new `bench attention`) keep working and report their device.

use std::process::{Command, Output};

fn rlhf(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run rlhf")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `args` and expects a clean failure whose message contains `want`.
fn fails_with(args: &[&str], want: &str) {
    let o = rlhf(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "rlhf {args:?} succeeded");
    assert_eq!(
        o.status.code(),
        Some(if want.starts_with("invalid value") {
            2
        } else {
            1
        }),
        "{err}"
    );
    assert!(!err.contains("panicked"), "rlhf {args:?} panicked:\n{err}");
    assert!(
        err.contains(want),
        "rlhf {args:?}: expected {want:?} in:\n{err}"
    );
}

#[test]
fn asking_for_a_missing_gpu_is_a_clear_error() {
    if rlhf_tensor::cuda::driver_available() {
        eprintln!("a CUDA driver is present: the GPU paths are tested by tools/gpu-check");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let want = "--device cuda:0: cannot use this GPU";
    fails_with(
        &[
            "bench", "gemm", "--m", "8", "--n", "8", "--k", "8", "--device", "cuda",
        ],
        want,
    );
    fails_with(&["bench", "attention", "--device", "cuda"], want);
    fails_with(
        &[
            "bench",
            "train-step",
            "--preset",
            "tiny",
            "--device",
            "cuda",
        ],
        want,
    );
    fails_with(
        &["bench", "generate", "--preset", "tiny", "--device", "cuda"],
        want,
    );
    fails_with(
        &[
            "pretrain",
            "--preset",
            "tiny",
            "--steps",
            "1",
            "--device",
            "cuda:0",
            "--out",
            out.to_str().unwrap(),
        ],
        want,
    );
    assert!(
        !out.exists(),
        "nothing is written before the device is checked"
    );
    fails_with(
        &[
            "generate",
            "--checkpoint",
            dir.path().to_str().unwrap(),
            "--prompt",
            "a",
            "--device",
            "cuda",
        ],
        want,
    );
    fails_with(
        &["bench", "attention", "--device", "cuda:3"],
        "--device cuda:3: cannot use this GPU",
    );
}

#[test]
fn bad_device_and_precision_values_are_usage_errors() {
    fails_with(
        &["bench", "attention", "--device", "tpu"],
        "invalid value 'tpu' for '--device",
    );
    fails_with(
        &["bench", "train-step", "--precision", "f8"],
        "invalid value 'f8' for '--precision",
    );
    fails_with(
        &[
            "bench",
            "train-step",
            "--preset",
            "tiny",
            "--precision",
            "bf16",
        ],
        "--precision bf16 needs --device cuda",
    );
    fails_with(
        &[
            "bench",
            "generate",
            "--preset",
            "tiny",
            "--precision",
            "bf16",
        ],
        "--precision bf16 needs --device cuda",
    );
    fails_with(
        &["bench", "train-step", "--preset", "tiny", "--profile"],
        "--profile times GPU kernels: it needs --device cuda",
    );
    fails_with(
        &["bench", "generate", "--device", "cuda", "--threads", "2"],
        "--threads applies to the CPU only",
    );
    fails_with(
        &[
            "bench", "gemm", "--m", "8", "--n", "8", "--k", "8", "--dtype", "bf16",
        ],
        "not supported on the CPU",
    );
    fails_with(
        &["bench", "attention", "--dtype", "bf16"],
        "bf16 runs with --device cuda",
    );
}

#[test]
fn cpu_benches_report_their_device() {
    let o = rlhf(&[
        "bench",
        "attention",
        "--batch",
        "1",
        "--heads",
        "2",
        "--seq",
        "40",
        "--head-dim",
        "16",
        "--runs",
        "1",
        "--threads",
        "1",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (line, pass) in lines.iter().zip(["fwd", "fwd_bwd"]) {
        assert_eq!(line["op"], "attention");
        assert_eq!(line["pass"], pass);
        assert_eq!(line["device"], "cpu");
        assert_eq!(line["dtype"], "f32");
        assert_eq!(line["seq"], 40);
        assert!(line["ms"].as_f64().unwrap() > 0.0 && line["tflops"].as_f64().unwrap() > 0.0);
    }
    let o = rlhf(&[
        "bench",
        "train-step",
        "--preset",
        "tiny",
        "--batch",
        "2",
        "--seq",
        "16",
        "--runs",
        "1",
        "--threads",
        "1",
        "--dropout",
        "0",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(line["device"], "cpu");
    assert_eq!(line["precision"], "f32");
    assert!(line["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(line["loss_first"].as_f64().unwrap().is_finite());
    let o = rlhf(&[
        "bench",
        "generate",
        "--preset",
        "tiny",
        "--tokens",
        "4",
        "--runs",
        "1",
        "--threads",
        "1",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(line["op"], "generate");
    assert_eq!(line["device"], "cpu");
    assert_eq!(line["precision"], "f32");
    assert_eq!(line["same_tokens"], true);
    assert!(line["kv_cache_tokens_per_s"].as_f64().unwrap() > 0.0);
}
