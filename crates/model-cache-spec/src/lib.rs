//! `ModelCacheSpec`: the KV-cache shape of a model and its capacity maths (pure domain).
//!
//! A spec says, for one model, how many layers keep a KV cache (and whether each is global or
//! sliding-window), how many KV heads and which K and V head dims each layer stores, how many
//! tokens make one cache block, and how the cache is stored (float or quantized). From that it
//! derives the byte cost of a block, which sizes the block pool from a memory budget.
//!
//! Specs are built from a Hugging Face `config.json` ([`ModelCacheSpec::from_config`]), from GGUF
//! metadata given as a key/value map ([`ModelCacheSpec::from_gguf_metadata`]), or directly
//! ([`ModelCacheSpec::new`]). This crate never reads files, never panics on input and does all
//! size arithmetic in checked `u64`.
//!
//! # What a block costs
//!
//! A block holds `block_tokens` tokens of K and V for **every** layer. On one layer it costs
//! (see [`ModelCacheSpec::bytes_per_block_per_layer`]):
//!
//! - float storage: `block_tokens × num_kv_heads × (k_head_dim + v_head_dim) × bytes`;
//! - quantized storage (MLX affine quantization): for each of K and V,
//!   `bits × elements / 8` plus one 2-byte scale and one 2-byte bias per `group_size` elements.
//!
//! A stored block carries every layer, sliding or not: blocks are the unit of sharing and
//! persistence, and a restore to any block boundary needs each sliding layer's window there.
//! In RAM a sliding-window layer keeps only its window plus one block (the engine drops older
//! blocks once they are stored), so a sequence's resident cost
//! ([`ModelCacheSpec::resident_bytes`], [`ModelCacheSpec::resident_blocks`]) grows with the
//! global layers alone past the window.

mod config;
mod error;
mod gguf;

use serde::{Deserialize, Serialize};

pub use error::SpecError;

/// Default number of tokens per cache block.
pub const DEFAULT_BLOCK_TOKENS: u32 = 256;

/// `block_tokens` must be a positive multiple of this (kernel- and quantization-friendly).
pub const BLOCK_TOKENS_MULTIPLE: u32 = 64;

/// Default group size of quantized KV storage (MLX's default affine quantization group).
pub const DEFAULT_QUANT_GROUP_SIZE: u32 = 64;

/// Most layers a spec may have; bounds memory when reading untrusted configs.
pub const MAX_LAYERS: u32 = 4096;

/// Bytes of one quantization scale and of one bias (fp16).
pub const QUANT_PARAM_BYTES: u64 = 2;

/// The attention kind of one layer, which decides how far back it attends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LayerKind {
    /// Full (global) attention over the whole context.
    Global,
    /// Attention over the last `window` tokens only.
    SlidingWindow {
        /// Window length in tokens (positive).
        window: u32,
    },
}

impl LayerKind {
    /// The window of a sliding-window layer, `None` for a global layer.
    #[must_use]
    pub fn window(&self) -> Option<u32> {
        match self {
            Self::Global => None,
            Self::SlidingWindow { window } => Some(*window),
        }
    }

    /// Whether this layer uses sliding-window attention.
    #[must_use]
    pub fn is_sliding(&self) -> bool {
        matches!(self, Self::SlidingWindow { .. })
    }
}

/// How K and V values are stored in a cache block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KvStorage {
    /// Plain floats of `bytes` bytes each: 2 (fp16/bf16) or 4 (fp32).
    Float {
        /// Bytes per element: 2 or 4.
        bytes: u8,
    },
    /// MLX affine quantization: `bits` per element (8 or 4), plus an fp16 scale and an fp16
    /// bias per `group_size` consecutive elements of a head vector.
    Quantized {
        /// Bits per element: 8 or 4.
        bits: u8,
        /// Elements per quantization group: 32, 64 or 128, dividing both head dims.
        group_size: u32,
    },
}

impl Default for KvStorage {
    /// fp16, the compute dtype of most served checkpoints.
    fn default() -> Self {
        Self::FP16
    }
}

