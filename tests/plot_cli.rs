//! End-to-end tests of `rlhf plot` through the built binary.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Output};

fn rlhf(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(args)
        .output()
        .expect("running the rlhf binary")
}

fn plot(metrics: &Path, out: &Path) -> Output {
    rlhf(&[
        "plot".as_ref(),
        metrics.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ])
}

/// A run's worth of metrics: training loss every step, held-out loss every 10 steps (a separate
/// line, as a trainer writes it), a warmup-then-decay learning rate and a throughput figure.
fn write_metrics(dir: &Path) -> std::path::PathBuf {
    let mut text = String::new();
    for step in 1..=60u32 {
        let s = f64::from(step);
        let lr = if step <= 10 {
            3e-4 * s / 10.0
        } else {
            3e-4 * (1.0 - (s - 10.0) / 60.0)
        };
        writeln!(
            text,
            r#"{{"step": {step}, "loss": {:.4}, "lr": {lr:e}, "tokens_per_s": {:.1}, "phase": "train"}}"#,
            5.5 * (-s / 20.0).exp() + 1.2,
            6900.0 + 40.0 * (s * 0.7).sin()
        )
        .unwrap();
        if step % 10 == 0 {
            writeln!(
                text,
                r#"{{"step": {step}, "heldout_loss": {:.4}}}"#,
                5.6 * (-s / 22.0).exp() + 1.4
            )
            .unwrap();
        }
    }
    let path = dir.join("metrics.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn png_and_svg_are_drawn() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = write_metrics(dir.path());

    let png = dir.path().join("curves.png");
    let out = plot(&metrics, &png);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG file");
    // IHDR: width and height, big-endian, right after the 8-byte signature and chunk header.
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!(
        (width, height),
        (1280, 720),
        "4 metrics → 2×2 panels of 640×360"
    );
    // A blank 1280×720 PNG compresses to well under 10 KB; axes, labels and four curves do not.
    assert!(
        bytes.len() > 20_000,
        "PNG only {} bytes: nothing drawn?",
        bytes.len()
    );

    let svg = dir.path().join("curves.svg");
    let out = plot(&metrics, &svg);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.starts_with("<svg"),
        "not an SVG: {}",
        &text[..text.len().min(80)]
    );
    // plotters writes each <text> element's content on a line of its own.
    let texts: Vec<&str> = text.lines().map(str::trim).collect();
    for name in ["loss", "heldout_loss", "lr", "tokens_per_s", "step"] {
        assert!(texts.contains(&name), "SVG has no label {name:?}");
    }
    // One blue polyline per curve (axes and grid are black); "phase" is text, not a curve.
    let curves = text
        .lines()
        .filter(|l| l.starts_with("<polyline") && l.contains(r##"stroke="#0000FF""##))
        .count();
    assert_eq!(curves, 4, "expected four curves");
    assert!(!texts.contains(&"phase"));
}

#[test]
fn malformed_line_is_reported_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("bad.jsonl");
    std::fs::write(
        &metrics,
        "{\"step\": 1, \"loss\": 2.0}\n{\"step\": 2, \"loss\": 1.9}\n{\"step\": 3, \"loss\": \n",
    )
    .unwrap();
    let png = dir.path().join("never.png");
    let out = plot(&metrics, &png);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!("{}:3: not valid JSON", metrics.display());
    assert!(stderr.contains(&want), "stderr {stderr:?} lacks {want:?}");
    assert!(!png.exists(), "no image should be written for bad input");

    std::fs::write(&metrics, "{\"step\": 1, \"loss\": 2.0}\n{\"loss\": 1.9}\n").unwrap();
    let stderr = String::from_utf8_lossy(&plot(&metrics, &png).stderr).into_owned();
    let want = format!("{}:2: missing \"step\"", metrics.display());
    assert!(stderr.contains(&want), "stderr {stderr:?} lacks {want:?}");
}

#[test]
fn unknown_extension_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = write_metrics(dir.path());
    let out = plot(&metrics, &dir.path().join("curves.jpg"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown image format '.jpg'"),
        "stderr: {stderr}"
    );
}
