//! Weight loading: GGUF (through MLX's loader, after the Rust header check) and safetensors
//! directories, mapped to GGUF-style canonical names (`blk.N.attn_q.weight`, ...), then
//! converted to the compute format ([`WeightFormat`]).

use crate::error::{Error, MlxContext, Result};
use crate::gguf::GgufHeader;
use crate::host_gemm;
use crate::host_linear::{self, PackedMatrix, BLOCK};
use gguf_quants::{QuantMatrix, QuantType};
use mlx_rs::ops;
use mlx_rs::{Array, Dtype};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How weights are kept for compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// The GGUF file's blocks stay in RAM as they are (as much memory as the file): prefill
    /// multiplies panels dequantized on the fly through the CPU's BLAS, decode steps run the
    /// block kernels of `gguf-quants` (every supported type). The Linux default. Tensors that
    /// do not come as GGUF blocks (safetensors directories) load as with [`WeightFormat::F32`].
    #[cfg_attr(not(target_os = "macos"), default)]
    Host,
    /// Dequantize everything to f32 MLX arrays at load (4 bytes a weight; MLX's own matmuls).
    F32,
    /// Keep quantized weights as MLX affine triples and use `quantized_matmul`; other tensors
    /// in f32. Smallest memory; fastest on Apple Silicon (Metal): the macOS default. GGUF
    /// blocks that MLX's affine format holds exactly (Q4_0, Q4_1, Q8_0) are converted as they
    /// are; the others are dequantized and requantized to 8 bits in groups of 32.
    #[cfg_attr(target_os = "macos", default)]
    Quantized,
}

impl WeightFormat {
    /// Short name for logs, settings and the model descriptor.
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Host => "host",
            WeightFormat::F32 => "f32",
            WeightFormat::Quantized => "quantized",
        }
    }

    /// From its [`WeightFormat::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "host" => Some(WeightFormat::Host),
            "f32" => Some(WeightFormat::F32),
            "quantized" => Some(WeightFormat::Quantized),
            _ => None,
        }
    }
}

/// A tensor as loaded, before conversion.
#[derive(Debug, Clone)]
pub enum RawTensor {
    /// A plain array (any float dtype).
    Dense(Array),
    /// A 2-D GGUF tensor as the file stores it (any supported type, F16/F32 included):
    /// `[rows, cols]` = `[out, in]` for a linear layer. Shared: a tied embedding is also the
    /// LM head.
    Matrix(Arc<QuantMatrix>),
    /// MLX affine quantization: packed `u32` values, scales and biases (one per group).
    Quantized {
        /// Packed values, `[rows, cols × bits / 32]`.
        w: Array,
        /// Scales, `[rows, cols / group_size]`.
        scales: Array,
        /// Biases, `[rows, cols / group_size]`.
        biases: Array,
        /// Elements per group.
        group_size: i32,
        /// Bits per element.
        bits: i32,
    },
}

impl RawTensor {
    /// The logical (unpacked) shape.
    pub fn logical_shape(&self) -> Vec<i64> {
        match self {
            RawTensor::Dense(a) => a.shape().iter().map(|&d| i64::from(d)).collect(),
            RawTensor::Matrix(m) => vec![m.rows() as i64, m.cols() as i64],
            RawTensor::Quantized { w, bits, .. } => {
                let mut s: Vec<i64> = w.shape().iter().map(|&d| i64::from(d)).collect();
                if let Some(last) = s.last_mut() {
                    *last = *last * 32 / i64::from(*bits);
                }
                s
            }
        }
    }

    /// The tensor as a dense f32 array (dequantizing with f32 scales and biases, so the
    /// values equal `scale × q + bias` computed in f32).
    pub fn to_f32(&self) -> Result<Array> {
        match self {
            RawTensor::Dense(a) => a.as_dtype(Dtype::Float32).ctx("casting a weight to f32"),
            RawTensor::Matrix(m) => {
                let mut data = vec![0.0f32; m.rows() * m.cols()];
                dequantize_matrix(m, &mut data)?;
                let shape = [m.rows(), m.cols()].map(|d| i32::try_from(d).unwrap_or(i32::MAX));
                Ok(Array::from_slice(&data, &shape))
            }
            RawTensor::Quantized {
                w,
                scales,
                biases,
                group_size,
                bits,
            } => {
                let s = scales.as_dtype(Dtype::Float32).ctx("casting scales")?;
                let b = biases.as_dtype(Dtype::Float32).ctx("casting biases")?;
                ops::dequantize(w, &s, &b, *group_size, *bits).ctx("dequantizing a weight")
            }
        }
    }
}

impl RawTensor {
    /// The tensor cut along its first axis into consecutive pieces of `sizes` rows (which add
    /// up to its rows). GGUF blocks are cut between rows, each a whole number of blocks, so
    /// the pieces keep the file's bytes; MLX affine rows keep their scales and biases.
    pub fn split_rows(&self, sizes: &[usize]) -> Result<Vec<RawTensor>> {
        let rows = |a: &Array, r0: usize, r1: usize| -> Result<Array> {
            let (r0, r1) = (
                i32::try_from(r0).unwrap_or(i32::MAX),
                i32::try_from(r1).unwrap_or(i32::MAX),
            );
            ops::indexing::TryIndexOp::try_index(a, r0..r1)
                .ctx("splitting a fused tensor")?
                .contiguous()
                .ctx("splitting a fused tensor")
        };
        let total = self.logical_shape().first().copied().unwrap_or(0);
        if sizes.iter().sum::<usize>() as i64 != total {
            return Err(Error::HostKernel(format!(
                "splitting {total} rows into {sizes:?}"
            )));
        }
        let mut out = Vec::with_capacity(sizes.len());
        let mut r0 = 0;
        for &n in sizes {
            let r1 = r0 + n;
            out.push(match self {
                RawTensor::Dense(a) => RawTensor::Dense(rows(a, r0, r1)?),
                RawTensor::Quantized {
                    w,
                    scales,
                    biases,
                    group_size,
                    bits,
                } => RawTensor::Quantized {
                    w: rows(w, r0, r1)?,
                    scales: rows(scales, r0, r1)?,
                    biases: rows(biases, r0, r1)?,
                    group_size: *group_size,
                    bits: *bits,
                },
                RawTensor::Matrix(m) => {
                    let row_bytes = m.byte_len() / m.rows().max(1);
                    let data = m.data()[r0 * row_bytes..r1 * row_bytes].to_vec();
                    let piece = QuantMatrix::new(m.ty(), n, m.cols(), data)
                        .map_err(|e| Error::HostKernel(e.to_string()))?;
                    RawTensor::Matrix(Arc::new(piece))
                }
            });
            r0 = r1;
        }
        Ok(out)
    }
}

/// All tensors of a model under canonical (GGUF-style) names.
#[derive(Debug, Default)]
pub struct TensorMap {
    /// Where they come from (for errors).
    pub path: PathBuf,
    /// The tensors.
    pub tensors: HashMap<String, RawTensor>,
}

impl TensorMap {
    /// Removes and returns a tensor, or a [`Error::MissingTensor`].
    pub fn take(&mut self, name: &str) -> Result<RawTensor> {
        self.tensors
            .remove(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_owned(),
            })
    }

    /// Removes and returns a tensor if present.
    pub fn take_opt(&mut self, name: &str) -> Option<RawTensor> {
        self.tensors.remove(name)
    }

    /// Whether a tensor is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Replaces tensor `name` by consecutive row ranges of it (its first axis: output
    /// features of a weight, or a bias), `(new name, rows)` each; the rows must add up to
    /// the tensor's. For fused projections stored as one tensor (Phi-3's `qkv_proj`).
    pub fn split_rows(&mut self, name: &str, parts: &[(&str, usize)]) -> Result<()> {
        let t = self.take(name)?;
        let mut shape = t.logical_shape();
        let total: usize = parts.iter().map(|(_, n)| n).sum();
        if shape.first().copied() != Some(total as i64) {
            let found = shape.clone();
            if let Some(first) = shape.first_mut() {
                *first = total as i64;
            }
            return Err(Error::TensorShape {
                path: self.path.clone(),
                tensor: name.to_owned(),
                expected: shape,
                found,
            });
        }
        let sizes: Vec<usize> = parts.iter().map(|&(_, n)| n).collect();
        for ((part, _), piece) in parts.iter().zip(t.split_rows(&sizes)?) {
            self.tensors.insert((*part).to_owned(), piece);
        }
        Ok(())
    }

    /// Checks a tensor's logical shape.
    pub fn check_shape(&self, name: &str, t: &RawTensor, expected: &[i64]) -> Result<()> {
        let found = t.logical_shape();
        if found != expected {
            return Err(Error::TensorShape {
                path: self.path.clone(),
                tensor: name.to_owned(),
                expected: expected.to_vec(),
                found,
            });
        }
        Ok(())
    }
}

