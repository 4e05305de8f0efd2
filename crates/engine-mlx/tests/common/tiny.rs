//! A tiny random-weight llama GGUF (2 layers, hidden 64, byte-level vocabulary), written with
//! the crate's test writer, for loader and bad-file tests that need no real model.

use engine_mlx::gguf::{write_gguf, GgufValue};
use std::path::Path;

pub const HIDDEN: u64 = 64;
pub const INTER: u64 = 128;
pub const HEADS: u64 = 4;
pub const KV_HEADS: u64 = 2;
pub const LAYERS: u64 = 2;

/// Deterministic pseudo-random values in [-scale, scale).
pub fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// GGML element types used by the tiny model's linear weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    F32,
    Q4_0,
    Q4_1,
    Q8_0,
    /// Any supported type: random blocks with sane scales ([`random_blocks`]).
    Any(gguf_quants::QuantType),
}

impl Quant {
    pub fn id(self) -> u32 {
        match self {
            Quant::F32 => 0,
            Quant::Q4_0 => 2,
            Quant::Q4_1 => 3,
            Quant::Q8_0 => 8,
            Quant::Any(t) => t.id(),
        }
    }
}

/// Random blocks of `ty` holding `n` elements, with every scale field set to a small finite
/// value (random bytes there would give infinities and NaNs), and their values dequantized
/// by `gguf-quants` (whose bits the crate's own tests check against gguf-py).
pub fn random_blocks(ty: gguf_quants::QuantType, n: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
    use gguf_quants::QuantType as T;
    let traits = ty.traits().expect("a supported type");
    let blocks = n / traits.block_elems;
    let raw = values(seed, blocks * traits.block_bytes, 1.0);
    let mut bytes: Vec<u8> = raw.iter().map(|v| ((v + 1.0) * 127.9) as u8).collect();
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
    for (b, block) in bytes.chunks_exact_mut(traits.block_bytes).enumerate() {
        let d = 0.004 + 0.002 * (b % 3) as f32;
        let mut put = |at: usize, v: f32| block[at..at + 2].copy_from_slice(&f16(v));
        match ty {
            T::F32 | T::F16 | T::Bf16 => {}
            T::Q4_0 | T::Q5_0 | T::Q8_0 | T::Iq4Nl => put(0, d * 4.0),
            T::Q4_1 | T::Q5_1 => {
                put(0, d * 4.0);
                put(2, -0.05);
            }
            T::Q2K => {
                put(80, d);
                put(82, d / 2.0);
            }
            T::Q3K => put(108, d),
            T::Q4K | T::Q5K => {
                put(0, d);
                put(2, d / 2.0);
            }
            T::Q6K => put(208, d / 4.0),
            T::Iq4Xs => put(0, d),
            T::Q8K => block[..4].copy_from_slice(&(d / 8.0).to_le_bytes()),
            other => panic!("no scale layout for {}", other.name()),
        }
    }
    if matches!(ty, T::F32 | T::F16 | T::Bf16) {
        let v = values(seed, n, 0.15);
        bytes = match ty {
            T::F32 => f32_bytes(&v),
            T::F16 => v
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            _ => v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
        };
    }
    let mut deq = vec![0.0f32; n];
    (traits.dequantize)(&bytes, &mut deq);
    (bytes, deq)
}

