//! The block file format: one KV block as a safetensors file with string metadata.
//!
//! A block file is a standard safetensors file. Its tensors are the block's [`KvTensor`]s
//! under their own names (the engine's naming scheme), with their dtype and shape. Its
//! `__metadata__` holds (every value is a string, as safetensors requires):
//!
//! | key | value |
//! | --- | --- |
//! | `format` | `semantic-kv-block` |
//! | `format_version` | `1` ([`FORMAT_VERSION`]) |
//! | `hash` | the block's chained hash, lowercase hex (also the file name) |
//! | `parent` | the parent block's hash in hex, or empty for the first block of a sequence |
//! | `model_fingerprint` | model identity + cache spec + tokenizer (opaque string) |
//! | `block_tokens` | number of tokens the block covers (decimal) |
//! | `token_ids` | the block's token ids, decimal, comma-separated |
//! | `encoding` | JSON of [`KvEncoding`], e.g. `{"kind":"float","dtype":"bf16"}` or `{"kind":"quantized","bits":4,"group_size":64}` |
//! | `tensor_names` | JSON array of the tensor names in the payload's order |
//! | `checksum` | `blake3:` + hex of the content checksum (below) |
//!
//! The checksum is BLAKE3 over, in this order, each length-prefixed (u64 little endian):
//! the values of `format`, `format_version`, `hash`, `parent`, `model_fingerprint`,
//! `block_tokens`, `token_ids`, `encoding` and `tensor_names` exactly as stored, then for each
//! tensor in `tensor_names` order its name, its dtype name (`f32`, `f16`, `bf16`, `u32`), its
//! rank and dimensions (u64 LE each) and its data bytes. It therefore covers every byte that
//! influences the decoded block, so any corruption is detected, not only corruption of
//! tensor bytes.

use crate::error::DiskStoreError;
use agent_session::{BlockMeta, KvBlock, KvEncoding, KvPayload, KvTensor, TensorDtype};
use block_pool::BlockHash;
use safetensors::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::str::FromStr;

/// Value of the `format` metadata key.
pub const FORMAT_NAME: &str = "semantic-kv-block";
/// Current block file format version (`format_version`).
pub const FORMAT_VERSION: u32 = 1;
/// File extension of block files.
pub const BLOCK_EXTENSION: &str = "safetensors";

/// Metadata keys of a block file's `__metadata__`.
pub mod keys {
    /// Format name, always [`super::FORMAT_NAME`].
    pub const FORMAT: &str = "format";
    /// Format version, [`super::FORMAT_VERSION`] in decimal.
    pub const FORMAT_VERSION: &str = "format_version";
    /// The block's hash (hex).
    pub const HASH: &str = "hash";
    /// The parent block's hash (hex) or empty.
    pub const PARENT: &str = "parent";
    /// The model fingerprint.
    pub const MODEL_FINGERPRINT: &str = "model_fingerprint";
    /// Number of tokens in the block.
    pub const BLOCK_TOKENS: &str = "block_tokens";
    /// Comma-separated decimal token ids.
    pub const TOKEN_IDS: &str = "token_ids";
    /// JSON of the block's `KvEncoding`.
    pub const ENCODING: &str = "encoding";
    /// JSON array of tensor names in payload order.
    pub const TENSOR_NAMES: &str = "tensor_names";
    /// `blake3:<hex>` content checksum.
    pub const CHECKSUM: &str = "checksum";
}

const CHECKSUM_PREFIX: &str = "blake3:";

/// The metadata values covered by the checksum, in checksum order.
const CHECKED_KEYS: [&str; 9] = [
    keys::FORMAT,
    keys::FORMAT_VERSION,
    keys::HASH,
    keys::PARENT,
    keys::MODEL_FINGERPRINT,
    keys::BLOCK_TOKENS,
    keys::TOKEN_IDS,
    keys::ENCODING,
    keys::TENSOR_NAMES,
];

fn dtype_name(d: TensorDtype) -> &'static str {
    match d {
        TensorDtype::F32 => "f32",
        TensorDtype::F16 => "f16",
        TensorDtype::Bf16 => "bf16",
        TensorDtype::U32 => "u32",
    }
}

fn to_st_dtype(d: TensorDtype) -> Dtype {
    match d {
        TensorDtype::F32 => Dtype::F32,
        TensorDtype::F16 => Dtype::F16,
        TensorDtype::Bf16 => Dtype::BF16,
        TensorDtype::U32 => Dtype::U32,
    }
}

fn from_st_dtype(d: Dtype) -> Option<TensorDtype> {
    match d {
        Dtype::F32 => Some(TensorDtype::F32),
        Dtype::F16 => Some(TensorDtype::F16),
        Dtype::BF16 => Some(TensorDtype::Bf16),
        Dtype::U32 => Some(TensorDtype::U32),
        _ => None,
    }
}