/// Loads every tensor of a GGUF file whose header was read by [`GgufHeader::read`], straight
/// from the file: 2-D tensors keep the file's blocks ([`RawTensor::Matrix`]), others (norms,
/// biases, RoPE factors) become f32 arrays.
pub fn load_gguf(header: &GgufHeader) -> Result<TensorMap> {
    use std::io::{Read, Seek, SeekFrom};
    header.check_size()?;
    header.check_types()?;
    let path = &header.path;
    let io = |source| Error::Io {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut tensors = HashMap::with_capacity(header.tensors.len());
    for info in &header.tensors {
        let mut data = vec![0u8; usize::try_from(info.n_bytes).unwrap_or(usize::MAX)];
        file.seek(SeekFrom::Start(info.file_offset)).map_err(io)?;
        file.read_exact(&mut data).map_err(io)?;
        let bad = |e: gguf_quants::Error| Error::Invalid {
            path: path.clone(),
            field: info.name.clone(),
            reason: e.to_string(),
        };
        // Stacked experts (`blk.N.ffn_{gate,up,down}_exps.weight`, `[experts, rows, cols]`):
        // one matrix of the file's blocks per expert, `blk.N.ffn_*_exps.E.weight`.
        if let (&[experts, rows, cols], Some(stem)) = (
            info.shape.as_slice(),
            info.name
                .strip_suffix(".weight")
                .filter(|s| s.ends_with("_exps")),
        ) {
            let per = data.len() / (experts as usize).max(1);
            for (e, chunk) in data.chunks_exact(per.max(1)).enumerate() {
                let m =
                    QuantMatrix::new(info.ggml_type, rows as usize, cols as usize, chunk.to_vec())
                        .map_err(bad)?;
                tensors.insert(format!("{stem}.{e}.weight"), RawTensor::Matrix(Arc::new(m)));
            }
            continue;
        }
        let t = match info.shape.as_slice() {
            &[rows, cols] => RawTensor::Matrix(Arc::new(
                QuantMatrix::new(info.ggml_type, rows as usize, cols as usize, data)
                    .map_err(bad)?,
            )),
            shape => {
                let elems: u64 = shape.iter().product();
                let cols = shape.last().copied().unwrap_or(1) as usize;
                let m = QuantMatrix::new(info.ggml_type, elems as usize / cols.max(1), cols, data)
                    .map_err(bad)?;
                let mut values = vec![0.0f32; elems as usize];
                dequantize_matrix(&m, &mut values)?;
                let dims: Vec<i32> = shape
                    .iter()
                    .map(|&d| i32::try_from(d).unwrap_or(i32::MAX))
                    .collect();
                RawTensor::Dense(Array::from_slice(&values, &dims))
            }
        };
        tensors.insert(info.name.clone(), t);
    }
    Ok(TensorMap {
        path: path.clone(),
        tensors,
    })
}

/// Every row of `m` as f32 into `out` (`[rows, cols]`), split across the host threads.
pub fn dequantize_matrix(m: &QuantMatrix, out: &mut [f32]) -> Result<()> {
    let cols = m.cols().max(1);
    if out.len() != m.rows() * m.cols() {
        return Err(Error::HostKernel(format!(
            "dequantizing {}x{} into {} values",
            m.rows(),
            m.cols(),
            out.len()
        )));
    }
    let rows = m.rows().div_ceil(host_linear::threads()).max(1);
    host_linear::try_for_each_piece(out, rows * cols, |k, dst| {
        let r0 = k * rows;
        m.dequantize_rows(r0..r0 + dst.len() / cols, dst)
    })
    .map_err(|e| Error::HostKernel(e.to_string()))
}

/// Maps a Hugging Face / MLX tensor name to the canonical GGUF-style name, keeping the
/// `.weight` / `.bias` / `.scales` / `.biases` suffix. `None` for tensors the engine ignores.
/// `post_norms`: the checkpoint has norms after each block too (Gemma), where
/// `post_attention_layernorm` follows the attention instead of preceding the MLP.
pub fn canonical_hf_name(name: &str, post_norms: bool) -> Option<String> {
    let name = name.strip_prefix("model.").unwrap_or(name);
    let (stem, suffix) = name.rsplit_once('.')?;
    if !matches!(suffix, "weight" | "bias" | "scales" | "biases") {
        return None;
    }
    let mapped = match stem {
        "embed_tokens" => "token_embd".to_owned(),
        "norm" => "output_norm".to_owned(),
        "lm_head" => "output".to_owned(),
        _ => {
            let rest = stem.strip_prefix("layers.")?;
            let (idx, part) = rest.split_once('.')?;
            idx.parse::<usize>().ok()?;
            if let Some(expert) = expert_name(part) {
                return Some(format!("blk.{idx}.{expert}.{suffix}"));
            }
            let p = match part {
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" if post_norms => "post_attention_norm",
                "post_attention_layernorm" => "ffn_norm",
                "pre_feedforward_layernorm" => "ffn_norm",
                "post_feedforward_layernorm" => "post_ffw_norm",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "self_attn.q_norm" => "attn_q_norm",
                "self_attn.q_a_proj" => "attn_q_a",
                "self_attn.q_a_layernorm" => "attn_q_a_norm",
                "self_attn.q_b_proj" => "attn_q_b",
                "self_attn.kv_a_proj_with_mqa" => "attn_kv_a_mqa",
                "self_attn.kv_a_layernorm" => "attn_kv_a_norm",
                "self_attn.kv_b_proj" => "attn_kv_b",
                "self_attn.k_norm" => "attn_k_norm",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                // Phi-3's fused projections, named as llama.cpp names them (split at load:
                // `arch::phi3::split_fused`).
                "self_attn.qkv_proj" => "attn_qkv",
                "mlp.gate_up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                _ => return None,
            };
            format!("blk.{idx}.{p}")
        }
    };
    Some(format!("{mapped}.{suffix}"))
}

/// The canonical name of a mixture-of-experts tensor of a layer (`part` is the name after
/// `layers.N.`): the router `ffn_gate_inp`, routed expert `e`'s `ffn_{gate,up,down}_exps.e`
/// and the shared expert's `ffn_{gate,up,down}_shexp`. Mixtral's `w1`/`w3`/`w2` are its
/// gate/up/down.
fn expert_name(part: &str) -> Option<String> {
    if matches!(part, "block_sparse_moe.gate" | "mlp.gate") {
        return Some("ffn_gate_inp".into());
    }
    let kind = |proj: &str| -> Option<&'static str> {
        Some(match proj {
            "gate_proj" | "w1" => "gate",
            "up_proj" | "w3" => "up",
            "down_proj" | "w2" => "down",
            _ => return None,
        })
    };
    if let Some(proj) = part.strip_prefix("mlp.shared_experts.") {
        return Some(format!("ffn_{}_shexp", kind(proj)?));
    }
    let rest = part
        .strip_prefix("block_sparse_moe.experts.")
        .or_else(|| part.strip_prefix("mlp.experts."))?;
    let (e, proj) = rest.split_once('.')?;
    let e: usize = e.parse().ok()?;
    Some(format!("ffn_{}_exps.{e}", kind(proj)?))
}

