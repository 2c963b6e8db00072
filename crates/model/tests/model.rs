//! The GPT-2 trunk: naming, initialisation, gradients, training, heads and dropout.
//! Sizes stay tiny: the CPU kernels these tests run on may be the scalar reference ones.

use rlhf_model::train::lm_loss_with;
use rlhf_model::{
    lm_loss, pad_batch, token_logprobs, values_at, Gpt, GptConfig, LmBatch, ModelError, ScalarHead,
    ScalarModel, TrainConfig, Trainer,
};
use rlhf_tensor::gradcheck::check_gradients;
use rlhf_tensor::Tensor;

fn tiny() -> GptConfig {
    GptConfig::preset("tiny").unwrap()
}

fn ids(rows: &[&[u32]]) -> Tensor {
    let t = rows[0].len();
    let v: Vec<i64> = rows
        .iter()
        .flat_map(|r| r.iter().map(|&x| x as i64))
        .collect();
    Tensor::from_vec(v, &[rows.len(), t]).unwrap()
}

fn random_ids(b: usize, t: usize, vocab: usize, seed: u64) -> Tensor {
    let mut r = rlhf_tensor::Rng::new(seed);
    let v: Vec<i64> = (0..b * t).map(|_| r.below(vocab as u64) as i64).collect();
    Tensor::from_vec(v, &[b, t]).unwrap()
}

#[test]
fn parameters_are_named_and_shaped_as_transformers() {
    let c = tiny();
    let m = Gpt::new(c.clone(), 0).unwrap();
    let named = m.named_parameters();
    assert_eq!(named.len(), 2 + 12 * c.n_layer + 2);
    let d = c.n_embd;
    let want: Vec<(&str, Vec<usize>)> = vec![
        ("transformer.wte.weight", vec![258, d]),
        ("transformer.wpe.weight", vec![64, d]),
        ("transformer.h.0.ln_1.weight", vec![d]),
        ("transformer.h.0.ln_1.bias", vec![d]),
        ("transformer.h.0.attn.c_attn.weight", vec![d, 3 * d]),
        ("transformer.h.0.attn.c_attn.bias", vec![3 * d]),
        ("transformer.h.0.attn.c_proj.weight", vec![d, d]),
        ("transformer.h.0.attn.c_proj.bias", vec![d]),
        ("transformer.h.0.ln_2.weight", vec![d]),
        ("transformer.h.0.ln_2.bias", vec![d]),
        ("transformer.h.0.mlp.c_fc.weight", vec![d, 4 * d]),
        ("transformer.h.0.mlp.c_fc.bias", vec![4 * d]),
        ("transformer.h.0.mlp.c_proj.weight", vec![4 * d, d]),
        ("transformer.h.0.mlp.c_proj.bias", vec![d]),
        ("transformer.h.1.ln_1.weight", vec![d]),
    ];
    for ((name, shape), (got_name, p)) in want.iter().zip(&named) {
        assert_eq!(got_name, name);
        assert_eq!(&p.shape(), shape, "{name}");
    }
    assert_eq!(named[named.len() - 2].0, "transformer.ln_f.weight");
    assert_eq!(named[named.len() - 1].0, "transformer.ln_f.bias");
    let total: usize = named
        .iter()
        .map(|(_, p)| p.shape().iter().product::<usize>())
        .sum();
    assert_eq!(total, c.num_parameters());
}

fn std_of(t: &Tensor) -> f64 {
    let v = t.to_f64_vec();
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
}

#[test]
fn initialisation_is_seeded_and_follows_gpt2() {
    let c = GptConfig::preset("small-cpu").unwrap();
    let a = Gpt::new(c.clone(), 5).unwrap();
    let b = Gpt::new(c.clone(), 5).unwrap();
    let other = Gpt::new(c.clone(), 6).unwrap();
    for (((name, x), (_, y)), (_, z)) in a
        .named_tensors()
        .iter()
        .zip(b.named_tensors())
        .zip(other.named_tensors())
    {
        assert_eq!(x.to_f64_vec(), y.to_f64_vec(), "{name}");
        let v = x.to_f64_vec();
        if name.ends_with("ln_1.weight")
            || name.ends_with("ln_2.weight")
            || name.ends_with("ln_f.weight")
        {
            assert!(v.iter().all(|&e| e == 1.0), "{name}");
        } else if name.ends_with(".bias") {
            assert!(v.iter().all(|&e| e == 0.0), "{name}");
        } else {
            assert_ne!(v, z.to_f64_vec(), "{name}");
            let want = if name.ends_with("c_proj.weight") {
                0.02 / (2.0 * c.n_layer as f64).sqrt()
            } else {
                0.02
            };
            let s = std_of(x);
            assert!(
                (s - want).abs() < 0.05 * want,
                "{name}: std {s}, want {want}"
            );
        }
    }
}

