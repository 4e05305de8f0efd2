//! Extraction of a [`ModelCacheSpec`] from a Hugging Face `config.json`.

use serde_json::{Map, Value};

use crate::{KvStorage, LayerKind, ModelCacheSpec, SpecError, MAX_LAYERS};

/// Spellings of the layer count, in order of preference.
const LAYER_KEYS: &[&str] = &["num_hidden_layers", "num_layers", "n_layers", "n_layer"];
/// Spellings of the attention (query) head count.
const HEAD_KEYS: &[&str] = &["num_attention_heads", "n_heads", "n_head"];
/// Spellings of the KV head count.
const KV_HEAD_KEYS: &[&str] = &["num_key_value_heads", "num_kv_heads", "n_kv_heads"];
/// Spellings of the hidden size.
const HIDDEN_KEYS: &[&str] = &["hidden_size", "d_model", "n_embd"];
/// Spellings of the every-Nth-layer-is-global pattern.
const PATTERN_KEYS: &[&str] = &["sliding_window_pattern", "_sliding_window_pattern"];

/// A view of a config: `text_config` (multimodal wrappers, Gemma 3) first, then the root.
struct Cfg<'a> {
    text: Option<&'a Map<String, Value>>,
    root: &'a Map<String, Value>,
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(_) => "a string".to_owned(),
        Value::Array(_) => "an array".to_owned(),
        Value::Object(_) => "an object".to_owned(),
    }
}

/// Reads a positive integer that fits in `u32`.
pub(crate) fn positive_u32(field: &str, value: &Value) -> Result<u32, SpecError> {
    let n = match value {
        Value::Number(n) => n.as_u64().or_else(|| {
            // Negative integers are "not positive", not a type error.
            n.as_i64().filter(|v| *v < 0).map(|_| 0)
        }),
        _ => None,
    };
    let Some(n) = n else {
        return Err(SpecError::WrongType {
            field: field.to_owned(),
            expected: "a positive integer",
            found: describe(value),
        });
    };
    if n == 0 {
        return Err(SpecError::NotPositive {
            field: field.to_owned(),
        });
    }
    u32::try_from(n).map_err(|_| SpecError::TooLarge {
        field: field.to_owned(),
        value: n,
        max: u64::from(u32::MAX),
    })
}

/// Checks a layer count against [`MAX_LAYERS`] before anything is allocated for it.
pub(crate) fn check_layer_count(field: &str, n: u32) -> Result<u32, SpecError> {
    if n > MAX_LAYERS {
        Err(SpecError::TooLarge {
            field: field.to_owned(),
            value: u64::from(n),
            max: u64::from(MAX_LAYERS),
        })
    } else {
        Ok(n)
    }
}

/// Layer kinds for "every `pattern`-th layer is global, the others slide" (Gemma 2/3,
/// Cohere 2): layer `i` is global iff `(i + 1) % pattern == 0`.
pub(crate) fn pattern_layers(num_layers: u32, pattern: u32, window: u32) -> Vec<LayerKind> {
    (0..num_layers)
        .map(|i| {
            if (i + 1) % pattern.max(1) == 0 {
                LayerKind::Global
            } else {
                LayerKind::SlidingWindow { window }
            }
        })
        .collect()
}

impl<'a> Cfg<'a> {
    fn new(config: &'a Value) -> Result<Self, SpecError> {
        let root = config.as_object().ok_or(SpecError::NotAnObject)?;
        let text = root.get("text_config").and_then(Value::as_object);
        Ok(Self { text, root })
    }

    /// The first non-null value of `key`, from `text_config` then the root.
    fn get(&self, key: &str) -> Option<&'a Value> {
        let non_null = |m: &'a Map<String, Value>| m.get(key).filter(|v| !v.is_null());
        self.text.and_then(non_null).or_else(|| non_null(self.root))
    }

    /// The first present key among `keys`, with its value.
    fn first(&self, keys: &[&'static str]) -> Option<(&'static str, &'a Value)> {
        keys.iter().find_map(|k| self.get(k).map(|v| (*k, v)))
    }

    fn opt_u32(&self, keys: &[&'static str]) -> Result<Option<u32>, SpecError> {
        self.first(keys)
            .map(|(k, v)| positive_u32(k, v))
            .transpose()
    }

    fn req_u32(&self, keys: &[&'static str]) -> Result<u32, SpecError> {
        self.opt_u32(keys)?.ok_or_else(|| SpecError::MissingField {
            field: keys.first().copied().unwrap_or_default().to_owned(),
        })
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, SpecError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(SpecError::WrongType {
                field: key.to_owned(),
                expected: "a boolean",
                found: describe(other),
            }),
        }
    }

    fn model_type(&self) -> Option<&'a str> {
        self.get("model_type").and_then(Value::as_str)
    }
}

