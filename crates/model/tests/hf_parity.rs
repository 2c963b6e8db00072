//! Parity with Hugging Face `transformers`: a GPT2LMHeadModel saved by transformers
//! (tests/fixtures/hf_gpt2, written by tools/hf_gpt2_fixture.py) loads here and gives the logits
//! transformers computed; and a checkpoint saved here reloads to the same logits. The fixture is
//! committed, so this test needs no Python.

use rlhf_model::checkpoint::{load_model, save_checkpoint};
use rlhf_tensor::{no_grad, safetensors};
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf_gpt2")
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn transformers_checkpoint_gives_transformers_logits() {
    let dir = fixture();
    let model = load_model(&dir).expect("load the transformers checkpoint");
    let expected = safetensors::load(&dir.join("expected.safetensors")).unwrap();
    let ids = expected.get("input_ids").unwrap();
    let want = expected.get("logits").unwrap().to_f64_vec();
    let got = no_grad(|| model.logits(ids, None)).unwrap();
    assert_eq!(got.shape(), expected.get("logits").unwrap().shape());
    let diff = max_abs_diff(&got.to_f64_vec(), &want);
    assert!(diff < 1e-4, "max |logit difference| = {diff}");

    // Saved by us and loaded back: bit-for-bit the same logits.
    let tmp = tempfile::tempdir().unwrap();
    let ours = tmp.path().join("ck");
    save_checkpoint(&ours, &model, None).unwrap();
    let reloaded = load_model(&ours).unwrap();
    let again = no_grad(|| reloaded.logits(ids, None)).unwrap();
    assert_eq!(again.to_f64_vec(), got.to_f64_vec());
}