#[test]
fn logits_have_the_right_shape_and_reject_bad_input() {
    let m = Gpt::new(tiny(), 1).unwrap();
    let x = random_ids(3, 7, 258, 2);
    let logits = m.logits(&x, None).unwrap();
    assert_eq!(logits.shape(), &[3, 7, 258]);
    // At init the distribution is close to uniform: loss near ln(258).
    let loss = lm_loss(&m, &LmBatch::new(x.clone(), None), None)
        .unwrap()
        .item()
        .unwrap();
    assert!((loss - (258f32).ln()).abs() < 0.1, "{loss}");
    let msg = m.logits(&ids(&[&[1, 258]]), None).unwrap_err().to_string();
    assert!(
        msg.contains("token id 258") && msg.contains("vocabulary of 258"),
        "{msg}"
    );
    let too_long = random_ids(1, 65, 258, 3);
    let msg = m.logits(&too_long, None).unwrap_err().to_string();
    assert!(msg.contains("sequence length 65"), "{msg}");
    assert!(m.logits(&Tensor::zeros(&[4]), None).is_err());
}

#[test]
fn the_lm_head_is_the_transposed_embedding() {
    let m = Gpt::new(tiny(), 3).unwrap();
    let h = Tensor::randn(&[2, 32], 0.0, 1.0, 4);
    let logits = m.lm_logits(&h).unwrap().to_f64_vec();
    let wte = m.named_tensors()[0].1.to_f64_vec();
    let hv = h.to_f64_vec();
    for r in 0..2 {
        for v in [0usize, 17, 257] {
            let want: f64 = (0..32).map(|k| hv[r * 32 + k] * wte[v * 32 + k]).sum();
            assert!((logits[r * 258 + v] - want).abs() < 1e-5);
        }
    }
}

#[test]
fn whole_model_gradient_check() {
    // Dropout on (seeded, so the forward is a fixed function) to check its backward and the
    // fused attention's dropout too.
    let mut c = tiny();
    c.resid_pdrop = 0.1;
    c.embd_pdrop = 0.1;
    c.attn_pdrop = 0.1;
    let m = Gpt::new(c, 11).unwrap();
    // Perturb the zero/one-initialised parameters so their gradients are generic.
    for (name, p) in m.named_parameters() {
        let t = p.tensor();
        if name.contains("ln_") || name.ends_with(".bias") {
            let noise = Tensor::randn(t.shape(), 0.0, 0.1, name.len() as u64);
            p.set(&t.add(&noise).unwrap().detach()).unwrap();
        }
    }
    let batch = LmBatch::new(
        random_ids(2, 6, 258, 12),
        Some(
            Tensor::from_vec(
                vec![
                    0.0f32, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0,
                ],
                &[2, 6],
            )
            .unwrap(),
        ),
    );
    let checked = [
        "transformer.h.0.ln_1.weight",
        "transformer.h.0.attn.c_attn.bias",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.1.mlp.c_fc.bias",
        "transformer.h.1.ln_2.bias",
        "transformer.ln_f.weight",
    ];
    let base = m.weights();
    let inputs: Vec<Tensor> = checked
        .iter()
        .map(|n| {
            base.named()
                .into_iter()
                .find(|(k, _)| k == n)
                .unwrap()
                .1
                .detach()
        })
        .collect();
    let err = check_gradients(
        &inputs,
        |xs| {
            let mut w = base.clone();
            for (name, x) in checked.iter().zip(xs) {
                *w.get_mut(name).unwrap() = x.clone();
            }
            Ok(lm_loss_with(&m, &w, &batch, Some(99)).unwrap())
        },
        1e-2,
    )
    .unwrap();
    assert!(err < 2e-3, "worst relative gradient error {err}");
}

