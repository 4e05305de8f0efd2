//! The block file format: one KV block as a safetensors file with string metadata.
//!
//! A block file is a standard safetensors file. Its tensors are the block's [`KvTensor`]s
//! under their own names (the engine's naming scheme), with their dtype and shape. Its
//! `__metadata__` holds (every value is a string, as safetensors requires):
//!
//! | key | value |
//! | --- | --- |
//! | `format` | `semantic-kv-block` |
//! | `format_version` | `2` ([`FORMAT_VERSION`]) |
//! | `hash` | the block's chained hash, lowercase hex (also the file name) |
//! | `parent` | the parent block's hash in hex, or empty for the first block of a sequence |
//! | `model_fingerprint` | model identity + cache spec + tokenizer (opaque string) |
//! | `block_tokens` | number of tokens the block covers (decimal) |
//! | `token_ids` | the block's token ids, decimal, comma-separated |
//! | `encoding` | JSON of [`KvEncoding`], e.g. `{"kind":"float","dtype":"bf16"}` or `{"kind":"quantized","bits":4,"group_size":64}` |
//! | `tensor_names` | JSON array of the tensor names in the payload's order |
//! | `checksum` | `blake3:` + hex of the content checksum (below) |
//!
//! The checksum is BLAKE3 over, in this order: the values of `format`, `format_version`,
//! `hash`, `parent`, `model_fingerprint`, `block_tokens`, `token_ids`, `encoding` and
//! `tensor_names` exactly as stored (each prefixed by its length as u64 little endian), then
//! for each tensor in `tensor_names` order its name (length-prefixed), its dtype name (`f32`,
//! `f16`, `bf16`, `u32`, length-prefixed), its rank and dimensions (u64 LE each), its byte
//! length (u64 LE) and the 16-byte XXH3-128 digest of its data (little endian). It therefore
//! covers every byte that influences the decoded block, so any corruption is detected, not
//! only corruption of tensor bytes. (Hashing each tensor separately lets a reader hash a
//! tensor right after reading it, while it is in cache.) The checksum detects corruption,
//! not tampering: anyone who can write the cache directory can recompute it. The tensor
//! digests are XXH3 because they cover every byte a restore reads: BLAKE3 there cost about
//! a sixth of a cold restore's CPU (format version 1 used it; such files are misses).
//!
//! [`read_block_file`] reads a file straight into the tensors' own buffers (no intermediate
//! copy of the whole file); [`decode_block`] verifies a file already in memory. Both apply
//! the same checks and never panic on any input.

use crate::error::DiskStoreError;
use agent_session::{BlockMeta, KvBlock, KvEncoding, KvPayload, KvTensor, TensorDtype};
use block_pool::BlockHash;
use bytes::Bytes;
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;

/// Value of the `format` metadata key.
pub const FORMAT_NAME: &str = "semantic-kv-block";
/// Current block file format version (`format_version`).
pub const FORMAT_VERSION: u32 = 2;
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

/// Digest of one tensor's bytes, as the checksum covers it.
type TensorDigest = [u8; 16];

fn digest(bytes: &[u8]) -> TensorDigest {
    xxhash_rust::xxh3::xxh3_128(bytes).to_le_bytes()
}