/// Checks a safetensors file's header in Rust (length, JSON, offsets within the file), so a
/// corrupt file gives a typed error before MLX reads it.
fn check_safetensors(path: &Path) -> Result<()> {
    use std::io::Read;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    let truncated = |field: &str, needed: u64| Error::Truncated {
        path: path.to_path_buf(),
        field: field.to_owned(),
        needed,
        file_size: size,
    };
    if size < 8 {
        return Err(truncated("header length", 8));
    }
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 || 8 + n > size {
        return Err(truncated("header", 8u64.saturating_add(n)));
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf).map_err(io)?;
    let header: serde_json::Value = serde_json::from_slice(&buf).map_err(|e| Error::Invalid {
        path: path.to_path_buf(),
        field: "header".into(),
        reason: e.to_string(),
    })?;
    let obj = header.as_object().ok_or_else(|| Error::Invalid {
        path: path.to_path_buf(),
        field: "header".into(),
        reason: "not a JSON object".into(),
    })?;
    let data_len = size - 8 - n;
    for (name, v) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dtype = v.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
        if !matches!(dtype, "F32" | "F16" | "BF16" | "U32" | "I32" | "I64" | "U8") {
            return Err(Error::UnsupportedTensorType {
                path: path.to_path_buf(),
                tensor: name.clone(),
                type_name: dtype.to_owned(),
                supported: "F32, F16, BF16, U32 (packed quantized)".into(),
            });
        }
        let end = v
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|e| e.as_u64())
            .ok_or_else(|| Error::Invalid {
                path: path.to_path_buf(),
                field: format!("{name}.data_offsets"),
                reason: "missing or not a pair of integers".into(),
            })?;
        if end > data_len {
            return Err(truncated(&format!("tensor `{name}` data"), 8 + n + end));
        }
    }
    Ok(())
}

/// Loads every `*.safetensors` file of a model directory (sharded or not), with MLX-style
/// quantization (`quantization: {group_size, bits}` in `config.json`) when present.
pub fn load_safetensors_dir(dir: &Path, config: &serde_json::Value) -> Result<TensorMap> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::MissingTensor {
            path: dir.to_path_buf(),
            tensor: "*.safetensors (no weight files)".into(),
        });
    }
    let quant = config
        .get("quantization")
        .or_else(|| config.get("quantization_config"));
    let group_size = quant
        .and_then(|q| q.get("group_size"))
        .and_then(|g| g.as_i64())
        .unwrap_or(64) as i32;
    let bits = quant
        .and_then(|q| q.get("bits"))
        .and_then(|b| b.as_i64())
        .unwrap_or(4) as i32;
    let post_norms = config
        .get("model_type")
        .and_then(|t| t.as_str())
        .and_then(crate::config::Family::from_name)
        == Some(crate::config::Family::Gemma3);
    let mut all: HashMap<String, Array> = HashMap::new();
    for f in &files {
        check_safetensors(f)?;
        let arrays = Array::load_safetensors(f).map_err(|e| Error::Mlx {
            context: format!("loading {}", f.display()),
            message: e.to_string(),
        })?;
        for (name, a) in arrays {
            if let Some(c) = canonical_hf_name(&name, post_norms) {
                all.insert(c, a);
            }
        }
    }
    let mut tensors = HashMap::new();
    let names: Vec<String> = all.keys().cloned().collect();
    for name in names {
        let Some(stem) = name.strip_suffix(".weight") else {
            continue;
        };
        let Some(w) = all.remove(&name) else { continue };
        if w.dtype() == Dtype::Uint32 {
            let scales =
                all.remove(&format!("{stem}.scales"))
                    .ok_or_else(|| Error::MissingTensor {
                        path: dir.to_path_buf(),
                        tensor: format!("{stem}.scales"),
                    })?;
            let biases =
                all.remove(&format!("{stem}.biases"))
                    .ok_or_else(|| Error::MissingTensor {
                        path: dir.to_path_buf(),
                        tensor: format!("{stem}.biases"),
                    })?;
            if !matches!(bits, 2 | 3 | 4 | 5 | 6 | 8) || !matches!(group_size, 32 | 64 | 128) {
                return Err(Error::Invalid {
                    path: dir.join("config.json"),
                    field: "quantization".into(),
                    reason: format!("bits {bits} / group_size {group_size} not supported"),
                });
            }
            tensors.insert(
                name,
                RawTensor::Quantized {
                    w,
                    scales,
                    biases,
                    group_size,
                    bits,
                },
            );
        } else {
            tensors.insert(name, RawTensor::Dense(w));
        }
    }
    // Biases of projections (q/k/v bias) remain.
    for (name, a) in all {
        if name.ends_with(".bias") {
            tensors.insert(name, RawTensor::Dense(a));
        }
    }
    Ok(TensorMap {
        path: dir.to_path_buf(),
        tensors,
    })
}

/// A linear layer's weights on the host, for the host kernels: one matrix per part of a
/// fused layer (q/k/v or gate/up parts may come in different GGUF types), with its bias.
#[derive(Debug)]
pub struct HostLinear {
    parts: Vec<HostMatrix>,
    in_features: usize,
    out_features: usize,
    bias: Option<Vec<f32>>,
}

/// One weight matrix `[out, in]` in a host kernel's format.
#[derive(Debug)]
pub enum HostMatrix {
    /// MLX-affine 4/8-bit weights repacked in records of 32 ([`PackedMatrix`]).
    Packed(PackedMatrix),
    /// A GGUF tensor's own blocks ([`QuantMatrix`]).
    Blocks(Arc<QuantMatrix>),
}

impl HostMatrix {
    /// Output features.
    pub fn out_features(&self) -> usize {
        match self {
            HostMatrix::Packed(m) => m.out_features(),
            HostMatrix::Blocks(m) => m.rows(),
        }
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        match self {
            HostMatrix::Packed(m) => m.in_features(),
            HostMatrix::Blocks(m) => m.cols(),
        }
    }

    /// Host memory held, in bytes.
    pub fn byte_len(&self) -> usize {
        match self {
            HostMatrix::Packed(m) => m.byte_len(),
            HostMatrix::Blocks(m) => m.byte_len(),
        }
    }

    /// Rows `rows` dequantized into `out` (`[rows.len(), in]`).
    pub fn dequantize_rows(&self, rows: std::ops::Range<usize>, out: &mut [f32]) -> Result<()> {
        match self {
            HostMatrix::Packed(m) => {
                let n = m.in_features().max(1);
                if out.len() != rows.len() * n {
                    return Err(Error::HostKernel("a panel of the wrong size".into()));
                }
                for (o, dst) in rows.zip(out.chunks_exact_mut(n)) {
                    m.dequantize_row(o, dst)?;
                }
                Ok(())
            }
            HostMatrix::Blocks(m) => m
                .dequantize_rows(rows, out)
                .map_err(|e| Error::HostKernel(e.to_string())),
        }
    }

    /// `y = x Wᵀ` with the decode kernels (`x` `[rows, in]`, `y` `[rows, out]`), the outputs
    /// split across the host threads; each value's bits do not depend on `rows` or the split.
    pub fn matmul(&self, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        match self {
            HostMatrix::Packed(m) => m.matmul(x, rows, y),
            HostMatrix::Blocks(m) => host_linear::blocks_matmul(m, x, rows, y),
        }
    }
}

thread_local! {
    /// The worker thread's dequantized weight panel, reused by every prefill product.
    static PANEL: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    /// The worker thread's host linear output, reused (copied into an MLX array each time).
    static OUTPUT: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Floats of one dequantized weight panel for the prefill GEMM (8 MiB). BLAS packs the
/// activations again for every call, so panels are made wide: a 256 KiB panel (64 rows of
/// 896) made Qwen2.5-0.5B's prefill 3x slower than f32 weights.
const PANEL_FLOATS: usize = 2 << 20;

/// Rows from which a host product goes through BLAS over dequantized panels rather than
/// the decode kernels (which dequantize each weight once per group of rows).
pub const GEMM_MIN_ROWS: usize = 16;

/// A 2-D MLX-affine quantized tensor with 4- or 8-bit codes in `u32` words, as the host
/// kernels read it.
struct AffineView<'a> {
    words: &'a [u32],
    scales: &'a Array,
    biases: &'a Array,
    out: usize,
    inp: usize,
    group: usize,
    bits: u32,
}