/// The engine reuses freed activation buffers (rlhf_tensor::cpu::pool) without clearing them
/// where an op overwrites every element. Poisoning the pool with NaN before every step must
/// change nothing: a kernel that read a stale element would turn the run into NaN.
#[test]
fn stale_pooled_buffers_never_reach_results() {
    // Big enough that activations, logits and gradients pass the pool's size threshold.
    let mut cfg = tiny();
    cfg.n_embd = 64;
    let (b, t) = (8, 64);
    assert!(b * t * 3 * cfg.n_embd >= rlhf_tensor::cpu::pool::MIN_ELEMS);
    let run = |poison: bool| -> (Vec<f32>, Vec<Vec<f64>>) {
        let m = Gpt::new(cfg.clone(), 31).unwrap();
        let batch = LmBatch::new(random_ids(b, t, 258, 32), None);
        let mut trainer = Trainer::new(m.named_parameters(), TrainConfig::new(1e-3, 0, 10, 0));
        let mut losses = Vec::new();
        for _ in 0..3 {
            if poison {
                rlhf_tensor::cpu::pool::poison(f32::NAN);
            }
            let s = trainer
                .train_step(&m, std::slice::from_ref(&batch))
                .unwrap();
            losses.push(s.loss);
        }
        let params = m
            .parameters()
            .iter()
            .map(|p| p.tensor().to_f64_vec())
            .collect();
        (losses, params)
    };
    let (clean, poisoned) = (run(false), run(true));
    assert!(clean.0.iter().all(|l| l.is_finite()), "{:?}", clean.0);
    assert_eq!(clean.0, poisoned.0, "losses");
    assert!(
        clean.1 == poisoned.1,
        "parameters differ after poisoning the pool"
    );
}

#[test]
fn overfits_one_batch() {
    let m = Gpt::new(tiny(), 21).unwrap();
    let batch = LmBatch::new(random_ids(2, 16, 258, 22), None);
    let mut cfg = TrainConfig::new(1e-2, 5, 150, 0);
    cfg.adamw.weight_decay = 0.0;
    let mut trainer = Trainer::new(m.named_parameters(), cfg);
    let first = trainer
        .train_step(&m, std::slice::from_ref(&batch))
        .unwrap();
    let mut last = first;
    for _ in 1..150 {
        last = trainer
            .train_step(&m, std::slice::from_ref(&batch))
            .unwrap();
    }
    assert!(first.loss > 5.0, "{first:?}");
    let end = lm_loss(&m, &batch, None).unwrap().item().unwrap();
    assert!(end < 0.05, "loss {} → {end} ({last:?})", first.loss);
    assert_eq!(trainer.step(), 150);
}

#[test]
fn gradient_accumulation_equals_one_big_batch() {
    let c = tiny();
    let full_ids = random_ids(3, 8, 258, 30);
    let mask_v: Vec<f32> = (0..24)
        .map(|i| if i % 3 == 0 { 0.0 } else { 1.0 })
        .collect();
    let mask = Tensor::from_vec(mask_v, &[3, 8]).unwrap();
    let full = LmBatch::new(full_ids.clone(), Some(mask.clone()));
    let parts = [
        LmBatch::new(
            full_ids.narrow(0, 0, 1).unwrap().contiguous().unwrap(),
            Some(mask.narrow(0, 0, 1).unwrap().contiguous().unwrap()),
        ),
        LmBatch::new(
            full_ids.narrow(0, 1, 2).unwrap().contiguous().unwrap(),
            Some(mask.narrow(0, 1, 2).unwrap().contiguous().unwrap()),
        ),
    ];
    let a = Gpt::new(c.clone(), 31).unwrap();
    let b = Gpt::new(c, 31).unwrap();
    let cfg = TrainConfig::new(1e-3, 0, 10, 0);
    let mut ta = Trainer::new(a.named_parameters(), cfg);
    let mut tb = Trainer::new(b.named_parameters(), cfg);
    let sa = ta.train_step(&a, &[full]).unwrap();
    let sb = tb.train_step(&b, &parts).unwrap();
    assert!((sa.loss - sb.loss).abs() < 1e-5, "{sa:?} {sb:?}");
    assert!(
        (sa.grad_norm - sb.grad_norm).abs() < 1e-4 * sa.grad_norm,
        "{sa:?} {sb:?}"
    );
    assert_eq!(sa.tokens, sb.tokens);
    for ((name, x), (_, y)) in a.named_tensors().iter().zip(b.named_tensors()) {
        for (p, q) in x.to_f64_vec().iter().zip(y.to_f64_vec()) {
            assert!((p - q).abs() < 1e-6, "{name}: {p} {q}");
        }
    }
}

#[test]
fn loss_mask_selects_the_counted_targets() {
    let m = Gpt::new(tiny(), 40).unwrap();
    let x = random_ids(1, 5, 258, 41);
    // Only target position 3 counts: the loss is -log p(x[3] | x[..3]).
    let mask = Tensor::from_vec(vec![1.0f32, 0.0, 0.0, 1.0, 0.0], &[1, 5]).unwrap();
    let loss = lm_loss(&m, &LmBatch::new(x.clone(), Some(mask)), None)
        .unwrap()
        .item()
        .unwrap();
    let lp = token_logprobs(&m.logits(&x, None).unwrap(), &x)
        .unwrap()
        .to_f64_vec();
    assert_eq!(lp.len(), 4);
    assert!((f64::from(loss) + lp[2]).abs() < 1e-5, "{loss} {lp:?}");
    let bad = LmBatch::new(x.clone(), Some(Tensor::ones(&[1, 4])));
    assert!(lm_loss(&m, &bad, None).is_err());
}