/// Borrowed view of a [`KvTensor`] for the safetensors serializer (no copy).
struct TensorRef<'a>(&'a KvTensor);

impl View for TensorRef<'_> {
    fn dtype(&self) -> Dtype {
        to_st_dtype(self.0.dtype)
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.0.data)
    }
    fn data_len(&self) -> usize {
        self.0.data.len()
    }
}

fn put(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// Computes the content checksum from the stored metadata strings and the tensors.
fn checksum<'a>(
    meta: &HashMap<String, String>,
    tensors: impl Iterator<Item = (&'a str, TensorDtype, &'a [usize], &'a [u8])>,
) -> String {
    let mut h = blake3::Hasher::new();
    for key in CHECKED_KEYS {
        put(&mut h, meta.get(key).map(String::as_bytes).unwrap_or_default());
    }
    for (name, dtype, shape, data) in tensors {
        put(&mut h, name.as_bytes());
        put(&mut h, dtype_name(dtype).as_bytes());
        h.update(&(shape.len() as u64).to_le_bytes());
        for d in shape {
            h.update(&(*d as u64).to_le_bytes());
        }
        put(&mut h, data);
    }
    format!("{CHECKSUM_PREFIX}{}", h.finalize().to_hex())
}

/// Checks that a block is well formed before it is written.
pub fn validate_block(block: &KvBlock) -> Result<(), DiskStoreError> {
    let invalid = |reason: String| DiskStoreError::InvalidBlock {
        hash: block.meta.hash.to_string(),
        reason,
    };
    if block.payload.tensors.is_empty() {
        return Err(invalid("the payload has no tensors".into()));
    }
    let mut names = HashSet::with_capacity(block.payload.tensors.len());
    for t in &block.payload.tensors {
        if t.name.is_empty() || t.name == "__metadata__" {
            return Err(invalid(format!("tensor name {:?} is reserved", t.name)));
        }
        if !names.insert(t.name.as_str()) {
            return Err(invalid(format!("tensor name {:?} is repeated", t.name)));
        }
        if !t.is_consistent() {
            return Err(invalid(format!(
                "tensor {:?}: {} bytes do not match shape {:?} of {}",
                t.name,
                t.data.len(),
                t.shape,
                dtype_name(t.dtype)
            )));
        }
    }
    Ok(())
}

/// Serializes a block to the bytes of its file (validating it first).
pub fn encode_block(block: &KvBlock) -> Result<Vec<u8>, DiskStoreError> {
    validate_block(block)?;
    let hash = block.meta.hash.to_string();
    let invalid = |reason: String| DiskStoreError::InvalidBlock {
        hash: hash.clone(),
        reason,
    };
    let token_ids = block
        .meta
        .token_ids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let names: Vec<&str> = block
        .payload
        .tensors
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    let mut meta = HashMap::with_capacity(CHECKED_KEYS.len() + 1);
    meta.insert(keys::FORMAT.to_owned(), FORMAT_NAME.to_owned());
    meta.insert(keys::FORMAT_VERSION.to_owned(), FORMAT_VERSION.to_string());
    meta.insert(keys::HASH.to_owned(), hash.clone());
    meta.insert(
        keys::PARENT.to_owned(),
        block
            .meta
            .parent
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
    );
    meta.insert(
        keys::MODEL_FINGERPRINT.to_owned(),
        block.meta.model_fingerprint.clone(),
    );
    meta.insert(
        keys::BLOCK_TOKENS.to_owned(),
        block.meta.token_ids.len().to_string(),
    );
    meta.insert(keys::TOKEN_IDS.to_owned(), token_ids);
    meta.insert(
        keys::ENCODING.to_owned(),
        serde_json::to_string(&block.payload.encoding).map_err(|e| invalid(e.to_string()))?,
    );
    meta.insert(
        keys::TENSOR_NAMES.to_owned(),
        serde_json::to_string(&names).map_err(|e| invalid(e.to_string()))?,
    );
    let sum = checksum(
        &meta,
        block.payload.tensors.iter().map(|t| {
            (
                t.name.as_str(),
                t.dtype,
                t.shape.as_slice(),
                t.data.as_slice(),
            )
        }),
    );
    meta.insert(keys::CHECKSUM.to_owned(), sum);
    let views = block
        .payload
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), TensorRef(t)));
    safetensors::serialize(views, Some(meta)).map_err(|e| invalid(e.to_string()))
}