impl RawTensor {
    /// For [`WeightFormat::Quantized`]: GGUF blocks as MLX affine triples, group 32. Q4_0,
    /// Q4_1 and Q8_0 map exactly (their values are `scale × q + bias` on the same grid, as
    /// MLX's own GGUF reader maps them); other block types are dequantized and requantized to
    /// 8 bits (error at most one step, 1/255 of each group's range); F32/F16/BF16 become
    /// dense f32. Other tensors are returned as they are.
    pub fn to_mlx_affine(&self) -> Result<RawTensor> {
        let RawTensor::Matrix(m) = self else {
            return Ok(self.clone());
        };
        if matches!(m.ty(), QuantType::F32 | QuantType::F16 | QuantType::Bf16) {
            // Float weights stay dense (f32), as MLX runs them.
            return Ok(RawTensor::Dense(self.to_f32()?));
        }
        let (rows, cols) = (m.rows(), m.cols());
        let shape = |c: usize| [rows, c].map(|d| i32::try_from(d).unwrap_or(i32::MAX));
        /// A block's MLX scale and bias from its bytes.
        type BlockScale = fn(&[u8]) -> (f32, f32);
        let (bits, scale_of): (i32, Option<BlockScale>) = match m.ty() {
            QuantType::Q4_0 => (
                4,
                Some(|b| {
                    let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                    (d, -8.0 * d)
                }),
            ),
            QuantType::Q4_1 => (
                4,
                Some(|b| {
                    let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                    (d, half::f16::from_le_bytes([b[2], b[3]]).to_f32())
                }),
            ),
            QuantType::Q8_0 => (
                8,
                Some(|b| {
                    let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                    (d, -128.0 * d)
                }),
            ),
            _ => (8, None),
        };
        let Some(scale_of) = scale_of else {
            let dense = self.to_f32()?;
            let (w, scales, biases) =
                ops::quantize(&dense, 32, 8).ctx("requantizing to MLX 8-bit")?;
            return Ok(RawTensor::Quantized {
                w,
                scales,
                biases,
                group_size: 32,
                bits,
            });
        };
        // One 32-element block per group: codes packed little-endian into u32 words.
        let groups = cols / 32;
        let block_bytes = m.ty().block_bytes();
        let per_word = 32 / bits as usize;
        let mut words = vec![0u32; rows * cols / per_word];
        let mut scales = vec![0.0f32; rows * groups];
        let mut biases = vec![0.0f32; rows * groups];
        for (g, block) in m.data().chunks_exact(block_bytes).enumerate() {
            let (d, bias) = scale_of(block);
            scales[g] = d;
            biases[g] = bias;
            let codes: Vec<u32> = match m.ty() {
                QuantType::Q8_0 => block[2..34]
                    .iter()
                    .map(|&q| u32::from((q as i8 as i16 + 128) as u8))
                    .collect(),
                _ => {
                    let qs = &block[block_bytes - 16..];
                    (0..32)
                        .map(|j| {
                            u32::from(if j < 16 {
                                qs[j] & 0x0f
                            } else {
                                qs[j - 16] >> 4
                            })
                        })
                        .collect()
                }
            };
            for (k, chunk) in codes.chunks(per_word).enumerate() {
                let mut word = 0u32;
                for (e, &c) in chunk.iter().enumerate() {
                    word |= c << (e as u32 * bits as u32);
                }
                words[g * 32 / per_word + k] = word;
            }
        }
        Ok(RawTensor::Quantized {
            w: Array::from_slice(&words, &shape(cols / per_word)),
            scales: Array::from_slice(&scales, &shape(groups)),
            biases: Array::from_slice(&biases, &shape(groups)),
            group_size: 32,
            bits,
        })
    }

    /// The host view of a 4/8-bit MLX-affine `[out, in]` tensor; `None` for anything else.
    fn affine_view(&self) -> Result<Option<AffineView<'_>>> {
        let RawTensor::Quantized {
            w,
            scales,
            biases,
            group_size,
            bits,
        } = self
        else {
            return Ok(None);
        };
        let shape = self.logical_shape();
        let (Ok(bits), Ok(group)) = (u32::try_from(*bits), usize::try_from(*group_size)) else {
            return Ok(None);
        };
        if shape.len() != 2 || !matches!(bits, 4 | 8) || group == 0 || w.dtype() != Dtype::Uint32 {
            return Ok(None);
        }
        let words = w
            .try_as_slice::<u32>()
            .map_err(|e| Error::HostKernel(format!("reading packed weights: {e}")))?;
        Ok(Some(AffineView {
            words,
            scales,
            biases,
            out: shape[0] as usize,
            inp: shape[1] as usize,
            group,
            bits,
        }))
    }
}

/// One MLX-affine quantized `[out, in]` matrix on the host.
struct AffineHost<'a> {
    words: &'a [u32],
    scales: Vec<f32>,
    biases: Vec<f32>,
    out: usize,
    group: usize,
    bits: u32,
}

impl AffineHost<'_> {
    /// Writes its weights `(o, i)` for inputs `rows` into `dst` (`[rows.len(), total]`,
    /// columns from `offset`). `rows.start` is a multiple of the group size.
    fn write_transposed(
        &self,
        rows: std::ops::Range<usize>,
        total: usize,
        offset: usize,
        dst: &mut [f32],
    ) {
        /// Outputs decoded together, so each input's values go out as one run of 16.
        const TILE: usize = 16;
        let per_word = (32 / self.bits) as usize;
        let n_in = self.words.len() * per_word / self.out.max(1);
        let (row_words, groups) = (n_in / per_word, n_in / self.group);
        let mask = (1u32 << self.bits) - 1;
        let mut tile = vec![[0.0f32; TILE]; self.group];
        for o0 in (0..self.out).step_by(TILE) {
            let n = (self.out - o0).min(TILE);
            for g in rows.start / self.group..rows.end.div_ceil(self.group) {
                for (t, o) in (o0..o0 + n).enumerate() {
                    let (scale, bias) = (self.scales[o * groups + g], self.biases[o * groups + g]);
                    let words = &self.words[o * row_words + g * self.group / per_word..]
                        [..self.group / per_word];
                    for (w, &word) in words.iter().enumerate() {
                        for k in 0..per_word {
                            let q = (word >> (k as u32 * self.bits)) & mask;
                            // Two roundings, as MLX's dequantize (a multiply, then an add).
                            tile[w * per_word + k][t] = q as f32 * scale + bias;
                        }
                    }
                }
                for (j, vals) in tile.iter().enumerate() {
                    let r = g * self.group + j - rows.start;
                    dst[r * total + offset + o0..][..n].copy_from_slice(&vals[..n]);
                }
            }
        }
    }
}