#[test]
fn dropout_is_seeded_and_off_in_evaluation() {
    let mut c = tiny();
    c.resid_pdrop = 0.2;
    c.embd_pdrop = 0.2;
    c.attn_pdrop = 0.2;
    let m = Gpt::new(c, 50).unwrap();
    let x = random_ids(2, 9, 258, 51);
    let a = m.hidden_states(&x, Some(1)).unwrap().to_f64_vec();
    let b = m.hidden_states(&x, Some(1)).unwrap().to_f64_vec();
    let other = m.hidden_states(&x, Some(2)).unwrap().to_f64_vec();
    let eval1 = m.hidden_states(&x, None).unwrap().to_f64_vec();
    let eval2 = m.hidden_states(&x, None).unwrap().to_f64_vec();
    assert_eq!(a, b);
    assert_ne!(a, other);
    assert_ne!(a, eval1);
    assert_eq!(eval1, eval2);
}

#[test]
fn scalar_head_gives_one_value_per_position() {
    let trunk = Gpt::new(tiny(), 60).unwrap();
    let model = ScalarModel {
        head: ScalarHead::new(trunk.config().n_embd, 0.02, false, 61),
        trunk,
    };
    let names: Vec<String> = model
        .named_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names.last().unwrap(), "score.weight");
    let (x, mask) = pad_batch(&[vec![1, 2, 3, 4], vec![5, 6]], 257).unwrap();
    assert_eq!(
        mask.to_f64_vec(),
        vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    );
    let values = model.values(&x, None).unwrap();
    assert_eq!(values.shape(), &[2, 4]);
    // Right padding does not change the values of the real tokens (causal attention).
    let alone = model.values(&ids(&[&[5, 6]]), None).unwrap().to_f64_vec();
    let v = values.to_f64_vec();
    assert!((v[4] - alone[0]).abs() < 1e-6 && (v[5] - alone[1]).abs() < 1e-6);
    let last = values_at(&values, &[3, 1]).unwrap();
    assert_eq!(last.to_f64_vec(), vec![v[3], v[5]]);
    last.sum_all().unwrap().backward().unwrap();
    let (_, w) = &model.head.named_parameters()[0];
    assert!(w.grad().is_some());
    assert!(values_at(&values, &[4, 0]).is_err());
    let with_bias = ScalarHead::new(32, 0.02, true, 1);
    assert_eq!(with_bias.named_parameters()[1].0, "score.bias");
}

#[test]
fn deep_clone_is_independent() {
    let m = Gpt::new(tiny(), 70).unwrap();
    let frozen = m.deep_clone();
    let batch = LmBatch::new(random_ids(1, 8, 258, 71), None);
    let mut t = Trainer::new(m.named_parameters(), TrainConfig::new(1e-2, 0, 5, 0));
    t.train_step(&m, &[batch]).unwrap();
    let (a, b) = (&m.named_tensors()[2].1, &frozen.named_tensors()[2].1);
    assert_ne!(a.to_f64_vec(), b.to_f64_vec());
    frozen.copy_from(&m).unwrap();
    assert_eq!(
        m.named_tensors()[5].1.to_f64_vec(),
        frozen.named_tensors()[5].1.to_f64_vec()
    );
}

#[test]
fn malformed_config_file_names_file_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let mut j = tiny().to_json();
    j["n_head"] = 3.into();
    std::fs::write(&path, j.to_string()).unwrap();
    let msg = GptConfig::load(&path).unwrap_err().to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("not divisible by n_head = 3"),
        "{msg}"
    );
    std::fs::write(&path, "{\"n_embd\": 32,").unwrap();
    let err = GptConfig::load(&path).unwrap_err();
    assert!(matches!(err, ModelError::Config { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("config.json") && msg.contains("not valid JSON"),
        "{msg}"
    );
    let missing = dir.path().join("nope.json");
    let msg = GptConfig::load(&missing).unwrap_err().to_string();
    assert!(msg.contains("nope.json"), "{msg}");
    // A valid file round-trips.
    tiny().save(&path).unwrap();
    assert_eq!(GptConfig::load(&path).unwrap(), tiny());
}
