//! Extraction of a [`ModelCacheSpec`] from GGUF metadata given as a key/value map.

use std::collections::HashMap;
use std::hash::BuildHasher;

use serde_json::Value;

use crate::config::{check_layer_count, pattern_layers, positive_u32};
use crate::{KvStorage, LayerKind, ModelCacheSpec, SpecError};

/// Reads GGUF keys through a lookup function; `arch` is `general.architecture`.
struct Gguf<'a, F> {
    lookup: F,
    arch: &'a str,
}

impl<'a, F: Fn(&str) -> Option<&'a Value>> Gguf<'a, F> {
    fn key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.arch)
    }

    fn get(&self, suffix: &str) -> (String, Option<&'a Value>) {
        let key = self.key(suffix);
        let value = (self.lookup)(&key).filter(|v| !v.is_null());
        (key, value)
    }

    /// A positive count; a per-layer array is accepted when all its entries are equal.
    fn opt_u32(&self, suffix: &str) -> Result<Option<u32>, SpecError> {
        let (key, value) = self.get(suffix);
        let Some(value) = value else { return Ok(None) };
        if let Value::Array(items) = value {
            let mut uniform: Option<u32> = None;
            for item in items {
                let n = positive_u32(&key, item).map_err(|e| match e {
                    SpecError::NotPositive { field } => SpecError::VariableHeads { field },
                    other => other,
                })?;
                match uniform {
                    Some(u) if u != n => return Err(SpecError::VariableHeads { field: key }),
                    _ => uniform = Some(n),
                }
            }
            return match uniform {
                Some(n) => Ok(Some(n)),
                None => Err(SpecError::NotPositive { field: key }),
            };
        }
        positive_u32(&key, value).map(Some)
    }

    fn req_u32(&self, suffix: &str) -> Result<u32, SpecError> {
        self.opt_u32(suffix)?
            .ok_or_else(|| SpecError::MissingField {
                field: self.key(suffix),
            })
    }

    /// Head dim from `suffix`, else `embedding_length / head_count`.
    fn head_dim(&self, suffix: &str, heads: u32) -> Result<u32, SpecError> {
        if let Some(d) = self.opt_u32(suffix)? {
            return Ok(d);
        }
        let hidden_key = self.key("embedding_length");
        let hidden = self
            .opt_u32("embedding_length")?
            .ok_or_else(|| SpecError::MissingField {
                field: self.key(suffix),
            })?;
        if hidden % heads != 0 {
            return Err(SpecError::HeadDimNotDerivable {
                field: hidden_key,
                hidden_size: u64::from(hidden),
                num_heads: u64::from(heads),
            });
        }
        Ok(hidden / heads)
    }
}

impl ModelCacheSpec {
    /// Extracts a spec from GGUF metadata (as read by an adapter), stored as fp16.
    ///
    /// Reads `general.architecture` (`<arch>` below), then `<arch>.block_count`,
    /// `<arch>.attention.head_count`, `<arch>.attention.head_count_kv` (default: head count),
    /// `<arch>.attention.key_length` and `<arch>.attention.value_length` (default:
    /// `<arch>.embedding_length / head_count`). Per-layer head-count arrays are accepted when
    /// uniform. GGUF integers, strings, booleans and arrays map to the JSON equivalents.
    ///
    /// MLA (DeepSeek-V2/V3, `<arch>.attention.kv_lora_rank` present): the latent cache, as
    /// [`ModelCacheSpec::from_config`] counts it: one KV head of `kv_lora_rank +
    /// rope.dimension_count` for K and for V, whichever way the file describes the heads
    /// (older conversions: expanded `key_length`/`value_length`; newer: latent ones plus
    /// `*_mla`).
    ///
    /// Sliding windows: `<arch>.attention.sliding_window` with
    /// `<arch>.attention.sliding_window_pattern` as a per-layer boolean array (`true` = sliding)
    /// or an integer N (every Nth layer global); without a pattern, `gemma3` uses 6, `gemma2` 2,
    /// `cohere2` 4, and other architectures slide on every layer. A window of 0 means none.
    pub fn from_gguf_metadata<S: BuildHasher>(
        metadata: &HashMap<String, Value, S>,
        block_tokens: u32,
    ) -> Result<Self, SpecError> {
        Self::from_gguf_lookup(|key| metadata.get(key), block_tokens)
    }

