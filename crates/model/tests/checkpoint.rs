//! Checkpoint directories: round trips, exact resumption, transformers-style variants, and
//! errors that name the file.

use rlhf_model::checkpoint::{CONFIG_FILE, MODEL_FILE, TRAINING_STATE_FILE};
use rlhf_model::{
    load_model, load_scalar_model, load_training_state, restore_trainer, save_checkpoint,
    save_model, save_scalar_checkpoint, EpochShuffler, Gpt, GptConfig, ScalarModel, TokenWindows,
    TrainConfig, Trainer, TrainingState,
};
use rlhf_tensor::{safetensors, DType, Rng, Tensor};
use std::path::Path;

fn tiny() -> GptConfig {
    GptConfig::preset("tiny").unwrap()
}

fn assert_same_weights(a: &Gpt, b: &Gpt) {
    for ((na, ta), (nb, tb)) in a.named_tensors().iter().zip(b.named_tensors()) {
        assert_eq!(na, &nb);
        assert_eq!(ta.shape(), tb.shape(), "{na}");
        let (x, y) = (ta.to_f64_vec(), tb.to_f64_vec());
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{na} differs"
        );
    }
}

fn ids() -> Tensor {
    Tensor::from_vec(vec![1i64, 50, 200, 7, 9, 9, 33, 257], &[2, 4]).unwrap()
}

#[test]
fn model_round_trips_through_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let m = Gpt::new(tiny(), 1).unwrap();
    save_model(dir.path(), &m).unwrap();
    let back = load_model(dir.path()).unwrap();
    assert_eq!(back.config(), m.config());
    assert_same_weights(&m, &back);
    assert_eq!(
        m.logits(&ids(), None).unwrap().to_f64_vec(),
        back.logits(&ids(), None).unwrap().to_f64_vec()
    );
    // The weights file is plain safetensors in HF names, f32, tagged format=pt.
    let file = safetensors::load(&dir.path().join(MODEL_FILE)).unwrap();
    assert_eq!(file.metadata.as_ref().unwrap()["format"], "pt");
    let w = file.get("transformer.h.1.attn.c_attn.weight").unwrap();
    assert_eq!((w.shape(), w.dtype()), (&[32usize, 96][..], DType::F32));
    assert!(file.get("lm_head.weight").is_none());
    assert_eq!(file.tensors.len(), m.named_parameters().len());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap())
            .unwrap();
    assert_eq!(cfg["model_type"], "gpt2");
    assert_eq!(cfg["n_embd"], 32);
    assert_eq!(cfg["architectures"][0], "GPT2LMHeadModel");
}

#[test]
fn transformers_variants_load() {
    // Original GPT-2 files name parameters without the "transformer." prefix, may store
    // bf16, and older ones carry attention-mask buffers and a tied lm_head.weight.
    let dir = tempfile::tempdir().unwrap();
    let m = Gpt::new(tiny(), 2).unwrap();
    m.config().save(&dir.path().join(CONFIG_FILE)).unwrap();
    let mut tensors: Vec<(String, Tensor)> = m
        .named_tensors()
        .into_iter()
        .map(|(n, t)| {
            (
                n.trim_start_matches("transformer.").to_string(),
                t.to_dtype(DType::BF16).unwrap(),
            )
        })
        .collect();
    tensors.push(("h.0.attn.bias".into(), Tensor::ones(&[1, 1, 64, 64])));
    tensors.push((
        "lm_head.weight".into(),
        m.named_tensors()[0].1.to_dtype(DType::BF16).unwrap(),
    ));
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::save(&dir.path().join(MODEL_FILE), &refs, None).unwrap();
    let back = load_model(dir.path()).unwrap();
    for ((name, a), (_, b)) in m.named_tensors().iter().zip(back.named_tensors()) {
        let want = a
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(b.dtype(), DType::F32);
        assert_eq!(want.to_f64_vec(), b.to_f64_vec(), "{name}");
    }
}

/// Trains `steps` steps from the current state: data order from `shuffler`, windows of 12.
fn train(m: &Gpt, t: &mut Trainer, s: &mut EpochShuffler, data: &TokenWindows, steps: usize) {
    for _ in 0..steps {
        let a = data.batch(&s.next_batch(2)).unwrap();
        let b = data.batch(&s.next_batch(1)).unwrap();
        t.train_step(m, &[a, b]).unwrap();
    }
}

