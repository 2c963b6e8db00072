//! Tokenizers behind one trait: [`ByteTokenizer`] (each UTF-8 byte is a token, plus special
//! tokens) for small experiments, and [`Gpt2Tokenizer`] (GPT-2's byte-level BPE, r50k_base, from
//! the `tiktoken-rs` crate's embedded ranks) for real text.
//!
//! Both are byte-level, so [`Tokenizer::encode`] followed by [`Tokenizer::decode`] gives back any
//! UTF-8 text exactly. `encode` treats text that looks like a special token (`<|endoftext|>`) as
//! ordinary text, so user input can never inject one; [`Tokenizer::encode_with_special`] is the
//! variant that maps such text to the special ids (for data that marks document boundaries).

use crate::error::{ModelError, Result};

/// Text ↔ token ids.
pub trait Tokenizer: Send + Sync {
    /// A short name ("byte", "gpt2"), as stored in config.json's `rlhf_tokenizer`.
    fn name(&self) -> &'static str;
    /// Number of ids (the smallest model vocabulary that can hold them).
    fn vocab_size(&self) -> usize;
    /// The end-of-text id.
    fn eos_token_id(&self) -> u32;
    /// Encodes text, treating special-token text as ordinary characters.
    fn encode(&self, text: &str) -> Vec<u32>;
    /// Encodes text, mapping each exact occurrence of a special token's text to its id.
    fn encode_with_special(&self, text: &str) -> Vec<u32>;
    /// The bytes the ids stand for (special tokens as their text). Errors on ids outside the
    /// vocabulary.
    fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>>;

    /// The text the ids stand for. Ids from [`Tokenizer::encode`] always decode to the exact
    /// input; a sampled sequence may end inside a multi-byte character, whose bytes then
    /// become U+FFFD replacement characters.
    fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
    }
}

/// Bytes 0..=255 are ids 0..=255; then `<|endoftext|>` (256) and `<|pad|>` (257).
#[derive(Clone, Debug, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    pub const EOS: u32 = 256;
    pub const PAD: u32 = 257;
    pub const VOCAB_SIZE: usize = 258;
    /// The special tokens' text, in id order from 256.
    pub const SPECIALS: [&'static str; 2] = ["<|endoftext|>", "<|pad|>"];

    pub fn new() -> ByteTokenizer {
        ByteTokenizer
    }
}

impl Tokenizer for ByteTokenizer {
    fn name(&self) -> &'static str {
        "byte"
    }

    fn vocab_size(&self) -> usize {
        Self::VOCAB_SIZE
    }

    fn eos_token_id(&self) -> u32 {
        Self::EOS
    }

    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    fn encode_with_special(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len());
        let mut rest = text;
        'outer: while !rest.is_empty() {
            for (i, s) in Self::SPECIALS.iter().enumerate() {
                if let Some(after) = rest.strip_prefix(s) {
                    out.push(256 + i as u32);
                    rest = after;
                    continue 'outer;
                }
            }
            // Advance by one whole character so `rest` stays valid UTF-8.
            let ch = rest.chars().next().map_or(1, char::len_utf8);
            out.extend(rest[..ch].bytes().map(u32::from));
            rest = &rest[ch..];
        }
        out
    }

    fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len());
        for (pos, &id) in ids.iter().enumerate() {
            match id {
                0..=255 => out.push(id as u8),
                256..=257 => out.extend_from_slice(Self::SPECIALS[id as usize - 256].as_bytes()),
                _ => {
                    return Err(ModelError::Tokenizer {
                        tokenizer: "byte".into(),
                        msg: format!(
                            "id {id} at position {pos} is outside the vocabulary of {}",
                            Self::VOCAB_SIZE
                        ),
                    })
                }
            }
        }
        Ok(out)
    }
}

/// GPT-2's tokenizer: byte-level BPE with the r50k_base ranks (50,256 merges' worth of tokens
/// plus `<|endoftext|>` = 50256), as published with GPT-2 and used by `tiktoken`.
pub struct Gpt2Tokenizer {
    bpe: &'static tiktoken_rs::CoreBPE,
}

impl Gpt2Tokenizer {
    pub const EOS: u32 = 50256;
    pub const VOCAB_SIZE: usize = 50257;

    /// Loads the ranks embedded in `tiktoken-rs` (parsed once per process, about 0.1 s).
    pub fn new() -> Result<Gpt2Tokenizer> {
        // The singleton panics if the embedded file fails to parse; that file ships inside the
        // crate and cannot be malformed at run time, but build our own to report an error
        // rather than panic all the same.
        static BPE: std::sync::OnceLock<std::result::Result<tiktoken_rs::CoreBPE, String>> =
            std::sync::OnceLock::new();
        match BPE.get_or_init(|| tiktoken_rs::r50k_base().map_err(|e| e.to_string())) {
            Ok(bpe) => Ok(Gpt2Tokenizer { bpe }),
            Err(e) => Err(ModelError::Tokenizer {
                tokenizer: "gpt2".into(),
                msg: format!("cannot load the r50k_base ranks: {e}"),
            }),
        }
    }
}

impl std::fmt::Debug for Gpt2Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gpt2Tokenizer(r50k_base)")
    }
}

impl Tokenizer for Gpt2Tokenizer {
    fn name(&self) -> &'static str {
        "gpt2"
    }

    fn vocab_size(&self) -> usize {
        Self::VOCAB_SIZE
    }

    fn eos_token_id(&self) -> u32 {
        Self::EOS
    }

    fn encode(&self, text: &str) -> Vec<u32> {
        self.bpe.encode_ordinary(text)
    }

    fn encode_with_special(&self, text: &str) -> Vec<u32> {
        self.bpe.encode_with_special_tokens(text)
    }

    fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        // `_decode_native_and_split` panics on an unknown id, so check the range first: every
        // id below 50256 is a rank and 50256 is <|endoftext|>.
        if let Some((pos, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= Self::VOCAB_SIZE)
        {
            return Err(ModelError::Tokenizer {
                tokenizer: "gpt2".into(),
                msg: format!(
                    "id {id} at position {pos} is outside the vocabulary of {}",
                    Self::VOCAB_SIZE
                ),
            });
        }
        Ok(self
            .bpe
            ._decode_native_and_split(ids.to_vec())
            .flatten()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokenizer_specials() {
        let t = ByteTokenizer::new();
        let plain: Vec<u32> = "a<|pad|>".bytes().map(u32::from).collect();
        assert_eq!(t.encode("a<|pad|>"), plain);
        assert_eq!(t.encode_with_special("a<|pad|>"), vec![97, 257]);
        assert_eq!(
            t.encode_with_special("a<|endoftext|>é"),
            vec![97, 256, 0xC3, 0xA9]
        );
        assert_eq!(t.decode(&[104, 105, 256]).unwrap(), "hi<|endoftext|>");
        let msg = t.decode(&[1, 258]).unwrap_err().to_string();
        assert!(msg.contains("id 258 at position 1"), "{msg}");
    }
}
