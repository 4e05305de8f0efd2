//! A GGUF header reader in plain Rust: magic, version, metadata and the tensor table.
//!
//! The whole header is validated against the file size here, before MLX's C++ loader sees
//! the file, so a truncated or corrupt file gives a typed [`Error`] instead of an abort.
//! Tensor data is not read (MLX maps it).

use crate::error::{Error, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// Longest key or string value accepted (bounds memory on corrupt files).
const MAX_STRING: u64 = 64 << 20;
/// Most tensor dimensions.
const MAX_DIMS: u32 = 4;

/// One GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Unsigned integer (u8, u16, u32, u64).
    UInt(u64),
    /// Signed integer (i8, i16, i32, i64).
    Int(i64),
    /// Float (f32, f64).
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string (invalid UTF-8 is replaced).
    String(String),
    /// Array of values.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as a non-negative integer, if it is one.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::UInt(v) => Some(v),
            GgufValue::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float (integers convert).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::Float(v) => Some(v),
            GgufValue::UInt(v) => Some(v as f64),
            GgufValue::Int(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The JSON equivalent (what [`model_cache_spec::ModelCacheSpec::from_gguf_metadata`] reads).
    pub fn to_json(&self) -> Value {
        match self {
            GgufValue::UInt(v) => Value::from(*v),
            GgufValue::Int(v) => Value::from(*v),
            GgufValue::Float(v) => serde_json::Number::from_f64(*v)
                .map(Value::Number)
                .unwrap_or(Value::Null),
            GgufValue::Bool(b) => Value::Bool(*b),
            GgufValue::String(s) => Value::String(s.clone()),
            GgufValue::Array(a) => Value::Array(a.iter().map(GgufValue::to_json).collect()),
        }
    }
}

/// The element type of a GGUF tensor: every GGML type id is known (for size checks and
/// error messages); which of them load is [`QuantType::traits`].
pub use gguf_quants::QuantType as GgmlType;

/// Name of a GGML type id, for error messages (`IQ2_XXS (ggml type 16)`).
pub fn ggml_type_name(id: u32) -> String {
    gguf_quants::type_name(id)
}

/// `166 × Q5_0, 16 × Q4_K`.
fn histogram_text(counts: &[(GgmlType, usize)]) -> String {
    counts
        .iter()
        .map(|(ty, n)| format!("{n} × {}", ty.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The tensor types this engine loads, for error messages.
pub fn supported_types() -> String {
    gguf_quants::SUPPORTED
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One entry of the tensor table.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Tensor name (for example `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in MLX order (outermost first; GGUF stores them innermost first).
    pub shape: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Byte offset of the data in the file.
    pub file_offset: u64,
    /// Bytes of data.
    pub n_bytes: u64,
}

/// A parsed and validated GGUF header.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    /// The file.
    pub path: PathBuf,
    /// File size in bytes.
    pub file_size: u64,
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Metadata, in file order.
    pub metadata: Vec<(String, GgufValue)>,
    /// Tensor table, in file order.
    pub tensors: Vec<TensorInfo>,
    /// Offset of the tensor data section (the end of the header region).
    pub data_offset: u64,
    /// Offset one past the last tensor's data: what the file's size must reach.
    pub data_end: u64,
    /// The first tensor whose data lies past the end of the file, with the offset it needs
    /// (a truncated download); [`GgufHeader::check_size`] turns it into an error.
    pub truncated: Option<(String, u64)>,
}

impl GgufHeader {
    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// [`Error::Truncated`] when the tensor table points past the end of the file.
    pub fn check_size(&self) -> Result<()> {
        match &self.truncated {
            Some((name, _)) => Err(Error::Truncated {
                path: self.path.clone(),
                field: format!(
                    "tensor `{name}` data (the tensor table needs {} bytes: a truncated download?)",
                    self.data_end
                ),
                needed: self.data_end,
                file_size: self.file_size,
            }),
            None => Ok(()),
        }
    }

    /// Tensor count per type, most frequent first (ties by type id).
    pub fn type_histogram(&self) -> Vec<(GgmlType, usize)> {
        let mut counts: Vec<(GgmlType, usize)> = Vec::new();
        for t in &self.tensors {
            match counts.iter_mut().find(|(ty, _)| *ty == t.ggml_type) {
                Some((_, n)) => *n += 1,
                None => counts.push((t.ggml_type, 1)),
            }
        }
        counts.sort_by_key(|(ty, n)| (std::cmp::Reverse(*n), ty.id()));
        counts
    }

    /// The histogram as text: `166 × Q5_0, 16 × Q4_K`.
    pub fn type_summary(&self) -> String {
        histogram_text(&self.type_histogram())
    }

    /// [`Error::UnsupportedTensorTypes`] naming every type of the file this engine cannot
    /// load, with its tensor count and an example tensor.
    pub fn check_types(&self) -> Result<()> {
        let bad: Vec<(GgmlType, usize)> = self
            .type_histogram()
            .into_iter()
            .filter(|(ty, _)| ty.traits().is_none())
            .collect();
        if bad.is_empty() {
            return Ok(());
        }
        let example = self
            .tensors
            .iter()
            .find(|t| t.ggml_type.traits().is_none())
            .map(|t| t.name.clone())
            .unwrap_or_default();
        Err(Error::UnsupportedTensorTypes {
            path: self.path.clone(),
            found: histogram_text(&bad),
            example,
            all: self.type_summary(),
            supported: supported_types(),
        })
    }

    /// Bytes of all tensor data: what the weights take in RAM kept as the file's blocks.
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.n_bytes).sum()
    }

    /// The tensor table as a name → info map.
    pub fn tensor_map(&self) -> HashMap<&str, &TensorInfo> {
        self.tensors.iter().map(|t| (t.name.as_str(), t)).collect()
    }

    /// Metadata as JSON values, leaving out the large tokenizer arrays (vocabulary, merges,
    /// token types, scores), which no consumer of this map needs.
    pub fn metadata_json(&self) -> HashMap<String, Value> {
        self.metadata
            .iter()
            .filter(|(k, v)| !(k.starts_with("tokenizer.ggml.") && v.as_array().is_some()))
            .map(|(k, v)| (k.clone(), v.to_json()))
            .collect()
    }

    /// Reads and validates the header of `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let file_size = file.metadata().map_err(io)?.len();
        let mut r = Reader {
            inner: BufReader::with_capacity(1 << 20, file),
            pos: 0,
            file_size,
            path,
        };
        let magic: [u8; 4] = r.bytes_array("header")?;
        if &magic != b"GGUF" {
            return Err(Error::BadMagic {
                path: path.to_path_buf(),
                found: magic,
            });
        }
        let version = r.u32("header.version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
            });
        }
        let n_tensors = r.u64("header.tensor_count")?;
        let n_kv = r.u64("header.metadata_kv_count")?;
        // Every KV pair needs at least 12 bytes and every tensor info at least 24.
        r.check_count("header.metadata_kv_count", n_kv, 12)?;
        r.check_count("header.tensor_count", n_tensors, 24)?;

        let mut metadata = Vec::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let key = r.string(&format!("metadata[{i}].key"))?;
            let ty = r.u32(&key)?;
            let value = r.value(&key, ty, 0)?;
            metadata.push((key, value));
        }

        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, v)) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(Error::Invalid {
                        path: path.to_path_buf(),
                        field: "general.alignment".into(),
                        reason: "must be a power of two".into(),
                    })
                }
            },
            None => 32,
        };

        let mut raw = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = r.string(&format!("tensor[{i}].name"))?;
            let n_dims = r.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.invalid(&name, format!("{n_dims} dimensions (1 to 4 allowed)")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&name)?);
            }
            let ty = r.u32(&name)?;
            let offset = r.u64(&name)?;
            raw.push((name, dims, ty, offset));
        }
        let data_offset = r.pos.div_ceil(alignment) * alignment;

        let mut tensors = Vec::with_capacity(raw.len());
        let mut truncated = None;
        for (name, dims, ty, offset) in raw {
            // Every known type is sized here (a truncated file is reported before anything
            // else); whether it loads is checked later, with the whole file's histogram.
            let Some(ggml_type) = GgmlType::from_id(ty) else {
                return Err(Error::UnsupportedTensorType {
                    path: path.to_path_buf(),
                    tensor: name,
                    type_name: ggml_type_name(ty),
                    supported: supported_types(),
                });
            };
            if dims.iter().any(|&d| d == 0 || d > i32::MAX as u64) {
                return Err(r.invalid(&name, format!("dimension out of range in {dims:?}")));
            }
            let elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| r.invalid(&name, "element count overflows".into()))?;
            let (block_elems, block_bytes) = (
                ggml_type.block_elems() as u64,
                ggml_type.block_bytes() as u64,
            );
            if dims[0] % block_elems != 0 {
                return Err(r.invalid(
                    &name,
                    format!(
                        "row length {} is not a multiple of the {} block size {block_elems}",
                        dims[0],
                        ggml_type.name()
                    ),
                ));
            }
            let n_bytes = (elements / block_elems)
                .checked_mul(block_bytes)
                .ok_or_else(|| r.invalid(&name, "byte size overflows".into()))?;
            if offset % alignment != 0 {
                return Err(r.invalid(&name, format!("data offset {offset} is not aligned")));
            }
            let file_offset = data_offset
                .checked_add(offset)
                .ok_or_else(|| r.invalid(&name, "data offset overflows".into()))?;
            let end = file_offset
                .checked_add(n_bytes)
                .ok_or_else(|| r.invalid(&name, "data offset overflows".into()))?;
            if end > file_size && truncated.is_none() {
                truncated = Some((name.clone(), end));
            }
            let mut shape = dims;
            shape.reverse();
            tensors.push(TensorInfo {
                name,
                shape,
                ggml_type,
                file_offset,
                n_bytes,
            });
        }
        let data_end = tensors
            .iter()
            .map(|t| t.file_offset + t.n_bytes)
            .max()
            .unwrap_or(data_offset);
        Ok(GgufHeader {
            path: path.to_path_buf(),
            file_size,
            version,
            metadata,
            tensors,
            data_offset,
            data_end,
            truncated,
        })
    }
}

