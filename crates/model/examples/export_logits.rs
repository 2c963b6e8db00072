//! Writes a checkpoint's logits for a fixed batch of token ids to a safetensors file
//! (`input_ids` I64 [2, T], `logits` F32 [2, T, V]) so that tools/hf_gpt2_fixture.py --check DIR
//! --compare FILE can hold transformers' logits for the same checkpoint against ours.
//!
//! cargo run --release -p rlhf-model --example export_logits -- CHECKPOINT_DIR OUT.safetensors

use rlhf_model::checkpoint::load_model;
use rlhf_tensor::{no_grad, safetensors, Tensor};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, out] = args.as_slice() else {
        return Err("usage: export_logits CHECKPOINT_DIR OUT.safetensors".into());
    };
    let model = load_model(&PathBuf::from(dir))?;
    let (v, t) = (
        model.config().vocab_size as i64,
        model.config().n_positions.min(16),
    );
    let ids: Vec<i64> = (0..2 * t as i64).map(|i| (i * 7 + 3) % v).collect();
    let ids = Tensor::from_vec(ids, &[2, t])?;
    let logits = no_grad(|| model.logits(&ids, None))?;
    safetensors::save(
        &PathBuf::from(out),
        &[("input_ids", &ids), ("logits", &logits)],
        None,
    )?;
    println!("wrote {out}: logits {:?}", logits.shape());
    Ok(())
}