/// Random bytes of a quantized tensor with `n` elements (blocks of 32) plus its
/// dequantized values computed here in Rust (the reference for MLX's loader).
pub fn quantized(seed: u64, n: usize, q: Quant) -> (Vec<u8>, Vec<f32>) {
    let raw = values(seed, n * 2, 1.0);
    let mut bytes = Vec::new();
    let mut deq = Vec::new();
    let byte = |i: usize| ((raw[i] + 1.0) * 127.9) as u8;
    for b in 0..n / 32 {
        let d = half::f16::from_f32(0.01 + 0.005 * (b % 3) as f32);
        let m = half::f16::from_f32(-0.05 + 0.01 * (b % 5) as f32);
        match q {
            Quant::F32 | Quant::Any(_) => unreachable!("not a legacy block type"),
            Quant::Q8_0 => {
                bytes.extend_from_slice(&d.to_le_bytes());
                for j in 0..32 {
                    let v = byte(b * 32 + j) as i8;
                    bytes.push(v as u8);
                    deq.push(f32::from(v) * d.to_f32());
                }
            }
            Quant::Q4_0 | Quant::Q4_1 => {
                bytes.extend_from_slice(&d.to_le_bytes());
                if q == Quant::Q4_1 {
                    bytes.extend_from_slice(&m.to_le_bytes());
                }
                let qs: Vec<u8> = (0..16).map(|j| byte(b * 32 + j)).collect();
                bytes.extend_from_slice(&qs);
                let mut block = [0f32; 32];
                for j in 0..16 {
                    let (lo, hi) = (f32::from(qs[j] & 0xF), f32::from(qs[j] >> 4));
                    if q == Quant::Q4_0 {
                        block[j] = (lo - 8.0) * d.to_f32();
                        block[j + 16] = (hi - 8.0) * d.to_f32();
                    } else {
                        block[j] = lo * d.to_f32() + m.to_f32();
                        block[j + 16] = hi * d.to_f32() + m.to_f32();
                    }
                }
                deq.extend_from_slice(&block);
            }
        }
    }
    (bytes, deq)
}