/// Bounded little-endian reader that tracks its position and the file size.
struct Reader<'a> {
    inner: BufReader<File>,
    pos: u64,
    file_size: u64,
    path: &'a Path,
}

impl Reader<'_> {
    fn invalid(&self, field: &str, reason: String) -> Error {
        Error::Invalid {
            path: self.path.to_path_buf(),
            field: field.to_owned(),
            reason,
        }
    }

    fn need(&self, field: &str, n: u64) -> Result<()> {
        let end = self.pos.saturating_add(n);
        if end > self.file_size {
            return Err(Error::Truncated {
                path: self.path.to_path_buf(),
                field: field.to_owned(),
                needed: end,
                file_size: self.file_size,
            });
        }
        Ok(())
    }

    /// Rejects a count of items that cannot fit in the rest of the file.
    fn check_count(&self, field: &str, count: u64, min_item_bytes: u64) -> Result<()> {
        self.need(field, count.saturating_mul(min_item_bytes))
    }

    fn bytes_array<const N: usize>(&mut self, field: &str) -> Result<[u8; N]> {
        self.need(field, N as u64)?;
        let mut buf = [0u8; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|source| Error::Io {
                path: self.path.to_path_buf(),
                source,
            })?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, field: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes_array(field)?))
    }

    fn u64(&mut self, field: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes_array(field)?))
    }

    fn string(&mut self, field: &str) -> Result<String> {
        let len = self.u64(field)?;
        if len > MAX_STRING {
            return Err(self.invalid(field, format!("string length {len} is too large")));
        }
        self.need(field, len)?;
        let mut buf = vec![0u8; len as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|source| Error::Io {
                path: self.path.to_path_buf(),
                source,
            })?;
        self.pos += len;
        Ok(match String::from_utf8(buf) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    fn value(&mut self, key: &str, ty: u32, depth: u32) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::UInt(u64::from(u8::from_le_bytes(self.bytes_array(key)?))),
            1 => GgufValue::Int(i64::from(i8::from_le_bytes(self.bytes_array(key)?))),
            2 => GgufValue::UInt(u64::from(u16::from_le_bytes(self.bytes_array(key)?))),
            3 => GgufValue::Int(i64::from(i16::from_le_bytes(self.bytes_array(key)?))),
            4 => GgufValue::UInt(u64::from(self.u32(key)?)),
            5 => GgufValue::Int(i64::from(i32::from_le_bytes(self.bytes_array(key)?))),
            6 => GgufValue::Float(f64::from(f32::from_le_bytes(self.bytes_array(key)?))),
            7 => GgufValue::Bool(u8::from_le_bytes(self.bytes_array(key)?) != 0),
            8 => GgufValue::String(self.string(key)?),
            9 => {
                if depth > 0 {
                    return Err(self.invalid(key, "nested arrays are not supported".into()));
                }
                let item_ty = self.u32(key)?;
                let n = self.u64(key)?;
                let min = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    _ => {
                        return Err(self.invalid(key, format!("unknown array item type {item_ty}")))
                    }
                };
                self.check_count(key, n, min)?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(key, item_ty, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::UInt(self.u64(key)?),
            11 => GgufValue::Int(i64::from_le_bytes(self.bytes_array(key)?)),
            12 => GgufValue::Float(f64::from_le_bytes(self.bytes_array(key)?)),
            _ => return Err(self.invalid(key, format!("unknown metadata value type {ty}"))),
        })
    }
}