#[test]
fn resuming_continues_bitwise_identically() {
    let mut c = tiny();
    c.resid_pdrop = 0.1; // dropout seeds must resume too
    let mut rng = Rng::new(5);
    let tokens: Vec<u32> = (0..300).map(|_| rng.below(258) as u32).collect();
    let data = TokenWindows::new(tokens, 12).unwrap();
    let cfg = TrainConfig::new(3e-3, 2, 10, 77);

    // Uninterrupted: 6 steps (crossing an epoch boundary of the 27 windows at 3 per step).
    let a = Gpt::new(c.clone(), 9).unwrap();
    let mut ta = Trainer::new(a.named_parameters(), cfg);
    let mut sa = EpochShuffler::new(data.len(), 4).unwrap();
    train(&a, &mut ta, &mut sa, &data, 6);

    // Interrupted after 3 steps, saved, restored into fresh objects, continued for 3.
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("step3");
    {
        let b = Gpt::new(c.clone(), 9).unwrap();
        let mut tb = Trainer::new(b.named_parameters(), cfg);
        let mut sb = EpochShuffler::new(data.len(), 4).unwrap();
        train(&b, &mut tb, &mut sb, &data, 3);
        let state = TrainingState {
            optimizer: tb.optimizer_state().unwrap(),
            data: Some(sb.position()),
            rng: Some(Rng::new(123).state()),
            extra: serde_json::json!({"run": "test"}),
        };
        save_checkpoint(&ckpt, &b, Some(&state)).unwrap();
    }
    let b = load_model(&ckpt).unwrap();
    let mut tb = Trainer::new(b.named_parameters(), cfg);
    let state = restore_trainer(&ckpt, &mut tb).unwrap();
    assert_eq!(tb.step(), 3);
    assert_eq!(state.rng, Some(Rng::new(123).state()));
    assert_eq!(state.extra["run"], "test");
    let mut sb = EpochShuffler::at(data.len(), 4, state.data.unwrap()).unwrap();
    train(&b, &mut tb, &mut sb, &data, 3);
    assert_same_weights(&a, &b);
    let (ma, mb) = (ta.optimizer_state().unwrap(), tb.optimizer_state().unwrap());
    assert_eq!(ma.step, mb.step);
    for ((n, m1, v1), (_, m2, v2)) in ma.moments.iter().zip(&mb.moments) {
        assert_eq!(m1.to_f64_vec(), m2.to_f64_vec(), "{n}");
        assert_eq!(v1.to_f64_vec(), v2.to_f64_vec(), "{n}");
    }
}

#[test]
fn saving_over_a_checkpoint_replaces_it_whole() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("ckpt");
    let first = Gpt::new(tiny(), 1).unwrap();
    let cfg = TrainConfig::new(1e-3, 0, 10, 0);
    let t = Trainer::new(first.named_parameters(), cfg);
    let state = TrainingState {
        optimizer: t.optimizer_state().unwrap(),
        data: None,
        rng: None,
        extra: serde_json::Value::Null,
    };
    save_checkpoint(&dir, &first, Some(&state)).unwrap();
    assert!(load_training_state(&dir).unwrap().is_some());
    let second = Gpt::new(tiny(), 2).unwrap();
    save_checkpoint(&dir, &second, None).unwrap();
    assert_same_weights(&second, &load_model(&dir).unwrap());
    // The old training state went with the old checkpoint, and nothing was left behind.
    assert!(load_training_state(&dir).unwrap().is_none());
    let names: Vec<_> = std::fs::read_dir(parent.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["ckpt".to_string()]);
}