/// Byte-level BPE vocabulary: the 256 byte symbols, then three ChatML control tokens.
pub fn vocab() -> Vec<String> {
    let mut chars: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    chars.sort_unstable();
    let mut v: Vec<String> = chars.into_iter().map(String::from).collect();
    v.extend(["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from));
    v
}

/// What to break in the written file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Variant {
    /// Element type of the linear weights.
    pub linear: Option<Quant>,
    /// Leave out `blk.1.ffn_down.weight`.
    pub drop_tensor: bool,
    /// Store `blk.0.attn_v.weight` as Q8_1 (ggml type 9, a type this engine does not load).
    pub unknown_type: bool,
    /// Architecture name (default `llama`).
    pub arch_gpt2: bool,
    /// Hidden size 256 and MLP width 512 (rows long enough for 256-element K-quant blocks).
    pub wide: bool,
    /// The token embedding in the linear weights' type too, tied as the LM head.
    pub quantized_embedding: bool,
    /// A last, unused F32 tensor of 256 GiB whose data is not written: the file must then be
    /// extended (sparse) to the tensor table's end to pass the size check.
    pub huge_tensor: bool,
}

/// Writes the tiny model; returns the Rust-dequantized values of `blk.0.attn_q.weight`.
pub fn write(path: &Path, variant: Variant) -> Vec<f32> {
    let vocab = vocab();
    let n_vocab = vocab.len() as u64;
    let mut types = vec![GgufValue::Int(1); 256];
    types.extend([GgufValue::Int(3), GgufValue::Int(3), GgufValue::Int(3)]);
    let arch = if variant.arch_gpt2 { "gpt2" } else { "llama" };
    let k = |s: &str| format!("{arch}.{s}");
    let (hidden, inter) = if variant.wide {
        (256, 512)
    } else {
        (HIDDEN, INTER)
    };
    let keys: Vec<(String, GgufValue)> = vec![
        ("general.architecture".into(), GgufValue::String(arch.into())),
        ("general.name".into(), GgufValue::String("tiny".into())),
        (k("block_count"), GgufValue::UInt(LAYERS)),
        (k("context_length"), GgufValue::UInt(512)),
        (k("embedding_length"), GgufValue::UInt(hidden)),
        (k("feed_forward_length"), GgufValue::UInt(inter)),
        (k("attention.head_count"), GgufValue::UInt(HEADS)),
        (k("attention.head_count_kv"), GgufValue::UInt(KV_HEADS)),
        (k("rope.freq_base"), GgufValue::Float(10000.0)),
        (k("attention.layer_norm_rms_epsilon"), GgufValue::Float(1e-5)),
        ("tokenizer.ggml.model".into(), GgufValue::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), GgufValue::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(vocab.iter().cloned().map(GgufValue::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), GgufValue::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            GgufValue::Array(Vec::new()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), GgufValue::UInt(n_vocab - 2)),
        ("tokenizer.ggml.eos_token_id".into(), GgufValue::UInt(n_vocab - 1)),
        (
            "tokenizer.chat_template".into(),
            GgufValue::String(
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into(),
            ),
        ),
    ];
    let meta: Vec<(&str, GgufValue)> = keys.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();

    let hd = hidden / HEADS;
    let mut tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)> = Vec::new();
    let mut seed = 1u64;
    let mut dense = |name: String, shape: Vec<u64>, scale: f32, tensors: &mut Vec<_>| {
        seed += 1;
        let n: u64 = shape.iter().product();
        tensors.push((
            name,
            shape,
            0u32,
            f32_bytes(&values(seed, n as usize, scale)),
        ));
    };
    match variant.linear {
        Some(Quant::Any(ty)) if variant.quantized_embedding => {
            let (bytes, _) = random_blocks(ty, (n_vocab * hidden) as usize, 99);
            tensors.push((
                "token_embd.weight".into(),
                vec![n_vocab, hidden],
                ty.id(),
                bytes,
            ));
        }
        _ => dense(
            "token_embd.weight".into(),
            vec![n_vocab, hidden],
            1.0,
            &mut tensors,
        ),
    }
    let mut ones = vec![1.0f32; hidden as usize];
    ones[0] = 1.5;
    tensors.push((
        "output_norm.weight".into(),
        vec![hidden],
        0,
        f32_bytes(&ones),
    ));
    let mut attn_q_ref = Vec::new();
    for l in 0..LAYERS {
        let p = |s: &str| format!("blk.{l}.{s}");
        tensors.push((p("attn_norm.weight"), vec![hidden], 0, f32_bytes(&ones)));
        tensors.push((p("ffn_norm.weight"), vec![hidden], 0, f32_bytes(&ones)));
        let linears = [
            ("attn_q.weight", vec![HEADS * hd, hidden]),
            ("attn_k.weight", vec![KV_HEADS * hd, hidden]),
            ("attn_v.weight", vec![KV_HEADS * hd, hidden]),
            ("attn_output.weight", vec![hidden, HEADS * hd]),
            ("ffn_gate.weight", vec![inter, hidden]),
            ("ffn_up.weight", vec![inter, hidden]),
            ("ffn_down.weight", vec![hidden, inter]),
        ];
        for (i, (name, shape)) in linears.into_iter().enumerate() {
            if variant.drop_tensor && l == 1 && name == "ffn_down.weight" {
                continue;
            }
            let n: u64 = shape.iter().product();
            let q = variant.linear.unwrap_or(Quant::F32);
            let s = 100 * l + i as u64;
            let (ty, bytes, deq) = if variant.unknown_type && l == 0 && name == "attn_v.weight" {
                (9u32, vec![0u8; (n / 32 * 36) as usize], vec![])
            } else if q == Quant::F32 {
                let v = values(s, n as usize, 0.15);
                (0u32, f32_bytes(&v), v)
            } else if let Quant::Any(ty) = q {
                let (b, d) = random_blocks(ty, n as usize, s + 1);
                (ty.id(), b, d)
            } else {
                let (b, d) = quantized(s, n as usize, q);
                (q.id(), b, d)
            };
            if l == 0 && name == "attn_q.weight" {
                attn_q_ref = deq;
            }
            tensors.push((p(name), shape, ty, bytes));
        }
    }
    if variant.huge_tensor {
        tensors.push(("huge.weight".into(), vec![1 << 21, 1 << 15], 0, Vec::new()));
    }
    let refs: Vec<(&str, Vec<u64>, u32, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, t, b)| (n.as_str(), s.clone(), *t, b.clone()))
        .collect();
    write_gguf(path, &meta, &refs).expect("write tiny gguf");
    attn_q_ref
}
