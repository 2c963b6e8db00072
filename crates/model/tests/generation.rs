//! KV-cache decoding against full recomputation, and batched, seeded generation.

use proptest::prelude::*;
use rlhf_model::{
    generate, generate_text, token_logprobs, ByteTokenizer, FinishReason, Gpt, GptConfig,
    SamplingConfig, Tokenizer,
};
use rlhf_tensor::{Rng, Tensor};

fn config(n_layer: usize, n_head: usize, head_dim: usize, ctx: usize) -> GptConfig {
    let mut c = GptConfig::preset("tiny").unwrap();
    c.n_layer = n_layer;
    c.n_head = n_head;
    c.n_embd = n_head * head_dim;
    c.n_positions = ctx;
    c
}

fn rand_tokens(n: usize, vocab: usize, rng: &mut Rng) -> Vec<u32> {
    (0..n).map(|_| rng.below(vocab as u64) as u32).collect()
}

/// Logits of every position of `seq`, recomputed from scratch with the rectangular forward.
fn full_logits(m: &Gpt, seq: &[u32]) -> Vec<f64> {
    let ids = Tensor::from_vec(
        seq.iter().map(|&x| x as i64).collect::<Vec<_>>(),
        &[1, seq.len()],
    )
    .unwrap();
    m.logits(&ids, None).unwrap().to_f64_vec()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    /// Several sequences of different lengths fed through their caches in random chunks give
    /// the same logits at every position as recomputing each whole sequence.
    #[test]
    fn kv_cache_logits_equal_full_recompute(
        n_layer in 1usize..3, n_head in 1usize..4, head_dim in 1usize..9,
        lens in proptest::collection::vec(1usize..20, 1..4), seed in 0u64..1000,
    ) {
        let c = config(n_layer, n_head, head_dim, 24);
        let m = Gpt::new(c, seed).unwrap();
        let mut rng = Rng::new(seed + 1);
        let seqs: Vec<Vec<u32>> = lens.iter().map(|&l| rand_tokens(l, 258, &mut rng)).collect();
        let mut caches = m.new_caches(seqs.len());
        let mut done = vec![0usize; seqs.len()];
        let mut got: Vec<Vec<f64>> = vec![Vec::new(); seqs.len()];
        rlhf_tensor::no_grad(|| {
            while done.iter().zip(&seqs).any(|(d, s)| d < &s.len()) {
                // Each unfinished sequence takes a random chunk of 1..=4 tokens this round.
                let mut which = Vec::new();
                let mut chunks: Vec<&[u32]> = Vec::new();
                for (i, s) in seqs.iter().enumerate() {
                    if done[i] < s.len() {
                        let k = (1 + rng.below(4) as usize).min(s.len() - done[i]);
                        chunks.push(&s[done[i]..done[i] + k]);
                        which.push(i);
                    }
                }
                let mut active: Vec<_> = which.iter().map(|&i| caches[i].clone()).collect();
                let hidden = m.hidden_states_cached(&chunks, &mut active).unwrap();
                let logits = m.lm_logits(&hidden).unwrap().to_f64_vec();
                let mut row = 0;
                for ((&i, chunk), cache) in which.iter().zip(&chunks).zip(active) {
                    got[i].extend_from_slice(&logits[row * 258..(row + chunk.len()) * 258]);
                    row += chunk.len();
                    done[i] += chunk.len();
                    caches[i] = cache;
                }
            }
        });
        for (i, s) in seqs.iter().enumerate() {
            prop_assert_eq!(caches[i].len(), s.len());
            let want = full_logits(&m, s);
            prop_assert_eq!(got[i].len(), want.len());
            for (a, b) in got[i].iter().zip(&want) {
                prop_assert!((a - b).abs() < 1e-4, "seq {}: {} vs {}", i, a, b);
            }
        }
    }
}

#[test]
fn cache_rejects_overflow_and_mismatches() {
    let m = Gpt::new(config(2, 2, 4, 8), 1).unwrap();
    let mut caches = m.new_caches(1);
    let msg = m
        .hidden_states_cached(&[&[1; 9]], &mut caches)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("past the context of 8"), "{msg}");
    assert!(m.hidden_states_cached(&[&[1], &[2]], &mut caches).is_err());
    assert!(m.hidden_states_cached(&[&[]], &mut caches).is_err());
    let mut wrong = vec![rlhf_model::KvCache::new(3)];
    assert!(m.hidden_states_cached(&[&[1]], &mut wrong).is_err());
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![72, 101, 108, 108, 111],
        vec![65],
        vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    ]
}