/// Parses and verifies a block file's bytes.
///
/// Checks, in order: safetensors structure (header, offsets, byte lengths of the declared
/// shapes), format name and version, that the tensors are exactly those listed, the
/// checksum, that the stored hash is `expected_hash`, the model fingerprint, and the token
/// ids / parent / encoding fields. Returns [`DiskStoreError::ForeignModel`] for an intact
/// block of another model, [`DiskStoreError::Version`] for another format version and
/// [`DiskStoreError::Corrupt`] for everything else. Never panics on any input.
pub fn decode_block(
    bytes: &[u8],
    expected_hash: &BlockHash,
    model_fingerprint: &str,
) -> Result<KvBlock, DiskStoreError> {
    let corrupt = |reason: String| DiskStoreError::Corrupt(reason);
    // One parse of the header; it validates offsets against the declared shapes and dtypes
    // and that the buffer length is exactly header + data.
    let (header_len, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| corrupt(format!("safetensors header: {e}")))?;
    let data = bytes
        .get(8 + header_len..)
        .ok_or_else(|| corrupt("truncated".into()))?;
    let meta = header
        .metadata()
        .as_ref()
        .ok_or_else(|| corrupt("no __metadata__".into()))?;
    let get = |key: &str| {
        meta.get(key)
            .map(String::as_str)
            .ok_or_else(|| corrupt(format!("metadata key {key:?} is missing")))
    };

    let format = get(keys::FORMAT)?;
    let version = get(keys::FORMAT_VERSION)?;
    if format != FORMAT_NAME || version != FORMAT_VERSION.to_string() {
        return Err(DiskStoreError::Version {
            found: format!("{format} {version}"),
            expected: FORMAT_VERSION,
        });
    }

    let names: Vec<String> = serde_json::from_str(get(keys::TENSOR_NAMES)?)
        .map_err(|e| corrupt(format!("tensor_names: {e}")))?;
    let stored = header.tensors().len();
    if names.len() != stored {
        return Err(corrupt(format!(
            "{} tensor names listed, {stored} tensors stored",
            names.len()
        )));
    }
    let mut seen = HashSet::with_capacity(names.len());
    if !names.iter().all(|n| seen.insert(n.as_str())) {
        return Err(corrupt("a tensor name is listed twice".into()));
    }
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let info = header
            .info(&name)
            .ok_or_else(|| corrupt(format!("tensor {name:?} is missing")))?;
        let dtype = from_st_dtype(info.dtype)
            .ok_or_else(|| corrupt(format!("tensor {name:?}: dtype {:?}", info.dtype)))?;
        let (start, end) = info.data_offsets;
        let bytes = data
            .get(start..end)
            .ok_or_else(|| corrupt(format!("tensor {name:?}: offsets out of range")))?;
        tensors.push((name, dtype, info.shape.as_slice(), bytes));
    }
    // Listed names exist, their count equals the stored count and a name maps to one
    // tensor: the file holds exactly the listed tensors.
    let sum = checksum(
        meta,
        tensors
            .iter()
            .map(|(n, d, shape, bytes)| (n.as_str(), *d, *shape, *bytes)),
    );
    if get(keys::CHECKSUM)? != sum {
        return Err(corrupt("checksum mismatch".into()));
    }

    let hash_str = get(keys::HASH)?;
    if hash_str != expected_hash.to_string() {
        return Err(corrupt(format!(
            "the file holds block {hash_str}, not {expected_hash}"
        )));
    }
    let fingerprint = get(keys::MODEL_FINGERPRINT)?;
    if fingerprint != model_fingerprint {
        return Err(DiskStoreError::ForeignModel {
            expected: model_fingerprint.to_owned(),
            found: fingerprint.to_owned(),
        });
    }
    let parent = match get(keys::PARENT)? {
        "" => None,
        p => Some(BlockHash::from_str(p).map_err(|_| corrupt(format!("parent {p:?}")))?),
    };
    let token_str = get(keys::TOKEN_IDS)?;
    let token_ids = if token_str.is_empty() {
        Vec::new()
    } else {
        token_str
            .split(',')
            .map(u32::from_str)
            .collect::<Result<Vec<u32>, _>>()
            .map_err(|e| corrupt(format!("token_ids: {e}")))?
    };
    let block_tokens: usize = get(keys::BLOCK_TOKENS)?
        .parse()
        .map_err(|e| corrupt(format!("block_tokens: {e}")))?;
    if block_tokens != token_ids.len() {
        return Err(corrupt(format!(
            "block_tokens {block_tokens} but {} token ids",
            token_ids.len()
        )));
    }
    let encoding: KvEncoding = serde_json::from_str(get(keys::ENCODING)?)
        .map_err(|e| corrupt(format!("encoding: {e}")))?;

    let tensors = tensors
        .into_iter()
        .map(|(name, dtype, shape, bytes)| KvTensor {
            name,
            dtype,
            shape: shape.to_vec(),
            data: bytes.to_vec(),
        })
        .collect();
    Ok(KvBlock {
        meta: BlockMeta {
            hash: *expected_hash,
            parent,
            token_ids,
            model_fingerprint: fingerprint.to_owned(),
        },
        payload: KvPayload { encoding, tensors },
    })
}