/// `(parts stacked along the output axis)ᵀ` as a contiguous `[in, Σ out]` f32 array,
/// dequantized on the host's threads; `None` unless every part is MLX-affine quantized
/// with 4- or 8-bit codes in `u32` words. The values are the bits MLX's `dequantize` gives
/// (a test checks): this replaces MLX's single-threaded dequantize and strided transpose,
/// which took about half of a model's load time.
fn dequantize_transposed(parts: &[RawTensor]) -> Result<Option<Array>> {
    let mut hosts = Vec::with_capacity(parts.len());
    let mut n_in = None;
    for p in parts {
        let Some(AffineView {
            words,
            scales,
            biases,
            out,
            inp,
            group,
            bits,
        }) = p.affine_view()?
        else {
            return Ok(None);
        };
        let per_word = (32 / bits) as usize;
        if *n_in.get_or_insert(inp) != inp
            || !group.is_multiple_of(per_word)
            || !inp.is_multiple_of(group)
        {
            return Ok(None);
        }
        let scales = with_host_f32(scales, |s| Ok(s.to_vec()))?;
        let biases = with_host_f32(biases, |b| Ok(b.to_vec()))?;
        let cells = out * inp;
        if words.len() * per_word != cells
            || scales.len() * group != cells
            || biases.len() * group != cells
        {
            return Err(Error::HostKernel(format!(
                "a {out}x{inp} matrix with {} words, {} scales, {} biases",
                words.len(),
                scales.len(),
                biases.len()
            )));
        }
        hosts.push(AffineHost {
            words,
            scales,
            biases,
            out,
            group,
            bits,
        });
    }
    let Some(n_in) = n_in else {
        return Ok(None);
    };
    let total: usize = hosts.iter().map(|h| h.out).sum();
    if n_in == 0 || total == 0 {
        return Ok(None);
    }
    let mut data = vec![0.0f32; n_in * total];
    let fill = |r0: usize, dst: &mut [f32]| {
        let rows = r0..r0 + dst.len() / total;
        let mut offset = 0;
        for h in &hosts {
            h.write_transposed(rows.clone(), total, offset, dst);
            offset += h.out;
        }
    };
    // Whole groups of every part per thread (group sizes are powers of two in practice).
    let align = hosts.iter().fold(1, |a, h| lcm(a, h.group));
    let chunk = n_in.div_ceil(host_linear::threads()).div_ceil(align) * align;
    host_linear::for_each_piece(&mut data, chunk * total, |k, dst| fill(k * chunk, dst));
    let shape = [n_in, total].map(|d| i32::try_from(d).unwrap_or(i32::MAX));
    Ok(Some(Array::from_slice(&data, &shape)))
}

/// The least common multiple (group sizes of stacked parts).
fn lcm(a: usize, b: usize) -> usize {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x.max(1) * b
}

/// Reads an evaluated f32 array's values in row-major order (copying only when the array is
/// a strided view) and hands them to `f`.
fn with_host_f32<T>(a: &Array, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let read = |e: mlx_rs::error::AsSliceError| Error::HostKernel(format!("reading an array: {e}"));
    let cast;
    let a = if a.dtype() == Dtype::Float32 {
        a
    } else {
        cast = a
            .as_dtype(Dtype::Float32)
            .ctx("casting for the host kernel")?;
        &cast
    };
    match a.try_as_slice::<f32>() {
        Ok(s) => f(s),
        Err(mlx_rs::error::AsSliceError::NotContiguous) => {
            let c = a.contiguous().ctx("copying for the host kernel")?;
            f(c.try_as_slice::<f32>().map_err(read)?)
        }
        Err(e) => Err(read(e)),
    }
}

impl HostLinear {
    /// Host weights for `parts` (weights `[out_i, in]` stacked along the output axis): GGUF
    /// blocks as they are, or MLX-affine 4/8-bit weights in groups of a multiple of 32
    /// repacked; `None` when any part is neither (the layer then decodes on MLX). `bias` is
    /// the fused bias, `[Σ out_i]`.
    pub fn from_raw(parts: &[RawTensor], bias: Option<&Array>) -> Result<Option<Self>> {
        let mut host = Vec::with_capacity(parts.len());
        if parts.iter().all(|p| matches!(p, RawTensor::Matrix(_))) {
            for p in parts {
                if let RawTensor::Matrix(m) = p {
                    host.push(HostMatrix::Blocks(Arc::clone(m)));
                }
            }
        } else {
            let mut packed = Vec::with_capacity(parts.len());
            for p in parts {
                let Some(v) = p.affine_view()? else {
                    return Ok(None);
                };
                if !v.group.is_multiple_of(BLOCK) {
                    return Ok(None);
                }
                let m = with_host_f32(v.scales, |s| {
                    with_host_f32(v.biases, |b| {
                        PackedMatrix::from_affine(v.bits, v.group, v.out, v.inp, v.words, s, b)
                    })
                })?;
                packed.push(m);
            }
            host.push(HostMatrix::Packed(PackedMatrix::concat(packed)?));
        }
        let Some(in_features) = host.first().map(HostMatrix::in_features) else {
            return Ok(None);
        };
        if host.iter().any(|m| m.in_features() != in_features) {
            return Err(Error::HostKernel(
                "fused parts with different input sizes".into(),
            ));
        }
        let out_features = host.iter().map(HostMatrix::out_features).sum();
        let bias = match bias {
            Some(b) => {
                let v = with_host_f32(b, |s| Ok(s.to_vec()))?;
                if v.len() != out_features {
                    return Err(Error::HostKernel(format!(
                        "a bias of {} values for {out_features} outputs",
                        v.len(),
                    )));
                }
                Some(v)
            }
            None => None,
        };
        Ok(Some(HostLinear {
            parts: host,
            in_features,
            out_features,
            bias,
        }))
    }

    /// Output features (all parts).
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The weight matrices, in output order.
    pub fn parts(&self) -> &[HostMatrix] {
        &self.parts
    }

    /// Host memory held by the weights, in bytes.
    pub fn byte_len(&self) -> usize {
        self.parts.iter().map(HostMatrix::byte_len).sum()
    }

    /// Output rows `rows` (across the parts) dequantized into `out` (`[rows.len(), in]`).
    fn dequantize_rows(&self, rows: std::ops::Range<usize>, out: &mut [f32]) -> Result<()> {
        let n_in = self.in_features.max(1);
        let mut first = 0;
        for p in &self.parts {
            let n = p.out_features();
            let (lo, hi) = (rows.start.max(first), rows.end.min(first + n));
            if lo < hi {
                let dst = &mut out[(lo - rows.start) * n_in..(hi - rows.start) * n_in];
                p.dequantize_rows(lo - first..hi - first, dst)?;
            }
            first += n;
        }
        Ok(())
    }

    /// [`HostLinear::dequantize_rows`] split across the host threads.
    fn dequantize_panel(&self, rows: std::ops::Range<usize>, out: &mut [f32]) -> Result<()> {
        let n_in = self.in_features.max(1);
        let per = rows.len().div_ceil(host_linear::threads()).max(1);
        host_linear::try_for_each_piece(out, per * n_in, |k, dst| {
            let r0 = rows.start + k * per;
            self.dequantize_rows(r0..r0 + dst.len() / n_in, dst)
        })
    }

    /// `y = x Wᵀ` (`[rows, out]`) through BLAS: the output rows of all parts in panels of
    /// [`PANEL_FLOATS`] dequantized weights, one `sgemm` each.
    fn gemm(&self, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        let (n_out, n_in) = (self.out_features, self.in_features);
        let panel = ((PANEL_FLOATS / n_in.max(1)).max(16) / 16 * 16).min(n_out.max(1));
        let mut scratch = PANEL.with(|p| p.take());
        scratch.resize(panel * n_in, 0.0);
        let done = self.gemm_with(x, rows, y, panel, &mut scratch);
        PANEL.with(|p| p.replace(scratch));
        done
    }

    fn gemm_with(
        &self,
        x: &[f32],
        rows: usize,
        y: &mut [f32],
        panel: usize,
        scratch: &mut [f32],
    ) -> Result<()> {
        let (n_out, n_in) = (self.out_features, self.in_features);
        for o0 in (0..n_out).step_by(panel.max(1)) {
            let o1 = (o0 + panel).min(n_out);
            let w = &mut scratch[..(o1 - o0) * n_in];
            self.dequantize_panel(o0..o1, w)?;
            if !host_gemm::sgemm_nt(rows, o1 - o0, n_in, x, w, &mut y[o0..], n_out) {
                return Err(Error::HostKernel(format!(
                    "sgemm refused a {rows}x{n_in} by {}x{n_in} product",
                    o1 - o0
                )));
            }
        }
        Ok(())
    }

    /// Output row `o` (all inputs) dequantized into `out`: an embedding lookup from a table
    /// that is also the LM head.
    pub fn dequantize_row(&self, o: usize, out: &mut [f32]) -> Result<()> {
        let mut first = 0;
        for p in &self.parts {
            let n = p.out_features();
            if o < first + n {
                return p.dequantize_rows(o - first..o - first + 1, out);
            }
            first += n;
        }
        Err(Error::HostKernel(format!(
            "row {o} of a {}-row matrix",
            self.out_features
        )))
    }