    /// [`ModelCacheSpec::from_gguf_metadata`] over any key lookup (a `BTreeMap`, a JSON object).
    pub fn from_gguf_lookup<'a, F>(lookup: F, block_tokens: u32) -> Result<Self, SpecError>
    where
        F: Fn(&str) -> Option<&'a Value>,
    {
        let arch_key = "general.architecture";
        let arch = match lookup(arch_key) {
            Some(Value::String(s)) => s.as_str(),
            None | Some(Value::Null) => {
                return Err(SpecError::MissingField {
                    field: arch_key.to_owned(),
                })
            }
            Some(other) => {
                return Err(SpecError::WrongType {
                    field: arch_key.to_owned(),
                    expected: "a string",
                    found: format!("{other}").chars().take(40).collect(),
                })
            }
        };
        let g = Gguf { lookup, arch };
        let num_layers = check_layer_count(&g.key("block_count"), g.req_u32("block_count")?)?;
        let heads = g.req_u32("attention.head_count")?;

        let latent_attention = g.opt_u32("attention.kv_lora_rank")?.is_some();
        let (num_kv_heads, k_head_dim, v_head_dim) =
            if let Some(rank) = g.opt_u32("attention.kv_lora_rank")? {
                let rope = g.req_u32("rope.dimension_count")?;
                let latent = rank.checked_add(rope).ok_or(SpecError::Overflow)?;
                (1, latent, latent)
            } else {
                let kv_heads = g.opt_u32("attention.head_count_kv")?.unwrap_or(heads);
                let k = g.head_dim("attention.key_length", heads)?;
                let v = g.head_dim("attention.value_length", heads)?;
                (kv_heads, k, v)
            };

        // A window of 0 is llama.cpp's "no sliding window" (its Phi-3 converter writes 0 for
        // the models without one, Phi-4-mini among them).
        let no_window = g.get("attention.sliding_window").1.and_then(Value::as_u64) == Some(0);
        let window = if no_window {
            None
        } else {
            g.opt_u32("attention.sliding_window")?
        };
        let layers = match window {
            None => vec![LayerKind::Global; num_layers as usize],
            Some(window) => sliding_layers(&g, num_layers, window)?,
        };
        let spec = Self::new(
            layers,
            num_kv_heads,
            k_head_dim,
            v_head_dim,
            block_tokens,
            KvStorage::FP16,
        )?;
        // The latent vector is both the key and the value: stored once.
        match latent_attention {
            true => spec.with_values_as_keys(),
            false => Ok(spec),
        }
    }
}

fn sliding_layers<'a, F: Fn(&str) -> Option<&'a Value>>(
    g: &Gguf<'a, F>,
    num_layers: u32,
    window: u32,
) -> Result<Vec<LayerKind>, SpecError> {
    let (key, pattern) = g.get("attention.sliding_window_pattern");
    let sliding = LayerKind::SlidingWindow { window };
    match pattern {
        Some(Value::Array(flags)) => {
            if flags.len() != num_layers as usize {
                return Err(SpecError::LayerCount {
                    field: key,
                    expected: u64::from(num_layers),
                    found: u64::try_from(flags.len()).unwrap_or(u64::MAX),
                });
            }
            flags
                .iter()
                .enumerate()
                .map(|(index, f)| match f {
                    Value::Bool(true) => Ok(sliding),
                    Value::Bool(false) => Ok(LayerKind::Global),
                    other => Err(SpecError::UnsupportedLayerType {
                        field: key.clone(),
                        index,
                        value: format!("{other}").chars().take(40).collect(),
                    }),
                })
                .collect()
        }
        Some(v) => Ok(pattern_layers(num_layers, positive_u32(&key, v)?, window)),
        None => {
            let default_pattern = match g.arch {
                "gemma3" => Some(6),
                "gemma2" => Some(2),
                "cohere2" => Some(4),
                _ => None,
            };
            Ok(match default_pattern {
                Some(p) => pattern_layers(num_layers, p, window),
                None => vec![sliding; num_layers as usize],
            })
        }
    }
}