impl KvStorage {
    /// 16-bit floats (fp16 or bf16).
    pub const FP16: Self = Self::Float { bytes: 2 };
    /// 32-bit floats.
    pub const FP32: Self = Self::Float { bytes: 4 };
    /// 8-bit quantization with the default group size (64).
    pub const Q8: Self = Self::Quantized {
        bits: 8,
        group_size: DEFAULT_QUANT_GROUP_SIZE,
    };
    /// 4-bit quantization with the default group size (64).
    pub const Q4: Self = Self::Quantized {
        bits: 4,
        group_size: DEFAULT_QUANT_GROUP_SIZE,
    };

    /// Whether the storage is quantized.
    #[must_use]
    pub fn is_quantized(&self) -> bool {
        matches!(self, Self::Quantized { .. })
    }

    /// Checks the storage parameters against the head dims they apply to.
    fn validate(&self, k_head_dim: u32, v_head_dim: u32) -> Result<(), SpecError> {
        match *self {
            Self::Float { bytes } => match bytes {
                2 | 4 => Ok(()),
                _ => Err(SpecError::FloatBytes { bytes }),
            },
            Self::Quantized { bits, group_size } => {
                if !matches!(bits, 4 | 8) {
                    return Err(SpecError::QuantBits { bits });
                }
                let ok = matches!(group_size, 32 | 64 | 128)
                    && k_head_dim % group_size == 0
                    && v_head_dim % group_size == 0;
                if ok {
                    Ok(())
                } else {
                    Err(SpecError::GroupSize {
                        group_size,
                        k_head_dim,
                        v_head_dim,
                    })
                }
            }
        }
    }

    /// Bytes to store one tensor of `elements` values, `None` on overflow.
    ///
    /// For quantized storage `elements` is a multiple of the group size (the group divides the
    /// head dim) and of 8 (block tokens are a multiple of 64), so the divisions are exact.
    fn tensor_bytes(&self, elements: u64) -> Option<u64> {
        match *self {
            Self::Float { bytes } => elements.checked_mul(u64::from(bytes)),
            Self::Quantized { bits, group_size } => {
                let data = elements.checked_mul(u64::from(bits))? / 8;
                let groups = elements / u64::from(group_size.max(1));
                let params = groups.checked_mul(2 * QUANT_PARAM_BYTES)?;
                data.checked_add(params)
            }
        }
    }

    /// Stable short text form used in [`ModelCacheSpec::canonical_string`].
    fn canonical(&self) -> String {
        match self {
            Self::Float { bytes } => format!("float{bytes}"),
            Self::Quantized { bits, group_size } => format!("q{bits}g{group_size}"),
        }
    }
}

/// The KV-cache shape of one model: layers, heads, head dims, block size and storage.
///
/// Immutable value object; every constructor validates, so every value of this type is valid
/// and its size arithmetic cannot overflow. Serializes with serde (shown by the HTTP API) and
/// deserializes with the same validation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawSpec")]
pub struct ModelCacheSpec {
    layers: Vec<LayerKind>,
    num_kv_heads: u32,
    k_head_dim: u32,
    v_head_dim: u32,
    block_tokens: u32,
    kv_storage: KvStorage,
    /// The values are the keys (latent attention's one vector per token): V is not stored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    values_are_keys: bool,
}

/// Unvalidated mirror of [`ModelCacheSpec`], the deserialization input.
#[derive(Deserialize)]
struct RawSpec {
    layers: Vec<LayerKind>,
    num_kv_heads: u32,
    k_head_dim: u32,
    v_head_dim: u32,
    block_tokens: u32,
    kv_storage: KvStorage,
    #[serde(default)]
    values_are_keys: bool,
}

impl TryFrom<RawSpec> for ModelCacheSpec {
    type Error = SpecError;

    fn try_from(raw: RawSpec) -> Result<Self, SpecError> {
        let spec = Self::new(
            raw.layers,
            raw.num_kv_heads,
            raw.k_head_dim,
            raw.v_head_dim,
            raw.block_tokens,
            raw.kv_storage,
        )?;
        if raw.values_are_keys {
            spec.with_values_as_keys()
        } else {
            Ok(spec)
        }
    }
}

fn positive(field: &str, value: u32) -> Result<u32, SpecError> {
    if value == 0 {
        Err(SpecError::NotPositive {
            field: field.to_owned(),
        })
    } else {
        Ok(value)
    }
}