    /// `y = x Wᵀ` (`[rows, out]`) without bias: BLAS over dequantized panels from
    /// [`GEMM_MIN_ROWS`] rows (when a BLAS is loaded), the decode kernels below.
    fn product(&self, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        let width = self.out_features;
        if rows >= GEMM_MIN_ROWS && host_gemm::available() {
            return self.gemm(x, rows, y);
        }
        if let [only] = self.parts.as_slice() {
            return only.matmul(x, rows, y);
        }
        let mut at = 0;
        for p in &self.parts {
            let n = p.out_features();
            let mut part = vec![0.0f32; rows * n];
            p.matmul(x, rows, &mut part)?;
            for (dst, src) in y.chunks_exact_mut(width).zip(part.chunks_exact(n)) {
                dst[at..at + n].copy_from_slice(src);
            }
            at += n;
        }
        Ok(())
    }

    /// `y = x Wᵀ + b (+ residual)` on host slices: `x` is `[rows, in]`, `y` and `residual`
    /// `[rows, out]`, all row-major. The bias is added first, then the residual (as
    /// [`HostLinear::forward`] does).
    pub fn forward_host(
        &self,
        x: &[f32],
        rows: usize,
        residual: Option<&[f32]>,
        y: &mut [f32],
    ) -> Result<()> {
        let n_out = self.out_features;
        if x.len() != rows * self.in_features || y.len() != rows * n_out {
            return Err(Error::HostKernel(format!(
                "{rows} rows: input of {} values for {} features, output of {} for {n_out}",
                x.len(),
                self.in_features,
                y.len(),
            )));
        }
        self.product(x, rows, y)?;
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(n_out) {
                for (v, &b) in row.iter_mut().zip(b) {
                    *v += b;
                }
            }
        }
        if let Some(r) = residual {
            if r.len() != y.len() {
                return Err(Error::HostKernel(format!(
                    "a residual of {} values for {} outputs",
                    r.len(),
                    y.len()
                )));
            }
            for (v, &r) in y.iter_mut().zip(r) {
                *v += r;
            }
        }
        Ok(())
    }

    /// `x Wᵀ + b (+ residual)` for `x` of shape `[rows, in]` (evaluated here), computed on the
    /// host; returns `[rows, out]`.
    pub fn forward(&self, x: &Array, residual: Option<&Array>) -> Result<Array> {
        let (n_in, n_out) = (self.in_features, self.out_features);
        let rows = match x.shape() {
            [rows, cols] if *cols as usize == n_in => *rows as usize,
            other => {
                return Err(Error::HostKernel(format!(
                    "input of shape {other:?} for {n_in} features"
                )))
            }
        };
        let mut all: Vec<&Array> = vec![x];
        all.extend(residual);
        mlx_rs::transforms::eval(all).ctx("evaluating a decode input")?;
        let shape = [rows, n_out].map(|d| i32::try_from(d).unwrap_or(i32::MAX));
        // One output buffer per thread, reused: a prefill chunk's outputs are megabytes, and
        // fresh ones cost a page fault per 4 KiB each time.
        OUTPUT.with(|buf| {
            // Every product overwrites all of `y`: no need to clear what is reused.
            let mut y = buf.take();
            y.resize(rows * n_out, 0.0);
            let done = with_host_f32(x, |xs| match residual {
                Some(res) => with_host_f32(res, |r| self.forward_host(xs, rows, Some(r), &mut y)),
                None => self.forward_host(xs, rows, None, &mut y),
            });
            let out = done.map(|()| Array::from_slice(&y, &shape));
            buf.replace(y);
            out
        })
    }
}

/// The MLX weights of a linear layer, in the compute format.
#[derive(Debug)]
pub enum LinearWeights {
    /// None: the layer runs on its host weights only ([`WeightFormat::Host`]).
    Host,
    /// Dense: `wt` is `Wᵀ`, a contiguous `[in, out]` matrix.
    Dense {
        /// The transposed weight.
        wt: Array,
        /// Optional bias `[out]`.
        bias: Option<Array>,
    },
    /// Quantized: `quantized_matmul(x, w, scales, biases, transpose = true)`.
    Quantized {
        /// Packed values `[out, in × bits / 32]`.
        w: Array,
        /// Scales.
        scales: Array,
        /// Biases of the quantization.
        qbiases: Array,
        /// Group size.
        group_size: i32,
        /// Bits.
        bits: i32,
        /// Optional bias `[out]`.
        bias: Option<Array>,
    },
}

/// A linear layer `y = x Wᵀ (+ b)`: MLX weights for prefill (and decode with
/// [`crate::DecodeKernel::Mlx`]), and optionally host-packed blocks for decode steps.
#[derive(Debug)]
pub struct Linear {
    /// The MLX weights.
    pub weights: LinearWeights,
    /// The host copy for decode steps, when built and the file's weights allow it (boxed:
    /// layers hold several linears side by side).
    pub host: Option<Box<HostLinear>>,
}

impl Linear {
    /// Builds the compute form of several same-input weights concatenated along the output
    /// axis (one matmul instead of several: q/k/v, gate/up). One part gives a plain linear.
    /// With `host`, also packs the 4/8-bit weights for the host decode kernel.
    pub fn fused(
        parts: Vec<RawTensor>,
        biases: Vec<Option<RawTensor>>,
        format: WeightFormat,
        host: bool,
    ) -> Result<Self> {
        let bias = if biases.iter().any(Option::is_some) {
            let mut bs = Vec::with_capacity(biases.len());
            for (b, p) in biases.iter().zip(&parts) {
                bs.push(match b {
                    Some(b) => b.to_f32()?,
                    None => {
                        let out = p.logical_shape().first().copied().unwrap_or(0) as i32;
                        Array::zeros::<f32>(&[out]).ctx("allocating a zero bias")?
                    }
                });
            }
            Some(ops::concatenate(&bs, 0).ctx("fusing biases")?)
        } else {
            None
        };
        let blocks = parts.iter().all(|p| matches!(p, RawTensor::Matrix(_)));
        if format == WeightFormat::Host && blocks {
            // Q4_0 / Q4_1 / Q8_0 parts of one type go to the record-packed 4/8-bit kernel
            // (f32 scale and minimum beside each block's codes: 1.2-1.33x the file's bytes),
            // which decodes the default model ~1.4x faster than the generic block kernels.
            let first = parts.first().and_then(|p| match p {
                RawTensor::Matrix(m) => Some(m.ty()),
                _ => None,
            });
            let packable = matches!(
                first,
                Some(QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q8_0)
            ) && parts
                .iter()
                .all(|p| matches!(p, RawTensor::Matrix(m) if Some(m.ty()) == first));
            let affine;
            let host_parts = if packable {
                affine = parts
                    .iter()
                    .map(RawTensor::to_mlx_affine)
                    .collect::<Result<Vec<_>>>()?;
                &affine
            } else {
                &parts
            };
            let host = HostLinear::from_raw(host_parts, bias.as_ref())?
                .ok_or_else(|| Error::HostKernel("GGUF blocks without a host kernel".into()))?;
            return Ok(Linear {
                weights: LinearWeights::Host,
                host: Some(Box::new(host)),
            });
        }
        let host = if host {
            HostLinear::from_raw(&parts, bias.as_ref())?.map(Box::new)
        } else {
            None
        };
        let parts = if format == WeightFormat::Quantized && blocks {
            parts
                .iter()
                .map(RawTensor::to_mlx_affine)
                .collect::<Result<Vec<_>>>()?
        } else {
            parts
        };
        Ok(Linear {
            weights: LinearWeights::fused(parts, bias, format)?,
            host,
        })
    }

    /// `x Wᵀ + b` for `x` of shape `[rows, in]` (MLX, or the host for host-only weights).
    pub fn forward(&self, x: &Array) -> Result<Array> {
        match (&self.weights, &self.host) {
            (LinearWeights::Host, Some(h)) => h.forward(x, None),
            _ => self.weights.forward(x),
        }
    }

    /// `x Wᵀ + residual` (one fused op for dense weights; MLX, or the host for host-only
    /// weights).
    pub fn forward_residual(&self, x: &Array, residual: &Array) -> Result<Array> {
        match (&self.weights, &self.host) {
            (LinearWeights::Host, Some(h)) => h.forward(x, Some(residual)),
            _ => self.weights.forward_residual(x, residual),
        }
    }

