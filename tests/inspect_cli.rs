//! `rlhf inspect` end to end: a file written by the engine, listed through the binary; a
//! corrupted file gives an error naming it, not a panic.

use rlhf_tensor::{safetensors, DType, Tensor};
use std::collections::BTreeMap;
use std::process::Command;

fn rlhf(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(args)
        .output()
        .expect("run rlhf")
}

#[test]
fn inspect_lists_tensors_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let w = Tensor::randn(&[4, 3], 0.0, 1.0, 1);
    let b = w.to_dtype(DType::BF16).unwrap();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::save(&path, &[("w", &w), ("w.bf16", &b)], Some(&meta)).unwrap();

    let out = rlhf(&["inspect", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in ["w.bf16", "BF16", "[4, 3]", "48", "24", "format"] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }

    let out = rlhf(&["inspect", "--json", path.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.to_string().contains("\"w.bf16\""), "{v}");

    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 3);
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, bytes).unwrap();
    let out = rlhf(&["inspect", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.safetensors") && !err.contains("panicked"),
        "{err}"
    );
}

/// Output into a pipe nobody reads (`rlhf inspect f | head` after head exits) ends the process
/// quietly by SIGPIPE, as for other Unix tools, instead of a panic in println!.
#[cfg(unix)]
#[test]
fn a_closed_stdout_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let w = Tensor::randn(&[4, 3], 0.0, 1.0, 1);
    safetensors::save(&path, &[("w", &w)], None).unwrap();
    // The read end is closed before the child starts: its first write fails, every time.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(["inspect", path.to_str().unwrap()])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run rlhf");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
}