impl ModelCacheSpec {
    /// Builds a validated spec.
    ///
    /// Errors: no layers or more than [`MAX_LAYERS`]; a zero head count, head dim or window;
    /// `block_tokens` not a positive multiple of 64; invalid storage; sizes overflowing `u64`.
    pub fn new(
        layers: Vec<LayerKind>,
        num_kv_heads: u32,
        k_head_dim: u32,
        v_head_dim: u32,
        block_tokens: u32,
        kv_storage: KvStorage,
    ) -> Result<Self, SpecError> {
        if layers.is_empty() {
            return Err(SpecError::NotPositive {
                field: "num_layers".to_owned(),
            });
        }
        let count = u64::try_from(layers.len()).unwrap_or(u64::MAX);
        if count > u64::from(MAX_LAYERS) {
            return Err(SpecError::TooLarge {
                field: "num_layers".to_owned(),
                value: count,
                max: u64::from(MAX_LAYERS),
            });
        }
        for (index, layer) in layers.iter().enumerate() {
            if layer.window() == Some(0) {
                return Err(SpecError::NotPositive {
                    field: format!("layers[{index}].window"),
                });
            }
        }
        positive("num_kv_heads", num_kv_heads)?;
        positive("k_head_dim", k_head_dim)?;
        positive("v_head_dim", v_head_dim)?;
        if block_tokens == 0 || block_tokens % BLOCK_TOKENS_MULTIPLE != 0 {
            return Err(SpecError::BlockTokens {
                value: block_tokens,
            });
        }
        kv_storage.validate(k_head_dim, v_head_dim)?;
        let spec = Self {
            layers,
            num_kv_heads,
            k_head_dim,
            v_head_dim,
            block_tokens,
            kv_storage,
            values_are_keys: false,
        };
        // Every size accessor derives from this product; proving it fits here lets them be
        // infallible.
        spec.checked_bytes_per_block().ok_or(SpecError::Overflow)?;
        Ok(spec)
    }

    /// A spec of `num_layers` global layers with equal K and V head dims, stored as fp16.
    pub fn uniform(
        num_layers: u32,
        num_kv_heads: u32,
        head_dim: u32,
        block_tokens: u32,
    ) -> Result<Self, SpecError> {
        positive("num_layers", num_layers)?;
        if num_layers > MAX_LAYERS {
            return Err(SpecError::TooLarge {
                field: "num_layers".to_owned(),
                value: u64::from(num_layers),
                max: u64::from(MAX_LAYERS),
            });
        }
        let layers = vec![LayerKind::Global; num_layers as usize];
        Self::new(
            layers,
            num_kv_heads,
            head_dim,
            head_dim,
            block_tokens,
            KvStorage::FP16,
        )
    }

    /// The same spec with another block size (validated: positive multiple of 64).
    pub fn with_block_tokens(self, block_tokens: u32) -> Result<Self, SpecError> {
        let shared = self.values_are_keys;
        Self::new(
            self.layers,
            self.num_kv_heads,
            self.k_head_dim,
            self.v_head_dim,
            block_tokens,
            self.kv_storage,
        )
        .map(|s| Self {
            values_are_keys: shared,
            ..s
        })
    }

    /// The same spec with another KV storage (validated against the head dims).
    pub fn with_kv_storage(self, kv_storage: KvStorage) -> Result<Self, SpecError> {
        let shared = self.values_are_keys;
        Self::new(
            self.layers,
            self.num_kv_heads,
            self.k_head_dim,
            self.v_head_dim,
            self.block_tokens,
            kv_storage,
        )
        .map(|s| Self {
            values_are_keys: shared,
            ..s
        })
    }

    /// The same spec with other layer kinds (an engine that applies other windows than the
    /// config names, or none, says so here so the capacity maths match what it keeps).
    /// Validated like [`ModelCacheSpec::new`].
    pub fn with_layers(self, layers: Vec<LayerKind>) -> Result<Self, SpecError> {
        let shared = self.values_are_keys;
        Self::new(
            layers,
            self.num_kv_heads,
            self.k_head_dim,
            self.v_head_dim,
            self.block_tokens,
            self.kv_storage,
        )
        .map(|s| Self {
            values_are_keys: shared,
            ..s
        })
    }