    /// `x Wᵀ + b (+ residual)`: on the host when `decode` and the layer has host weights, or
    /// when it has only host weights; else on MLX.
    pub fn apply(&self, x: &Array, residual: Option<&Array>, decode: bool) -> Result<Array> {
        let host_only = matches!(self.weights, LinearWeights::Host);
        match (&self.host, residual) {
            (Some(h), _) if decode || host_only => h.forward(x, residual),
            (_, Some(r)) => self.forward_residual(x, r),
            (_, None) => self.forward(x),
        }
    }

    /// The arrays this layer holds (to evaluate them once at load).
    pub fn arrays(&self) -> Vec<&Array> {
        self.weights.arrays()
    }
}

impl LinearWeights {
    fn fused(parts: Vec<RawTensor>, bias: Option<Array>, format: WeightFormat) -> Result<Self> {
        let all_quant_same = parts
            .iter()
            .all(|p| matches!(p, RawTensor::Quantized { .. }))
            && parts.windows(2).all(|w| match (&w[0], &w[1]) {
                (
                    RawTensor::Quantized {
                        group_size: g0,
                        bits: b0,
                        ..
                    },
                    RawTensor::Quantized {
                        group_size: g1,
                        bits: b1,
                        ..
                    },
                ) => g0 == g1 && b0 == b1,
                _ => false,
            });
        if format == WeightFormat::Quantized && all_quant_same {
            let mut ws = Vec::new();
            let mut ss = Vec::new();
            let mut bs = Vec::new();
            let (mut g, mut nb) = (32, 4);
            for p in parts {
                if let RawTensor::Quantized {
                    w,
                    scales,
                    biases,
                    group_size,
                    bits,
                } = p
                {
                    ws.push(w);
                    ss.push(scales.as_dtype(Dtype::Float32).ctx("casting scales")?);
                    bs.push(biases.as_dtype(Dtype::Float32).ctx("casting biases")?);
                    g = group_size;
                    nb = bits;
                }
            }
            let cat = |v: &[Array]| -> Result<Array> {
                if v.len() == 1 {
                    Ok(v[0].clone())
                } else {
                    ops::concatenate(v, 0).ctx("fusing quantized weights")
                }
            };
            return Ok(LinearWeights::Quantized {
                w: cat(&ws)?,
                scales: cat(&ss)?,
                qbiases: cat(&bs)?,
                group_size: g,
                bits: nb,
                bias,
            });
        }
        if let Some(wt) = dequantize_transposed(&parts)? {
            return Ok(LinearWeights::Dense { wt, bias });
        }
        let mut dense = Vec::with_capacity(parts.len());
        for p in &parts {
            dense.push(p.to_f32()?);
        }
        let w = if dense.len() == 1 {
            dense.remove(0)
        } else {
            ops::concatenate(&dense, 0).ctx("fusing weights")?
        };
        // Stored as a contiguous `[in, out]` copy: one-row products (decode) run faster through
        // BLAS as `x · Wᵀ` without a transpose flag (measured +15% decode on x86).
        let wt = w.t().contiguous().ctx("transposing a weight")?;
        Ok(LinearWeights::Dense { wt, bias })
    }

    /// `x Wᵀ + b` for `x` of shape `[rows, in]`.
    pub fn forward(&self, x: &Array) -> Result<Array> {
        match self {
            LinearWeights::Host => Err(Error::HostKernel(
                "a host-only linear layer has no MLX weights".into(),
            )),
            LinearWeights::Dense { wt, bias } => match bias {
                Some(b) => ops::addmm(b, x, wt, None, None).ctx("linear (addmm)"),
                None => x.matmul(wt).ctx("linear (matmul)"),
            },
            LinearWeights::Quantized {
                w,
                scales,
                qbiases,
                group_size,
                bits,
                bias,
            } => {
                let y = ops::quantized_matmul(x, w, scales, qbiases, true, *group_size, *bits)
                    .ctx("linear (quantized_matmul)")?;
                match bias {
                    Some(b) => y.add(b).ctx("linear bias"),
                    None => Ok(y),
                }
            }
        }
    }

    /// `x Wᵀ + residual` (one fused op for dense weights).
    pub fn forward_residual(&self, x: &Array, residual: &Array) -> Result<Array> {
        match self {
            LinearWeights::Dense { wt, bias: None } => {
                ops::addmm(residual, x, wt, None, None).ctx("linear + residual (addmm)")
            }
            _ => self.forward(x)?.add(residual).ctx("residual add"),
        }
    }

    /// The arrays this layer holds (to evaluate them once at load).
    pub fn arrays(&self) -> Vec<&Array> {
        match self {
            LinearWeights::Host => Vec::new(),
            LinearWeights::Dense { wt, bias } => std::iter::once(wt).chain(bias.iter()).collect(),
            LinearWeights::Quantized {
                w,
                scales,
                qbiases,
                bias,
                ..
            } => [w, scales, qbiases]
                .into_iter()
                .chain(bias.iter())
                .collect(),
        }
    }
}

/// An embedding table, also usable as a tied LM head.
#[derive(Debug)]
pub enum Embedding {
    /// Dense f32, stored transposed as a contiguous `[hidden, vocab]` matrix: the tied LM
    /// head is then a plain `x · tableᵀ` (faster for one-row decode products) and a lookup
    /// gathers columns. One copy only.
    Dense {
        /// `tableᵀ`, contiguous.
        table_t: Array,
    },
    /// The GGUF table's own blocks ([`WeightFormat::Host`]): rows dequantized on the host
    /// per lookup; the same matrix is the tied LM head's host weights.
    Host {
        /// `[vocab, hidden]` blocks.
        table: Arc<QuantMatrix>,
    },
    /// Quantized rows (gathered, then dequantized).
    Quantized {
        /// Packed values.
        w: Array,
        /// Scales (f32).
        scales: Array,
        /// Biases (f32).
        biases: Array,
        /// Group size.
        group_size: i32,
        /// Bits.
        bits: i32,
    },
}

impl Embedding {
    /// Builds the embedding in the compute format.
    pub fn new(t: RawTensor, format: WeightFormat) -> Result<Self> {
        let t = match (format, t) {
            (WeightFormat::Host, RawTensor::Matrix(table)) => return Ok(Embedding::Host { table }),
            (WeightFormat::Quantized, t @ RawTensor::Matrix(_)) => t.to_mlx_affine()?,
            (_, t) => t,
        };
        match (format, t) {
            (
                WeightFormat::Quantized,
                RawTensor::Quantized {
                    w,
                    scales,
                    biases,
                    group_size,
                    bits,
                },
            ) => Ok(Embedding::Quantized {
                w,
                scales: scales.as_dtype(Dtype::Float32).ctx("casting scales")?,
                biases: biases.as_dtype(Dtype::Float32).ctx("casting biases")?,
                group_size,
                bits,
            }),
            (_, t) => {
                if let Some(table_t) = dequantize_transposed(std::slice::from_ref(&t))? {
                    return Ok(Embedding::Dense { table_t });
                }
                let table = t.to_f32()?;
                let table_t = table.t().contiguous().ctx("transposing the embedding")?;
                Ok(Embedding::Dense { table_t })
            }
        }
    }