/// Writes a GGUF file (for tests: tiny models and corrupt files). Tensors are given as
/// `(name, MLX-order shape, ggml type id, raw bytes)`.
#[doc(hidden)]
pub fn write_gguf(
    path: &Path,
    metadata: &[(&str, GgufValue)],
    tensors: &[(&str, Vec<u64>, u32, Vec<u8>)],
) -> std::io::Result<()> {
    use std::io::Write;
    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn put_value(out: &mut Vec<u8>, v: &GgufValue, with_type: bool) {
        let ty: u32 = match v {
            GgufValue::UInt(_) => 4,
            GgufValue::Int(_) => 5,
            GgufValue::Float(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
        };
        if with_type {
            out.extend_from_slice(&ty.to_le_bytes());
        }
        match v {
            GgufValue::UInt(x) => out.extend_from_slice(&(*x as u32).to_le_bytes()),
            GgufValue::Int(x) => out.extend_from_slice(&(*x as i32).to_le_bytes()),
            GgufValue::Float(x) => out.extend_from_slice(&(*x as f32).to_le_bytes()),
            GgufValue::Bool(b) => out.push(u8::from(*b)),
            GgufValue::String(s) => put_str(out, s),
            GgufValue::Array(items) => {
                let item_ty: u32 = match items.first() {
                    Some(GgufValue::Int(_)) => 5,
                    Some(GgufValue::Float(_)) => 6,
                    Some(GgufValue::Bool(_)) => 7,
                    Some(GgufValue::String(_)) => 8,
                    _ => 4,
                };
                out.extend_from_slice(&item_ty.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for item in items {
                    put_value(out, item, false);
                }
            }
        }
    }
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut out, k);
        put_value(&mut out, v, true);
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for (name, shape, ty, data) in tensors {
        put_str(&mut out, name);
        out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + data.len() as u64).div_ceil(32) * 32;
    }
    while out.len() % 32 != 0 {
        out.push(0);
    }
    let base = out.len() as u64;
    for ((_, _, _, data), off) in tensors.iter().zip(offsets) {
        out.resize((base + off) as usize, 0);
        out.extend_from_slice(data);
    }
    std::fs::File::create(path)?.write_all(&out)
}