    /// The same spec whose values are its keys (multi-head latent attention: one cached
    /// vector per token and layer serves as both), so V costs nothing. Errors when K and V
    /// have different head dims.
    pub fn with_values_as_keys(self) -> Result<Self, SpecError> {
        if self.k_head_dim != self.v_head_dim {
            return Err(SpecError::Inconsistent {
                field: "v_head_dim".to_owned(),
                reason: format!(
                    "values that are the keys need equal head dims (k {}, v {})",
                    self.k_head_dim, self.v_head_dim
                ),
            });
        }
        Ok(Self {
            values_are_keys: true,
            ..self
        })
    }

    /// Whether the values are the keys (stored once; see
    /// [`ModelCacheSpec::with_values_as_keys`]).
    #[must_use]
    pub fn values_are_keys(&self) -> bool {
        self.values_are_keys
    }

    /// The attention kind of every layer, in order.
    #[must_use]
    pub fn layers(&self) -> &[LayerKind] {
        &self.layers
    }

    /// Number of layers that keep a KV cache.
    #[must_use]
    pub fn num_layers(&self) -> u32 {
        // Invariant: 1 ≤ len ≤ MAX_LAYERS (checked in `new`), so this never saturates.
        u32::try_from(self.layers.len()).unwrap_or(u32::MAX)
    }