    /// Rows of `ids` (`[n]` u32) → `[n, hidden]`.
    pub fn lookup(&self, ids: &Array) -> Result<Array> {
        match self {
            Embedding::Host { table } => {
                let ids = ids.as_dtype(Dtype::Uint32).ctx("embedding ids")?;
                mlx_rs::transforms::eval([&ids]).ctx("embedding ids")?;
                let ids = ids
                    .try_as_slice::<u32>()
                    .map_err(|e| Error::HostKernel(format!("reading token ids: {e}")))?;
                let hidden = table.cols();
                let mut rows = vec![0.0f32; ids.len() * hidden];
                for (&id, row) in ids.iter().zip(rows.chunks_exact_mut(hidden.max(1))) {
                    let id = id as usize;
                    table
                        .dequantize_rows(id..id + 1, row)
                        .map_err(|e| Error::HostKernel(e.to_string()))?;
                }
                let shape = [ids.len(), hidden].map(|d| i32::try_from(d).unwrap_or(i32::MAX));
                Ok(Array::from_slice(&rows, &shape))
            }
            Embedding::Dense { table_t } => table_t
                .take_axis(ids, 1)
                .ctx("embedding lookup")?
                .t()
                .contiguous()
                .ctx("embedding lookup"),
            Embedding::Quantized {
                w,
                scales,
                biases,
                group_size,
                bits,
            } => {
                let w = w.take_axis(ids, 0).ctx("embedding lookup")?;
                let s = scales.take_axis(ids, 0).ctx("embedding lookup")?;
                let b = biases.take_axis(ids, 0).ctx("embedding lookup")?;
                ops::dequantize(&w, &s, &b, *group_size, *bits).ctx("embedding dequantize")
            }
        }
    }

    /// Tied LM head: `x tableᵀ`.
    pub fn as_head(&self, x: &Array) -> Result<Array> {
        match self {
            Embedding::Host { .. } => Err(Error::HostKernel(
                "the tied head of a host table runs on its host weights".into(),
            )),
            Embedding::Dense { table_t, .. } => x.matmul(table_t).ctx("lm head"),
            Embedding::Quantized {
                w,
                scales,
                biases,
                group_size,
                bits,
            } => ops::quantized_matmul(x, w, scales, biases, true, *group_size, *bits)
                .ctx("lm head (quantized)"),
        }
    }

    /// The arrays held.
    pub fn arrays(&self) -> Vec<&Array> {
        match self {
            Embedding::Host { .. } => Vec::new(),
            Embedding::Dense { table_t } => vec![table_t],
            Embedding::Quantized {
                w, scales, biases, ..
            } => vec![w, scales, biases],
        }
    }
}

/// Takes a 1-D norm weight as f32.
pub fn norm_weight(map: &mut TensorMap, name: &str, dim: usize) -> Result<Array> {
    norm_weight_offset(map, name, dim, 0.0)
}

/// [`norm_weight`] plus `offset` (1 for Gemma checkpoints that store `w - 1`).
pub fn norm_weight_offset(
    map: &mut TensorMap,
    name: &str,
    dim: usize,
    offset: f32,
) -> Result<Array> {
    let t = map.take(name)?;
    map.check_shape(name, &t, &[dim as i64])?;
    let w = t.to_f32()?;
    if offset == 0.0 {
        return Ok(w);
    }
    w.add(Array::from_f32(offset)).map_err(|e| Error::Mlx {
        context: format!("offsetting {name}"),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A random MLX-affine quantized `[out, inp]` matrix.
    fn quantized(out: usize, inp: usize, bits: i32, group: i32, seed: u64) -> RawTensor {
        let mut x = seed | 1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let per_word = 32 / bits as usize;
        let words: Vec<u32> = (0..out * inp / per_word).map(|_| next() as u32).collect();
        let groups = out * inp / group as usize;
        let mut float = |scale: f32| -> f32 { ((next() % 20_001) as f32 / 10_000.0 - 1.0) * scale };
        let scales: Vec<f32> = (0..groups).map(|_| float(0.05)).collect();
        let biases: Vec<f32> = (0..groups).map(|_| float(0.5)).collect();
        let (o, i) = (out as i32, inp as i32);
        RawTensor::Quantized {
            w: Array::from_slice(&words, &[o, i / per_word as i32]),
            scales: Array::from_slice(&scales, &[o, i / group]),
            biases: Array::from_slice(&biases, &[o, i / group]),
            group_size: group,
            bits,
        }
    }

    fn bits_of(a: &Array) -> Vec<u32> {
        a.try_as_slice::<f32>()
            .map(|s| s.iter().map(|v| v.to_bits()).collect())
            .unwrap_or_default()
    }

    fn values(t: &RawTensor) -> Result<Vec<u32>> {
        Ok(bits_of(&t.to_f32()?.contiguous().ctx("contiguous")?))
    }

    /// The row pieces of a fused tensor hold exactly its rows, whatever its form: dense,
    /// MLX affine, GGUF blocks (Q8_0: 34 bytes a block of 32).
    #[test]
    fn split_rows_keeps_every_row() -> Result<()> {
        let data: Vec<f32> = (0..7 * 32).map(|x| (x as f32 * 0.37).sin()).collect();
        let dense = RawTensor::Dense(Array::from_slice(&data, &[7, 32]));
        let mut bytes = Vec::new();
        for r in 0..7u8 {
            bytes.extend_from_slice(&half::f16::from_f32(0.5 + f32::from(r)).to_le_bytes());
            bytes.extend((0..32).map(|c| (c as i8 - 16 + r as i8) as u8));
        }
        let blocks = RawTensor::Matrix(Arc::new(
            QuantMatrix::new(QuantType::Q8_0, 7, 32, bytes)
                .map_err(|e| Error::HostKernel(e.to_string()))?,
        ));
        for t in [dense, blocks, quantized(7, 64, 4, 32, 9)] {
            let all = values(&t)?;
            let cols = all.len() / 7;
            let pieces = t.split_rows(&[4, 2, 1])?;
            let mut joined = Vec::new();
            for (p, rows) in pieces.iter().zip([4i64, 2, 1]) {
                assert_eq!(p.logical_shape(), vec![rows, cols as i64]);
                joined.extend(values(p)?);
            }
            assert_eq!(joined, all);
            assert!(t.split_rows(&[4, 2]).is_err());
        }
        // A bias: one axis.
        let bias = RawTensor::Dense(Array::from_slice(&[1.0f32, 2.0, 3.0], &[3]));
        let pieces = bias.split_rows(&[1, 2])?;
        assert_eq!(
            values(&pieces[1])?,
            bits_of(&Array::from_slice(&[2.0f32, 3.0], &[2]))
        );
        Ok(())
    }

    #[test]
    fn host_dequantize_gives_mlx_bits_transposed() -> Result<()> {
        for (bits, group) in [(4, 32), (4, 64), (8, 32)] {
            // Three parts of different heights stacked (a fused q/k/v), odd row counts.
            let parts = vec![
                quantized(48, 128, bits, group, 1),
                quantized(16, 128, bits, group, 2),
                quantized(37, 128, bits, group, 3),
            ];
            let host = dequantize_transposed(&parts)?
                .ok_or_else(|| Error::HostKernel("not taken".into()))?;
            let mut dense = Vec::new();
            for p in &parts {
                dense.push(p.to_f32()?);
            }
            let mlx = ops::concatenate(&dense, 0)
                .ctx("concat")?
                .t()
                .contiguous()
                .ctx("transpose")?;
            assert_eq!(host.shape(), mlx.shape());
            let expected = bits_of(&mlx);
            assert_eq!(bits_of(&host), expected, "{bits}-bit, groups of {group}");
            assert!(!expected.is_empty());
            // The decode kernel's packing holds the same weights (rows split across threads).
            let packed = HostLinear::from_raw(&parts, None)?
                .ok_or_else(|| Error::HostKernel("not packed".into()))?;
            let [HostMatrix::Packed(m)] = packed.parts() else {
                panic!("MLX-affine parts are packed into one matrix");
            };
            let total = m.out_features();
            for i in 0..m.in_features() {
                for o in 0..total {
                    assert_eq!(
                        m.weight(o, i).to_bits(),
                        expected[i * total + o],
                        "({o}, {i})"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn host_dequantize_declines_what_it_cannot_read() -> Result<()> {
        let dense = RawTensor::Dense(Array::from_slice(&[1.0f32; 64], &[2, 32]));
        assert!(dequantize_transposed(&[dense])?.is_none());
        // Different input sizes cannot be stacked.
        let parts = vec![quantized(8, 64, 4, 32, 4), quantized(8, 128, 4, 32, 5)];
        assert!(dequantize_transposed(&parts)?.is_none());
        assert!(dequantize_transposed(&[])?.is_none());
        Ok(())
    }
}
