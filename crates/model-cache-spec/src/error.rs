//! The one error type of this crate.

/// Why a [`crate::ModelCacheSpec`] could not be built or extracted.
///
/// Every variant that concerns a single input names it (`field`), so a user can see which key
/// of `config.json` or of the GGUF metadata to look at; [`SpecError::field`] returns it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// The configuration given to `from_config` is not a JSON object.
    #[error("model config is not a JSON object")]
    NotAnObject,
    /// A required field is absent (or `null`).
    #[error("missing field `{field}`")]
    MissingField {
        /// The field (first accepted spelling when several are accepted).
        field: String,
    },
    /// A field has the wrong JSON type.
    #[error("field `{field}` must be {expected}, got {found}")]
    WrongType {
        /// The field.
        field: String,
        /// What was expected, in words.
        expected: &'static str,
        /// A short description of what was found.
        found: String,
    },
    /// A count or dimension is zero (or negative).
    #[error("field `{field}` must be a positive integer")]
    NotPositive {
        /// The field.
        field: String,
    },
    /// A value is too large for this crate (beyond `u32`, or beyond a documented limit).
    #[error("field `{field}` = {value} exceeds the maximum {max}")]
    TooLarge {
        /// The field.
        field: String,
        /// The value found.
        value: u64,
        /// The largest accepted value.
        max: u64,
    },
    /// `hidden_size` is not divisible by the number of attention heads, so no head dim.
    #[error("field `{field}`: hidden size {hidden_size} is not divisible by {num_heads} attention heads")]
    HeadDimNotDerivable {
        /// The hidden-size field used.
        field: String,
        /// The hidden size.
        hidden_size: u64,
        /// The number of attention heads.
        num_heads: u64,
    },
    /// `block_tokens` is not a positive multiple of 64.
    #[error("field `block_tokens` must be a positive multiple of 64, got {value}")]
    BlockTokens {
        /// The rejected value.
        value: u32,
    },
    /// Float storage with a byte width other than 2 or 4.
    #[error("field `kv_storage.bytes` must be 2 or 4, got {bytes}")]
    FloatBytes {
        /// The rejected width.
        bytes: u8,
    },
    /// Quantized storage with a bit width other than 4 or 8.
    #[error("field `kv_storage.bits` must be 4 or 8, got {bits}")]
    QuantBits {
        /// The rejected bit width.
        bits: u8,
    },
    /// Quantization group size not in {32, 64, 128} or not dividing both head dims.
    #[error(
        "field `kv_storage.group_size` must be 32, 64 or 128 and divide k_head_dim {k_head_dim} \
         and v_head_dim {v_head_dim}, got {group_size}"
    )]
    GroupSize {
        /// The rejected group size.
        group_size: u32,
        /// The K head dim it must divide.
        k_head_dim: u32,
        /// The V head dim it must divide.
        v_head_dim: u32,
    },
    /// Fields that contradict each other.
    #[error("field `{field}`: {reason}")]
    Inconsistent {
        /// The field at fault.
        field: String,
        /// Why.
        reason: String,
    },
    /// A per-layer list has a different length than the number of layers.
    #[error("field `{field}` has {found} entries but the model has {expected} layers")]
    LayerCount {
        /// The per-layer field.
        field: String,
        /// The number of layers.
        expected: u64,
        /// The number of entries found.
        found: u64,
    },
    /// A per-layer attention type this crate does not know how to size.
    #[error("field `{field}[{index}]` has unsupported layer type {value:?}")]
    UnsupportedLayerType {
        /// The per-layer field.
        field: String,
        /// The layer index.
        index: usize,
        /// The value found.
        value: String,
    },
    /// A per-layer head count that differs between layers (not supported).
    #[error("field `{field}`: head counts differ between layers, which is not supported")]
    VariableHeads {
        /// The per-layer field.
        field: String,
    },
    /// The cache sizes of this spec do not fit in 64-bit arithmetic.
    #[error("the cache size of this spec overflows 64-bit arithmetic")]
    Overflow,
}

impl SpecError {
    /// The input field this error concerns, when it concerns one field.
    #[must_use]
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::MissingField { field }
            | Self::WrongType { field, .. }
            | Self::NotPositive { field }
            | Self::TooLarge { field, .. }
            | Self::HeadDimNotDerivable { field, .. }
            | Self::LayerCount { field, .. }
            | Self::UnsupportedLayerType { field, .. }
            | Self::Inconsistent { field, .. }
            | Self::VariableHeads { field } => Some(field),
            Self::BlockTokens { .. } => Some("block_tokens"),
            Self::FloatBytes { .. } => Some("kv_storage.bytes"),
            Self::QuantBits { .. } => Some("kv_storage.bits"),
            Self::GroupSize { .. } => Some("kv_storage.group_size"),
            Self::NotAnObject | Self::Overflow => None,
        }
    }
}