    /// Number of sliding-window layers.
    #[must_use]
    pub fn num_sliding_layers(&self) -> u32 {
        let n = self.layers.iter().filter(|l| l.is_sliding()).count();
        // Invariant: n ≤ len ≤ MAX_LAYERS.
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// KV heads per layer (for MLA models 1: the latent; see `from_config`).
    #[must_use]
    pub fn num_kv_heads(&self) -> u32 {
        self.num_kv_heads
    }

    /// Dimension of one K head vector.
    #[must_use]
    pub fn k_head_dim(&self) -> u32 {
        self.k_head_dim
    }

    /// Dimension of one V head vector (differs from K for MLA models).
    #[must_use]
    pub fn v_head_dim(&self) -> u32 {
        self.v_head_dim
    }

    /// Tokens per cache block.
    #[must_use]
    pub fn block_tokens(&self) -> u32 {
        self.block_tokens
    }

    /// How K and V are stored.
    #[must_use]
    pub fn kv_storage(&self) -> KvStorage {
        self.kv_storage
    }

    fn checked_bytes_per_block_per_layer(&self) -> Option<u64> {
        let per_token_heads =
            u64::from(self.block_tokens).checked_mul(u64::from(self.num_kv_heads))?;
        let k = self
            .kv_storage
            .tensor_bytes(per_token_heads.checked_mul(u64::from(self.k_head_dim))?)?;
        if self.values_are_keys {
            return Some(k);
        }
        let v = self
            .kv_storage
            .tensor_bytes(per_token_heads.checked_mul(u64::from(self.v_head_dim))?)?;
        k.checked_add(v)
    }

    fn checked_bytes_per_block(&self) -> Option<u64> {
        self.checked_bytes_per_block_per_layer()?
            .checked_mul(u64::from(self.num_layers()))
    }

    /// Bytes of K and V of one block on one layer (every layer costs the same, sliding or not).
    #[must_use]
    pub fn bytes_per_block_per_layer(&self) -> u64 {
        // Invariant: `new` proved the whole-block product fits in u64, so no saturation.
        self.checked_bytes_per_block_per_layer().unwrap_or(u64::MAX)
    }

    /// Bytes of one block over all layers: the unit the pool budget is divided by.
    #[must_use]
    pub fn bytes_per_block(&self) -> u64 {
        // Invariant: checked in `new`.
        self.checked_bytes_per_block().unwrap_or(u64::MAX)
    }

    /// Bytes of one token over all layers (`bytes_per_block / block_tokens`, exact).
    #[must_use]
    pub fn bytes_per_token(&self) -> u64 {
        self.bytes_per_block() / u64::from(self.block_tokens)
    }

    /// Whole blocks that fit in `bytes`.
    #[must_use]
    pub fn blocks_for_budget(&self, bytes: u64) -> u64 {
        // bytes_per_block ≥ 1 because every factor is positive (checked in `new`).
        bytes / self.bytes_per_block().max(1)
    }

    /// Tokens that fit in `bytes`, counting whole blocks only (the pool allocates blocks).
    #[must_use]
    pub fn tokens_for_budget(&self, bytes: u64) -> u64 {
        self.blocks_for_budget(bytes)
            .saturating_mul(u64::from(self.block_tokens))
    }

    /// Blocks needed to hold `tokens` tokens (rounded up).
    #[must_use]
    pub fn blocks_for_tokens(&self, tokens: u64) -> u64 {
        tokens.div_ceil(u64::from(self.block_tokens))
    }

    /// Blocks one layer keeps in RAM for a sequence of `tokens` tokens: all of them on a
    /// global layer; on a sliding layer at most its window plus one block, plus `extra`
    /// tokens appended since the layer last dropped blocks (a prefill chunk, a decode run).
    #[must_use]
    pub fn layer_resident_blocks(&self, layer: LayerKind, tokens: u64, extra: u64) -> u64 {
        let all = self.blocks_for_tokens(tokens);
        match layer.window() {
            None => all,
            Some(w) => all.min(
                u64::from(w)
                    .saturating_add(extra)
                    .div_ceil(u64::from(self.block_tokens))
                    .saturating_add(1),
            ),
        }
    }

    /// Bytes a sequence of `tokens` tokens keeps in RAM over all layers (see
    /// [`ModelCacheSpec::layer_resident_blocks`] for `extra`); equal to
    /// `blocks_for_tokens × bytes_per_block` when no layer slides.
    #[must_use]
    pub fn resident_bytes(&self, tokens: u64, extra: u64) -> u64 {
        self.resident_layer_blocks(tokens, extra)
            .saturating_mul(self.bytes_per_block_per_layer())
    }

    /// [`ModelCacheSpec::resident_bytes`] in whole blocks of [`ModelCacheSpec::bytes_per_block`]
    /// (rounded up): what a sequence is charged in a block pool sized by
    /// [`ModelCacheSpec::blocks_for_budget`].
    #[must_use]
    pub fn resident_blocks(&self, tokens: u64, extra: u64) -> u64 {
        self.resident_layer_blocks(tokens, extra)
            .div_ceil(u64::from(self.num_layers()).max(1))
    }

    fn resident_layer_blocks(&self, tokens: u64, extra: u64) -> u64 {
        self.layers
            .iter()
            .map(|&l| self.layer_resident_blocks(l, tokens, extra))
            .fold(0u64, u64::saturating_add)
    }

    /// The longest single sequence whose resident KV ([`ModelCacheSpec::resident_bytes`], at
    /// rest) fits in `bytes`, in whole blocks; `u64::MAX` when only sliding layers keep KV
    /// and their windows fit (the sequence can grow without bound).
    #[must_use]
    pub fn max_sequence_tokens(&self, bytes: u64) -> u64 {
        let per_layer = self.bytes_per_block_per_layer().max(1);
        let bt = u64::from(self.block_tokens);
        let globals = u64::from(self.num_layers() - self.num_sliding_layers());
        // Blocks of every sliding layer once past its window (a fixed cost).
        let window_cost: u64 = self
            .layers
            .iter()
            .filter_map(|l| l.window())
            .map(|w| u64::from(w).div_ceil(bt).saturating_add(1))
            .fold(0, u64::saturating_add);
        let layer_blocks = bytes / per_layer;
        if globals == 0 {
            return if layer_blocks >= window_cost {
                u64::MAX
            } else {
                // Below every window: every layer holds every block.
                (layer_blocks / u64::from(self.num_layers()).max(1)).saturating_mul(bt)
            };
        }
        // Largest n with resident_layer_blocks(n) <= layer_blocks: search over blocks.
        let (mut lo, mut hi) = (0u64, layer_blocks / globals);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if self.resident_layer_blocks(mid.saturating_mul(bt), 0) <= layer_blocks {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo.saturating_mul(bt)
    }

    /// Stable text form of the spec, for hashing into a model fingerprint.
    ///
    /// Format (version `mcs1`, never changed in place; a new format gets a new version):
    /// `mcs1;layers=<runs>;kv_heads=<n>;k_head_dim=<n>;v_head_dim=<n>;block_tokens=<n>;kv=<s>`
    /// where `<runs>` is the run-length encoded layer list (`g` global, `s<window>` sliding,
    /// `*<count>` per run, comma separated) and `<s>` is `float<bytes>` or
    /// `q<bits>g<group_size>`. Example: `mcs1;layers=s1024*5,g*1;...`.
    #[must_use]
    pub fn canonical_string(&self) -> String {
        let mut runs: Vec<(LayerKind, usize)> = Vec::new();
        for layer in &self.layers {
            match runs.last_mut() {
                Some((kind, count)) if kind == layer => *count += 1,
                _ => runs.push((*layer, 1)),
            }
        }
        let runs: Vec<String> = runs
            .iter()
            .map(|(kind, count)| match kind {
                LayerKind::Global => format!("g*{count}"),
                LayerKind::SlidingWindow { window } => format!("s{window}*{count}"),
            })
            .collect();
        // Values stored as the keys add `;values=keys` (absent otherwise, so the other
        // specs' strings, and the fingerprints hashed from them, are unchanged).
        format!(
            "mcs1;layers={};kv_heads={};k_head_dim={};v_head_dim={};block_tokens={};kv={}{}",
            runs.join(","),
            self.num_kv_heads,
            self.k_head_dim,
            self.v_head_dim,
            self.block_tokens,
            self.kv_storage.canonical(),
            if self.values_are_keys {
                ";values=keys"
            } else {
                ""
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_like_uniform_spec_sizes() -> Result<(), SpecError> {
        let spec = ModelCacheSpec::uniform(30, 3, 64, DEFAULT_BLOCK_TOKENS)?;
        assert_eq!(spec.bytes_per_block_per_layer(), 196_608);
        assert_eq!(spec.bytes_per_block(), 196_608 * 30);
        assert_eq!(spec.bytes_per_token(), 196_608 * 30 / 256);
        assert_eq!(spec.blocks_for_budget(196_608 * 30 * 3 + 1), 3);
        assert_eq!(spec.tokens_for_budget(196_608 * 30 * 3 + 1), 768);
        assert_eq!(spec.blocks_for_tokens(257), 2);
        Ok(())
    }

    #[test]
    fn sliding_layers_keep_window_plus_one_block_in_ram() -> Result<(), SpecError> {
        // Gemma 3 270M: 18 layers, every 6th global, window 512, one KV head of 256.
        let layers = (0..18)
            .map(|i| {
                if (i + 1) % 6 == 0 {
                    LayerKind::Global
                } else {
                    LayerKind::SlidingWindow { window: 512 }
                }
            })
            .collect();
        let spec = ModelCacheSpec::new(layers, 1, 256, 256, 256, KvStorage::FP16)?;
        let per_layer = spec.bytes_per_block_per_layer();
        assert_eq!(per_layer, 262_144);
        // Within the window every layer holds every block.
        assert_eq!(spec.resident_bytes(512, 0), 2 * 18 * per_layer);
        assert_eq!(spec.resident_blocks(512, 0), 2);
        // 32K tokens: 128 blocks on 3 global layers, 3 (512 / 256 + 1) on 15 sliding ones.
        assert_eq!(
            spec.resident_bytes(32_768, 0),
            (128 * 3 + 3 * 15) * per_layer
        );
        assert_eq!(
            spec.resident_blocks(32_768, 0),
            (128 * 3 + 45u64).div_ceil(18)
        );
        // A turn's prefill chunk and answer come on top of the window.
        assert_eq!(
            spec.layer_resident_blocks(spec.layers()[0], 32_768, 256 + 100),
            (512u64 + 356).div_ceil(256) + 1
        );
        // The longest sequence 1 GiB holds: (4096 − 45) / 3 blocks, 5.9 × as many tokens as full blocks.
        let budget = 1 << 30;
        let longest = spec.max_sequence_tokens(budget);
        assert!(spec.resident_bytes(longest, 0) <= budget);
        assert!(spec.resident_bytes(longest + 256, 0) > budget);
        assert_eq!(longest, 1350 * 256);
        assert!(longest > 5 * spec.tokens_for_budget(budget));
        // Only sliding layers: any length fits once the windows do.
        let all_sliding = ModelCacheSpec::new(
            vec![LayerKind::SlidingWindow { window: 4096 }; 4],
            8,
            128,
            128,
            256,
            KvStorage::FP16,
        )?;
        assert_eq!(all_sliding.max_sequence_tokens(1 << 30), u64::MAX);
        Ok(())
    }

    #[test]
    fn validation_names_the_field() {
        let e = ModelCacheSpec::uniform(30, 0, 64, 256).err();
        assert_eq!(e.as_ref().and_then(SpecError::field), Some("num_kv_heads"));
        let e = ModelCacheSpec::uniform(30, 3, 64, 100).err();
        assert_eq!(e, Some(SpecError::BlockTokens { value: 100 }));
        let e = ModelCacheSpec::uniform(30, 3, 64, 0).err();
        assert_eq!(e, Some(SpecError::BlockTokens { value: 0 }));
        let e = ModelCacheSpec::uniform(0, 3, 64, 256).err();
        assert_eq!(e.as_ref().and_then(SpecError::field), Some("num_layers"));
        let e = ModelCacheSpec::uniform(MAX_LAYERS + 1, 3, 64, 256).err();
        assert!(matches!(e, Some(SpecError::TooLarge { .. })));
        let e = ModelCacheSpec::new(
            vec![LayerKind::SlidingWindow { window: 0 }],
            1,
            64,
            64,
            64,
            KvStorage::FP16,
        )
        .err();
        assert_eq!(
            e.as_ref().and_then(SpecError::field),
            Some("layers[0].window")
        );
    }

    #[test]
    fn storage_validation() -> Result<(), SpecError> {
        let spec = ModelCacheSpec::uniform(2, 2, 96, 64)?;
        assert_eq!(
            spec.clone().with_kv_storage(KvStorage::Float { bytes: 1 }),
            Err(SpecError::FloatBytes { bytes: 1 })
        );
        assert_eq!(
            spec.clone().with_kv_storage(KvStorage::Quantized {
                bits: 3,
                group_size: 32
            }),
            Err(SpecError::QuantBits { bits: 3 })
        );
        // 64 does not divide 96.
        assert!(matches!(
            spec.clone().with_kv_storage(KvStorage::Q8),
            Err(SpecError::GroupSize { group_size: 64, .. })
        ));
        let q = spec.with_kv_storage(KvStorage::Quantized {
            bits: 4,
            group_size: 32,
        })?;
        assert!(q.kv_storage().is_quantized());
        Ok(())
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        let e = ModelCacheSpec::new(
            vec![LayerKind::Global; 4096],
            u32::MAX,
            u32::MAX,
            u32::MAX,
            u32::MAX - 63,
            KvStorage::FP32,
        );
        assert_eq!(e, Err(SpecError::Overflow));
    }

    #[test]
    fn canonical_string_is_stable() -> Result<(), SpecError> {
        let mut layers = vec![LayerKind::SlidingWindow { window: 1024 }; 5];
        layers.push(LayerKind::Global);
        layers.push(LayerKind::Global);
        let spec = ModelCacheSpec::new(layers, 8, 256, 256, 256, KvStorage::Q4)?;
        assert_eq!(
            spec.canonical_string(),
            "mcs1;layers=s1024*5,g*2;kv_heads=8;k_head_dim=256;v_head_dim=256;\
             block_tokens=256;kv=q4g64"
        );
        Ok(())
    }

    #[test]
    fn serde_round_trip_and_validation() -> Result<(), Box<dyn std::error::Error>> {
        let spec = ModelCacheSpec::new(
            vec![LayerKind::Global, LayerKind::SlidingWindow { window: 512 }],
            2,
            192,
            128,
            128,
            KvStorage::Q8,
        )?;
        let json = serde_json::to_string(&spec)?;
        let back: ModelCacheSpec = serde_json::from_str(&json)?;
        assert_eq!(back, spec);
        let bad = json.replace("\"block_tokens\":128", "\"block_tokens\":100");
        assert!(serde_json::from_str::<ModelCacheSpec>(&bad).is_err());
        Ok(())
    }
}