#[test]
fn generation_is_reproducible_and_seeded() {
    let m = Gpt::new(GptConfig::preset("tiny").unwrap(), 3).unwrap();
    let cfg = SamplingConfig {
        max_new_tokens: 12,
        seed: 42,
        ..Default::default()
    };
    let a = generate(&m, &prompts(), &cfg).unwrap();
    let b = generate(&m, &prompts(), &cfg).unwrap();
    assert_eq!(a, b);
    let c = generate(
        &m,
        &prompts(),
        &SamplingConfig {
            seed: 43,
            ..cfg.clone()
        },
    )
    .unwrap();
    assert_ne!(a.responses, c.responses);
    for r in &a.responses {
        assert_eq!(r.len(), 12);
    }
    assert!(a.finish.iter().all(|&f| f == FinishReason::MaxTokens));
    // A sequence's tokens do not depend on the rest of the batch: sequence i draws from the
    // i-th fork of the seed, so generating the same prompt at the same index alone matches.
    let alone = generate(&m, &prompts()[..1], &cfg).unwrap();
    assert_eq!(alone.responses[0], a.responses[0]);
    for (x, y) in alone.logprobs[0].iter().zip(&a.logprobs[0]) {
        assert!((x - y).abs() < 1e-5);
    }
}

#[test]
fn logprobs_match_the_training_forward_on_padded_sequences() {
    let m = Gpt::new(GptConfig::preset("tiny").unwrap(), 5).unwrap();
    let cfg = SamplingConfig {
        max_new_tokens: 9,
        temperature: 0.7,
        top_k: Some(50),
        top_p: Some(0.9),
        stop_token: Some(ByteTokenizer::EOS),
        seed: 7,
        ..Default::default()
    };
    let g = generate(&m, &prompts(), &cfg).unwrap();
    let padded = g.padded_sequences(ByteTokenizer::PAD).unwrap();
    let lp = token_logprobs(&m.logits(&padded.ids, None).unwrap(), &padded.ids)
        .unwrap()
        .to_f64_vec();
    let l = padded.ids.dim(1).unwrap();
    let (mask, stored) = (
        padded.response_mask.to_f64_vec(),
        padded.logprobs.to_f64_vec(),
    );
    let mut checked = 0;
    for b in 0..3 {
        for t in 1..l {
            if mask[b * l + t] == 1.0 {
                // Token t's log-prob comes from position t-1's logits.
                let want = lp[b * (l - 1) + t - 1];
                assert!((stored[b * l + t] - want).abs() < 1e-4, "{b},{t}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, g.responses.iter().map(Vec::len).sum::<usize>());
    let (ids, lps, m2) = g.padded_responses(ByteTokenizer::PAD).unwrap();
    assert_eq!(ids.shape(), lps.shape());
    assert_eq!(
        m2.to_f64_vec().iter().sum::<f64>() as usize,
        checked,
        "mask counts the real tokens"
    );
}

#[test]
fn greedy_stops_at_the_stop_token_and_the_context() {
    let m = Gpt::new(config(2, 2, 8, 16), 9).unwrap();
    let greedy = SamplingConfig {
        greedy: true,
        max_new_tokens: 20,
        ..Default::default()
    };
    let free = generate(&m, &[vec![1, 2, 3]], &greedy).unwrap();
    // Context 16 with a 3-token prompt: 13 new tokens, then the context is full.
    assert_eq!(free.responses[0].len(), 13);
    assert_eq!(free.finish[0], FinishReason::Context);
    // Stopping at whatever greedy produces third: exactly three tokens, the last the stop.
    let stop = free.responses[0][2];
    let first_stop = free.responses[0].iter().position(|&t| t == stop).unwrap();
    let g = generate(
        &m,
        &[vec![1, 2, 3]],
        &SamplingConfig {
            stop_token: Some(stop),
            ..greedy.clone()
        },
    )
    .unwrap();
    assert_eq!(g.responses[0], free.responses[0][..=first_stop].to_vec());
    assert_eq!(g.finish[0], FinishReason::Stop);
    // Greedy log-probs are the maximum of each distribution, so never below log(1/V).
    assert!(g.logprobs[0].iter().all(|&l| l > -(258f32).ln() - 1e-4));
    // A full-context prompt gets nothing; too long a prompt is an error.
    let full = generate(&m, &[vec![1; 16]], &greedy).unwrap();
    assert!(full.responses[0].is_empty() && full.finish[0] == FinishReason::Context);
    assert!(generate(&m, &[vec![1; 17]], &greedy).is_err());
    assert!(generate(&m, &[vec![]], &greedy).is_err());
    let bad_t = SamplingConfig {
        temperature: 0.0,
        ..Default::default()
    };
    assert!(generate(&m, &[vec![1]], &bad_t).is_err());
}

#[test]
fn generate_text_decodes_responses() {
    let m = Gpt::new(GptConfig::preset("tiny").unwrap(), 13).unwrap();
    let tok = ByteTokenizer::new();
    let cfg = SamplingConfig {
        max_new_tokens: 5,
        seed: 1,
        ..Default::default()
    };
    let (texts, g) = generate_text(&m, &tok, &["ab", "héllo"], &cfg).unwrap();
    assert_eq!(texts.len(), 2);
    assert_eq!(
        g.prompts[1],
        "héllo".bytes().map(u32::from).collect::<Vec<_>>()
    );
    assert_eq!(texts[0], tok.decode(&g.responses[0]).unwrap());
}