/// Defaults that a model type's transformers config class fills in when `config.json` omits
/// them (the published Gemma checkpoints rely on these).
struct TypeDefaults {
    head_dim: Option<u32>,
    sliding_window: Option<u32>,
    pattern: Option<u32>,
}

fn type_defaults(model_type: Option<&str>) -> TypeDefaults {
    match model_type {
        Some("gemma3" | "gemma3_text") => TypeDefaults {
            head_dim: Some(256),
            sliding_window: Some(4096),
            pattern: Some(6),
        },
        Some("gemma2") => TypeDefaults {
            head_dim: Some(256),
            sliding_window: Some(4096),
            pattern: Some(2),
        },
        _ => TypeDefaults {
            head_dim: None,
            sliding_window: None,
            pattern: None,
        },
    }
}

impl ModelCacheSpec {
    /// Extracts a spec from a Hugging Face `config.json`, stored as fp16 ([`KvStorage::FP16`];
    /// change it with [`ModelCacheSpec::with_kv_storage`]).
    ///
    /// Keys are looked up in `text_config` first (multimodal wrappers such as Gemma 3), then at
    /// the root; `null` counts as absent.
    ///
    /// - Layers: `num_hidden_layers | num_layers | n_layers | n_layer`.
    /// - KV heads: `num_key_value_heads | num_kv_heads | n_kv_heads`, else the attention heads
    ///   `num_attention_heads | n_heads | n_head` (multi-head attention).
    /// - Head dim: `head_dim`, else `hidden_size / num_attention_heads` (must divide), else the
    ///   model type's default (Gemma 2/3: 256). K and V use the same head dim.
    /// - Layer kinds: `layer_types` (`"full_attention"` / `"sliding_attention"`, window from
    ///   `sliding_window`) when present; otherwise no (or `null`) `sliding_window` means all
    ///   global; `use_sliding_window: false` (Qwen 2) means all global, `true` makes layers from
    ///   `max_window_layers` on slide; `sliding_window_pattern` N (Gemma 3: 6; Gemma 2: 2 by
    ///   model type) makes layer `i` global iff `(i + 1) % N == 0`; a bare `sliding_window`
    ///   makes every layer slide (Mistral v0.1).
    ///
    /// # Multi-head latent attention (DeepSeek-V2/V3, detected by `kv_lora_rank`)
    ///
    /// The spec counts the **latent** cache that the engine keeps: per token and layer one
    /// vector of `kv_lora_rank + qk_rope_head_dim` values (the compressed latent and the RoPE
    /// key shared by all heads), as one KV head whose K and V are that vector, stored once
    /// ([`ModelCacheSpec::values_are_keys`]; the engine absorbs the per-head up-projections
    /// into the query and output projections and attends to the latent directly).
    /// DeepSeek-Coder-V2-Lite (27 layers, rank 512, RoPE 64): 256 × 576 × 2 = 294,912 bytes
    /// per block per layer in fp16, 7,962,624 per 256-token block, against 70,778,880 for the
    /// expanded 16 heads × (192 + 128) that a cache of decompressed heads holds (8.9× more
    /// tokens in the same memory).
    pub fn from_config(config: &Value, block_tokens: u32) -> Result<Self, SpecError> {
        let cfg = Cfg::new(config)?;
        let defaults = type_defaults(cfg.model_type());
        let (layers_key, _) = cfg
            .first(LAYER_KEYS)
            .unwrap_or((LAYER_KEYS[0], &Value::Null));
        let num_layers = check_layer_count(layers_key, cfg.req_u32(LAYER_KEYS)?)?;

        let (num_kv_heads, k_head_dim, v_head_dim) = if let Some(rank) = cfg.get("kv_lora_rank") {
            let rank = positive_u32("kv_lora_rank", rank)?;
            // The expanded dims are still required: a config without them is not MLA.
            cfg.req_u32(HEAD_KEYS)?;
            cfg.req_u32(&["qk_nope_head_dim"])?;
            let rope = cfg.req_u32(&["qk_rope_head_dim"])?;
            cfg.req_u32(&["v_head_dim"])?;
            let latent = rank.checked_add(rope).ok_or_else(|| SpecError::TooLarge {
                field: "kv_lora_rank + qk_rope_head_dim".to_owned(),
                value: u64::from(rank) + u64::from(rope),
                max: u64::from(u32::MAX),
            })?;
            (1, latent, latent)
        } else {
            let heads = cfg.opt_u32(HEAD_KEYS)?;
            let kv_heads = match cfg.opt_u32(KV_HEAD_KEYS)? {
                Some(n) => n,
                None => heads.ok_or_else(|| SpecError::MissingField {
                    field: KV_HEAD_KEYS[0].to_owned(),
                })?,
            };
            // Explicit `head_dim`, else the model type's default (Gemma: 256, which is not
            // hidden / heads, 3840 / 16), else hidden / heads.
            let head_dim = match (cfg.opt_u32(&["head_dim"])?, defaults.head_dim) {
                (Some(d), _) | (None, Some(d)) => d,
                (None, None) => {
                    let (hidden_key, hidden) =
                        cfg.first(HIDDEN_KEYS)
                            .ok_or_else(|| SpecError::MissingField {
                                field: "head_dim".to_owned(),
                            })?;
                    let hidden = positive_u32(hidden_key, hidden)?;
                    let heads = heads.ok_or_else(|| SpecError::MissingField {
                        field: HEAD_KEYS[0].to_owned(),
                    })?;
                    if hidden % heads != 0 {
                        return Err(SpecError::HeadDimNotDerivable {
                            field: hidden_key.to_owned(),
                            hidden_size: u64::from(hidden),
                            num_heads: u64::from(heads),
                        });
                    }
                    hidden / heads
                }
            };
            (kv_heads, head_dim, head_dim)
        };

        let layers = layer_kinds(&cfg, &defaults, num_layers)?;
        let spec = Self::new(
            layers,
            num_kv_heads,
            k_head_dim,
            v_head_dim,
            block_tokens,
            KvStorage::FP16,
        )?;
        // The latent vector is both the key and the value: stored once.
        match cfg.get("kv_lora_rank").is_some() {
            true => spec.with_values_as_keys(),
            false => Ok(spec),
        }
    }
}