fn put(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// Computes the content checksum from the stored metadata strings and each tensor's
/// description and data hash.
fn checksum<'a>(
    meta: &HashMap<String, String>,
    tensors: impl Iterator<Item = (&'a str, TensorDtype, &'a [usize], usize, &'a TensorDigest)>,
) -> String {
    let mut h = blake3::Hasher::new();
    for key in CHECKED_KEYS {
        put(
            &mut h,
            meta.get(key).map(String::as_bytes).unwrap_or_default(),
        );
    }
    for (name, dtype, shape, len, digest) in tensors {
        put(&mut h, name.as_bytes());
        put(&mut h, dtype_name(dtype).as_bytes());
        h.update(&(shape.len() as u64).to_le_bytes());
        for d in shape {
            h.update(&(*d as u64).to_le_bytes());
        }
        h.update(&(len as u64).to_le_bytes());
        h.update(digest);
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
    let digests: Vec<TensorDigest> = block
        .payload
        .tensors
        .iter()
        .map(|t| digest(&t.data))
        .collect();
    let sum = checksum(
        &meta,
        block.payload.tensors.iter().zip(&digests).map(|(t, d)| {
            (
                t.name.as_str(),
                t.dtype,
                t.shape.as_slice(),
                t.data.len(),
                d,
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

/// Most header bytes accepted (a block's header is a few KiB; this bounds allocations driven
/// by a corrupt length field).
const MAX_HEADER_LEN: u64 = 16 << 20;
/// Length of the safetensors header-size prefix.
const PREFIX_LEN: usize = 8;

fn corrupt(reason: impl Into<String>) -> DiskStoreError {
    DiskStoreError::Corrupt(reason.into())
}

/// A parsed and structurally checked header, before any tensor data is read.
struct Header {
    meta: HashMap<String, String>,
    /// Tensor names in payload order.
    names: Vec<String>,
    /// Tensors in file (offset) order: name, dtype, shape, byte length.
    layout: Vec<(String, TensorDtype, Vec<usize>, usize)>,
    /// Total tensor bytes after the header.
    data_len: usize,
}

/// Parses the header JSON: safetensors structure (offsets contiguous from 0, byte lengths
/// equal to the declared shapes times dtype sizes), format name and version, and that the
/// stored tensors are exactly those listed in `tensor_names`.
fn parse_header(json: &[u8]) -> Result<Header, DiskStoreError> {
    let header: safetensors::tensor::Metadata =
        serde_json::from_slice(json).map_err(|e| corrupt(format!("safetensors header: {e}")))?;
    let meta = header
        .metadata()
        .clone()
        .ok_or_else(|| corrupt("no __metadata__"))?;
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
    let mut listed = HashSet::with_capacity(names.len());
    if !names.iter().all(|n| listed.insert(n.as_str())) {
        return Err(corrupt("a tensor name is listed twice"));
    }
    let mut layout = Vec::with_capacity(names.len());
    for name in header.offset_keys() {
        if !listed.contains(name.as_str()) {
            return Err(corrupt(format!("tensor {name:?} is not listed")));
        }
        let info = header
            .info(&name)
            .ok_or_else(|| corrupt(format!("tensor {name:?} is missing")))?;
        let dtype = from_st_dtype(info.dtype)
            .ok_or_else(|| corrupt(format!("tensor {name:?}: dtype {:?}", info.dtype)))?;
        let (start, end) = info.data_offsets;
        let len = end
            .checked_sub(start)
            .ok_or_else(|| corrupt(format!("tensor {name:?}: offsets")))?;
        let shape = info.shape.clone();
        layout.push((name, dtype, shape, len));
    }
    // Every stored tensor is listed, names are unique: equal counts make it a bijection.
    if layout.len() != names.len() {
        return Err(corrupt(format!(
            "{} tensor names listed, {} tensors stored",
            names.len(),
            layout.len()
        )));
    }
    Ok(Header {
        data_len: header.data_len(),
        meta,
        names,
        layout,
    })
}

/// Checks the checksum and the identity fields, and assembles the block. `data` holds each
/// tensor's bytes and hash, by name.
fn finish(
    header: Header,
    mut data: HashMap<String, (Bytes, TensorDigest)>,
    expected_hash: &BlockHash,
    model_fingerprint: &str,
) -> Result<KvBlock, DiskStoreError> {
    let Header {
        meta,
        names,
        layout,
        ..
    } = header;
    let mut described: HashMap<&str, (TensorDtype, &[usize])> = layout
        .iter()
        .map(|(n, d, s, _)| (n.as_str(), (*d, s.as_slice())))
        .collect();
    let mut ordered = Vec::with_capacity(names.len());
    for name in &names {
        let (dtype, shape) = described
            .remove(name.as_str())
            .ok_or_else(|| corrupt(format!("tensor {name:?} is missing")))?;
        let (bytes, digest) = data
            .remove(name)
            .ok_or_else(|| corrupt(format!("tensor {name:?} was not read")))?;
        ordered.push((name, dtype, shape, bytes, digest));
    }
    let sum = checksum(
        &meta,
        ordered
            .iter()
            .map(|(n, d, s, b, h)| (n.as_str(), *d, *s, b.len(), h)),
    );
    let get = |key: &str| {
        meta.get(key)
            .map(String::as_str)
            .ok_or_else(|| corrupt(format!("metadata key {key:?} is missing")))
    };
    if get(keys::CHECKSUM)? != sum {
        return Err(corrupt("checksum mismatch"));
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
    let tensors = ordered
        .into_iter()
        .map(|(name, dtype, shape, data, _)| KvTensor {
            name: name.clone(),
            dtype,
            shape: shape.to_vec(),
            data,
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

/// The header length from the 8-byte prefix, bounded by `MAX_HEADER_LEN` and `available`.
fn header_len(prefix: [u8; PREFIX_LEN], available: u64) -> Result<usize, DiskStoreError> {
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER_LEN || n > available {
        return Err(corrupt(format!("header length {n}")));
    }
    usize::try_from(n).map_err(|_| corrupt("header length"))
}

/// Parses and verifies a block file's bytes.
///
/// Checks, in order: safetensors structure (header, offsets, byte lengths of the declared
/// shapes, exact file length), format name and version, that the tensors are exactly those
/// listed, the checksum, that the stored hash is `expected_hash`, the model fingerprint, and
/// the token ids / parent / encoding fields. Returns [`DiskStoreError::ForeignModel`] for an
/// intact block of another model, [`DiskStoreError::Version`] for another format version and
/// [`DiskStoreError::Corrupt`] for everything else. Never panics on any input.
pub fn decode_block(
    bytes: &[u8],
    expected_hash: &BlockHash,
    model_fingerprint: &str,
) -> Result<KvBlock, DiskStoreError> {
    let prefix: [u8; PREFIX_LEN] = bytes
        .get(..PREFIX_LEN)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| corrupt("shorter than the header prefix"))?;
    let rest = bytes.get(PREFIX_LEN..).unwrap_or_default();
    let n = header_len(prefix, rest.len() as u64)?;
    let (json, mut body) = rest.split_at(n);
    let header = parse_header(json)?;
    if body.len() != header.data_len {
        return Err(corrupt(format!(
            "{} data bytes, {} declared",
            body.len(),
            header.data_len
        )));
    }
    let mut data = HashMap::with_capacity(header.layout.len());
    for (name, _, _, len) in &header.layout {
        let (bytes, tail) = body.split_at(*len.min(&body.len()));
        body = tail;
        data.insert(name.clone(), (Bytes::copy_from_slice(bytes), digest(bytes)));
    }
    finish(header, data, expected_hash, model_fingerprint)
}

/// Reads and verifies a block file, reading each tensor straight into its own buffer and
/// hashing it while it is in cache. Same checks as [`decode_block`]. Returns the block and
/// the file's size in bytes. A missing file is [`DiskStoreError::Io`] with `NotFound`.
pub fn read_block_file(
    path: &Path,
    expected_hash: &BlockHash,
    model_fingerprint: &str,
) -> Result<(KvBlock, u64), DiskStoreError> {
    let io = |e: std::io::Error| DiskStoreError::io(path, e);
    // A short read is corruption (truncated file); any other failure is I/O.
    let read_err = |e: std::io::Error, what: &str| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            corrupt(format!("{what} is truncated"))
        } else {
            DiskStoreError::io(path, e)
        }
    };
    let mut file = File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(io(std::io::Error::other("not a regular file")));
    }
    let file_len = meta.len();
    let mut prefix = [0u8; PREFIX_LEN];
    file.read_exact(&mut prefix)
        .map_err(|e| read_err(e, "header prefix"))?;
    let n = header_len(prefix, file_len.saturating_sub(PREFIX_LEN as u64))?;
    let mut json = vec![0u8; n];
    file.read_exact(&mut json)
        .map_err(|e| read_err(e, "header"))?;
    let header = parse_header(&json)?;
    if file_len != (PREFIX_LEN + n) as u64 + header.data_len as u64 {
        return Err(corrupt(format!(
            "file is {file_len} bytes, header declares {}",
            PREFIX_LEN + n + header.data_len
        )));
    }
    // All tensors in one buffer (its pages mapped at once, in huge pages where the OS
    // allows), one `read` per tensor straight into its place, hashed right away while it
    // is in cache; the block's tensors are then slices of that buffer.
    let mut buf = crate::prefault::zeroed(header.data_len);
    let mut ranges = Vec::with_capacity(header.layout.len());
    let mut at = 0usize;
    for (name, _, _, len) in &header.layout {
        let range = at..at + len;
        let part = buf
            .get_mut(range.clone())
            .ok_or_else(|| corrupt(format!("tensor {name:?} lies outside the data")))?;
        file.read_exact(part)
            .map_err(|e| read_err(e, &format!("tensor {name:?}")))?;
        ranges.push((name.clone(), range, digest(part)));
        at += len;
    }
    let buf = Bytes::from(buf);
    let data = ranges
        .into_iter()
        .map(|(name, range, digest)| (name, (buf.slice(range), digest)))
        .collect();
    let block = finish(header, data, expected_hash, model_fingerprint)?;
    Ok((block, file_len))
}
