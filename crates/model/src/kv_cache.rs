//! The key/value cache of one sequence: for each layer, the keys and values of every token the
//! sequence has seen, `[H, T_cached, Dh]`, so decoding a token costs one token's projections
//! plus attention over the cache instead of a forward over the whole sequence.
//!
//! A batch of sequences holds one cache each ([`crate::Gpt::hidden_states_cached`]): sequences
//! of different lengths then need no padding and no attention mask, and a finished sequence's
//! cache is simply dropped from the batch.
//!
//! Appending concatenates along time, which copies the cache: O(T·d) per layer per token, the
//! same order as the attention over the cache itself (and the fused attention kernel wants
//! contiguous keys and values, which a preallocated, partly filled buffer viewed with `narrow`
//! would not be, so it would be copied there instead).

use crate::error::{ModelError, Result};
use rlhf_tensor::Tensor;

/// Cached keys and values of one sequence, per layer.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for a model with `n_layer` layers.
    pub fn new(n_layer: usize) -> KvCache {
        KvCache {
            layers: vec![None; n_layer],
            len: 0,
        }
    }

    pub fn n_layer(&self) -> usize {
        self.layers.len()
    }

    /// Tokens cached (the position the next token takes).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Layer `layer`'s keys and values `[H, T, Dh]`, if any.
    pub fn layer(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(layer).and_then(Option::as_ref)
    }

    /// Appends new keys and values `[H, T_new, Dh]` to layer `layer` and returns the layer's
    /// full keys and values (contiguous). The token count advances with [`KvCache::advance`]
    /// once every layer has been appended to.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n_layer = self.layers.len();
        let slot = self.layers.get_mut(layer).ok_or_else(|| {
            ModelError::invalid(
                "KvCache::append",
                format!("layer {layer} of a {n_layer}-layer cache"),
            )
        })?;
        // The stored copy is detached (a cache never carries a graph from one step to the
        // next); the returned one keeps this step's new keys and values tracked.
        let (k, v) = match slot.take() {
            None => (k.contiguous()?, v.contiguous()?),
            Some((ck, cv)) => {
                if ck.dim(-2)? != self.len {
                    return Err(ModelError::invalid(
                        "KvCache::append",
                        format!(
                            "layer {layer} holds {} tokens but the cache says {}",
                            ck.dim(-2)?,
                            self.len
                        ),
                    ));
                }
                (
                    Tensor::concat(&[&ck, k], -2)?,
                    Tensor::concat(&[&cv, v], -2)?,
                )
            }
        };
        *slot = Some((k.detach(), v.detach()));
        Ok((k, v))
    }

    /// Records that `n` tokens were appended to every layer.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