/// The attention kind of each layer (see `from_config`'s rules).
fn layer_kinds(
    cfg: &Cfg<'_>,
    defaults: &TypeDefaults,
    num_layers: u32,
) -> Result<Vec<LayerKind>, SpecError> {
    let window = match cfg.opt_u32(&["sliding_window"])? {
        Some(w) => Some(w),
        // A Gemma config that omits `sliding_window` gets its class default; an explicit null
        // (absent here too) on other models means no sliding window.
        None => defaults.sliding_window,
    };
    let all = |kind: LayerKind| Ok(vec![kind; num_layers as usize]);

    if let Some(types) = cfg.get("layer_types") {
        let field = "layer_types";
        let Value::Array(types) = types else {
            return Err(SpecError::WrongType {
                field: field.to_owned(),
                expected: "an array of strings",
                found: describe(types),
            });
        };
        if types.len() != num_layers as usize {
            return Err(SpecError::LayerCount {
                field: field.to_owned(),
                expected: u64::from(num_layers),
                found: u64::try_from(types.len()).unwrap_or(u64::MAX),
            });
        }
        return types
            .iter()
            .enumerate()
            .map(|(index, t)| match t.as_str() {
                Some("full_attention") => Ok(LayerKind::Global),
                Some("sliding_attention") => window
                    .map(|window| LayerKind::SlidingWindow { window })
                    .ok_or_else(|| SpecError::MissingField {
                        field: "sliding_window".to_owned(),
                    }),
                _ => Err(SpecError::UnsupportedLayerType {
                    field: field.to_owned(),
                    index,
                    value: t.as_str().map_or_else(|| describe(t), str::to_owned),
                }),
            })
            .collect();
    }

    let Some(window) = window else {
        return all(LayerKind::Global);
    };
    let sliding = LayerKind::SlidingWindow { window };
    match cfg.opt_bool("use_sliding_window")? {
        Some(false) => return all(LayerKind::Global),
        Some(true) => {
            let first_sliding = match cfg.get("max_window_layers") {
                None => 0,
                Some(Value::Number(n)) if n.as_u64() == Some(0) => 0,
                Some(v) => positive_u32("max_window_layers", v)?,
            };
            return Ok((0..num_layers)
                .map(|i| {
                    if i >= first_sliding {
                        sliding
                    } else {
                        LayerKind::Global
                    }
                })
                .collect());
        }
        None => {}
    }
    match cfg.opt_u32(PATTERN_KEYS)?.or(defaults.pattern) {
        Some(pattern) => Ok(pattern_layers(num_layers, pattern, window)),
        None => all(sliding),
    }
}
