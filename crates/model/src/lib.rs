//! rlhf-model: GPT-2 family language models on the rlhf tensor engine.
//!
//! - [`GptConfig`]: hyper-parameters, Hugging Face `config.json` keys, presets (`tiny`,
//!   `small-cpu`, `gpt2` … `gpt2-xl`).
//! - [`Gpt`]: the trunk (learned positions, pre-LayerNorm blocks, fused QKV, tanh GELU) with
//!   the LM head tied to the token embedding; parameters named as `GPT2LMHeadModel`'s.
//!   [`Gpt::hidden_states`] is separate from [`Gpt::lm_logits`] so other heads
//!   ([`ScalarHead`], for reward and value models) sit on the same trunk. A model runs on the
//!   CPU or a CUDA device ([`Gpt::to_device`]), in f32 or mixed [`Precision`] (bf16 compute,
//!   f32 master weights and optimiser state).
//! - [`KvCache`] and [`generate()`]: batched, seeded sampling with a per-sequence cache.
//! - [`Tokenizer`]: [`ByteTokenizer`] and [`Gpt2Tokenizer`] (r50k_base).
//! - [`train`]: the masked next-token loss, a [`Trainer`] with gradient accumulation,
//!   clipping and a warmup + cosine schedule, and seeded data order.
//! - [`checkpoint`]: checkpoint directories that move both ways with `transformers`.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generate;
pub mod gpt;
pub mod head;
pub mod kv_cache;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use checkpoint::{
    load_model, load_scalar_model, load_training_state, restore_trainer, save_checkpoint,
    save_model, save_scalar_checkpoint, save_scalar_model, save_training_state, TrainingState,
};
pub use config::{GptConfig, TokenizerKind, PRESETS};
pub use error::{ModelError, Result};
pub use generate::{
    generate, generate_text, sample_token, FinishReason, Generation, PaddedSequences,
    SamplingConfig,
};
pub use gpt::{pad_batch, Gpt, Precision};
pub use head::{values_at, ScalarHead, ScalarModel};
pub use kv_cache::KvCache;
pub use tokenizer::{ByteTokenizer, Gpt2Tokenizer, Tokenizer};
pub use train::{
    lm_loss, token_logprobs, DataPosition, EpochShuffler, LmBatch, StepStats, TokenWindows,
    TrainConfig, Trainer,
};
pub use weights::{BlockWeights, GptWeights, ParamKind, ParamSpec};