#[test]
fn scalar_models_round_trip_and_lm_checkpoints_are_not_scalar() {
    let dir = tempfile::tempdir().unwrap();
    let rm = ScalarModel::from_trunk(Gpt::new(tiny(), 3).unwrap(), 4);
    save_scalar_checkpoint(&dir.path().join("rm"), &rm, None).unwrap();
    let back = load_scalar_model(&dir.path().join("rm")).unwrap();
    assert_eq!(
        rm.values(&ids(), None).unwrap().to_f64_vec(),
        back.values(&ids(), None).unwrap().to_f64_vec()
    );
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("rm").join(CONFIG_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["architectures"][0], "GPT2ForSequenceClassification");
    assert_eq!(cfg["id2label"]["0"], "LABEL_0");
    // The trunk of a reward model loads as a language model.
    let trunk = load_model(&dir.path().join("rm")).unwrap();
    assert_same_weights(&rm.trunk, &trunk);
    save_model(&dir.path().join("lm"), &trunk).unwrap();
    let msg = load_scalar_model(&dir.path().join("lm"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("no score.weight"),
        "{msg}"
    );
}

fn error_of(dir: &Path) -> String {
    load_model(dir).expect_err("load should fail").to_string()
}

#[test]
fn malformed_checkpoints_are_errors_naming_the_file() {
    let root = tempfile::tempdir().unwrap();
    let good = root.path().join("good");
    let m = Gpt::new(tiny(), 8).unwrap();
    save_model(&good, &m).unwrap();
    let copy = |name: &str| {
        let d = root.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in [CONFIG_FILE, MODEL_FILE] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
        d
    };

    let msg = error_of(&root.path().join("absent"));
    assert!(
        msg.contains("absent") && msg.contains("not a directory"),
        "{msg}"
    );

    let d = copy("no_config");
    std::fs::remove_file(d.join(CONFIG_FILE)).unwrap();
    let msg = error_of(&d);
    assert!(msg.contains("no_config/config.json"), "{msg}");

    let d = copy("bad_config");
    std::fs::write(
        d.join(CONFIG_FILE),
        "{\"vocab_size\": 258, \"n_positions\": 64}",
    )
    .unwrap();
    let msg = error_of(&d);
    assert!(
        msg.contains("bad_config/config.json") && msg.contains("missing key \"n_embd\""),
        "{msg}"
    );

    let d = copy("no_weights");
    std::fs::remove_file(d.join(MODEL_FILE)).unwrap();
    let msg = error_of(&d);
    assert!(
        msg.contains("no_weights/model.safetensors") && msg.contains("missing"),
        "{msg}"
    );

    let d = copy("truncated");
    let bytes = std::fs::read(d.join(MODEL_FILE)).unwrap();
    std::fs::write(d.join(MODEL_FILE), &bytes[..bytes.len() / 2]).unwrap();
    let msg = error_of(&d);
    assert!(msg.contains("truncated/model.safetensors"), "{msg}");

    let d = copy("garbage");
    std::fs::write(
        d.join(MODEL_FILE),
        b"\xff\xff\xff\xff\xff\xff\xff\xffnot a header",
    )
    .unwrap();
    let msg = error_of(&d);
    assert!(msg.contains("garbage/model.safetensors"), "{msg}");

    // The config and the weights disagree: a parameter has the wrong shape.
    let d = copy("wrong_shape");
    let mut c = tiny();
    c.n_positions = 32;
    c.save(&d.join(CONFIG_FILE)).unwrap();
    let msg = error_of(&d);
    assert!(
        msg.contains("wrong_shape/model.safetensors")
            && msg.contains("transformer.wpe.weight has shape [64, 32]"),
        "{msg}"
    );

    // One layer more in the config than in the file: a missing parameter.
    let d = copy("missing_param");
    let mut c = tiny();
    c.n_layer = 3;
    c.save(&d.join(CONFIG_FILE)).unwrap();
    let msg = error_of(&d);
    assert!(
        msg.contains("missing parameter transformer.h.2.ln_1.weight"),
        "{msg}"
    );

    // A tensor the model does not have.
    let d = copy("extra");
    let mut tensors = m.named_tensors();
    tensors.push((
        "transformer.h.0.attn.q_proj.weight".into(),
        Tensor::zeros(&[2]),
    ));
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::save(&d.join(MODEL_FILE), &refs, None).unwrap();
    let msg = error_of(&d);
    assert!(
        msg.contains("unexpected tensors: transformer.h.0.attn.q_proj.weight"),
        "{msg}"
    );

    // A training state that does not fit the trainer.
    let d = root.path().join("state");
    let other = Gpt::new(
        GptConfig {
            n_layer: 1,
            ..tiny()
        },
        0,
    )
    .unwrap();
    let t = Trainer::new(other.named_parameters(), TrainConfig::new(1e-3, 0, 1, 0));
    let state = TrainingState {
        optimizer: t.optimizer_state().unwrap(),
        data: None,
        rng: None,
        extra: serde_json::Value::Null,
    };
    save_checkpoint(&d, &m, Some(&state)).unwrap();
    let mut trainer = Trainer::new(m.named_parameters(), TrainConfig::new(1e-3, 0, 1, 0));
    let msg = restore_trainer(&d, &mut trainer).err().unwrap().to_string();
    assert!(
        msg.contains(TRAINING_STATE_FILE) && msg.contains("parameters"),
        "{msg}"
    );
    let refs: Vec<(&str, &Tensor)> = vec![];
    safetensors::save(&d.join(TRAINING_STATE_FILE), &refs, None).unwrap();
    let msg = load_training_state(&d).err().unwrap().to_string();
    assert!(
        msg.contains(TRAINING_STATE_FILE) && msg.contains("rlhf_training_state"),
        "{msg}"
    );
    let msg = restore_trainer(&good, &mut trainer)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("no training state"), "{msg}");
}
