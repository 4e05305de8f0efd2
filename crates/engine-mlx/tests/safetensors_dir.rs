//! Hugging Face / MLX safetensors directories: the tiny GGUF model re-exported in HF layout
//! (Q/K rows un-permuted, non-interleaved RoPE) gives the same logits; an MLX 4-bit export
//! loads in both weight formats.

mod common;

use agent_session::{ChatFormatter, InferenceEngine};
use common::block_on;
use common::tiny::{self, Variant, HEADS, KV_HEADS};
use engine_mlx::gguf::GgufHeader;
use engine_mlx::{EngineConfig, MlxEngine, WeightFormat};
use mlx_rs::{ops, Array};
use std::collections::HashMap;
use std::path::Path;

fn hf_name(gguf: &str) -> String {
    let map = [
        ("attn_norm", "input_layernorm"),
        ("ffn_norm", "post_attention_layernorm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
    ];
    match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        _ => {
            let rest = gguf.strip_prefix("blk.").expect("layer tensor");
            let (layer, part) = rest.split_once('.').expect("layer.part");
            let (stem, suffix) = part.rsplit_once('.').expect("suffix");
            let hf = map.iter().find(|(g, _)| *g == stem).expect("known").1;
            format!("model.layers.{layer}.{hf}.{suffix}")
        }
    }
}

/// HF row order from llama.cpp's permuted Q/K rows: hf[h·d + j·d/2 + i] = gguf[h·d + 2i + j].
fn unpermute(rows: &[f32], n_rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = n_rows / heads;
    let mut out = vec![0f32; rows.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let src = h * hd + 2 * i + j;
                let dst = h * hd + j * hd / 2 + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&rows[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Writes the tiny model as an HF directory; `quantize`: MLX 4-bit, group 64 linears.
fn write_hf_dir(gguf: &Path, dir: &Path, quantize: bool) {
    let header = GgufHeader::read(gguf).expect("header");
    let mut map = engine_mlx::weights::load_gguf(&header).expect("tensors");
    let mut arrays: Vec<(String, Array)> = Vec::new();
    for info in &header.tensors {
        let t = map.take(&info.name).expect("tensor");
        let mut a = t.to_f32().expect("f32");
        let shape: Vec<i32> = a.shape().to_vec();
        let heads = if info.name.ends_with("attn_q.weight") {
            Some(HEADS as usize)
        } else if info.name.ends_with("attn_k.weight") {
            Some(KV_HEADS as usize)
        } else {
            None
        };
        if let Some(h) = heads {
            let v = a.to_vec_exact::<f32>().expect("vec");
            let u = unpermute(&v, shape[0] as usize, shape[1] as usize, h);
            a = Array::from_slice(&u, &shape);
        }
        let name = hf_name(&info.name);
        if quantize && shape.len() == 2 && name.contains("layers") {
            let (w, s, b) = ops::quantize(&a, 64, 4).expect("quantize");
            let stem = name.strip_suffix(".weight").expect("weight");
            arrays.push((name.clone(), w));
            arrays.push((format!("{stem}.scales"), s));
            arrays.push((format!("{stem}.biases"), b));
        } else {
            arrays.push((name, a));
        }
    }
    // Two shards, as large models have.
    let half = arrays.len() / 2;
    for (i, part) in [&arrays[..half], &arrays[half..]].iter().enumerate() {
        let md: HashMap<String, String> = HashMap::new();
        Array::save_safetensors(
            part.iter().map(|(n, a)| (n.as_str(), a)),
            &md,
            dir.join(format!("model-0000{}-of-00002.safetensors", i + 1)),
        )
        .expect("save");
    }
    let mut config = serde_json::json!({
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
        "vocab_size": 259, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "max_position_embeddings": 512
    });
    if quantize {
        config["quantization"] = serde_json::json!({"group_size": 64, "bits": 4});
    }
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
    let (_, fmt) =
        MlxEngine::load(gguf.to_str().expect("utf-8"), EngineConfig::default()).expect("load gguf");
    std::fs::write(
        dir.join("tokenizer.json"),
        fmt.tokenizer().to_string(false).expect("serialize"),
    )
    .expect("tokenizer");
    let tc = serde_json::json!({
        "chat_template": fmt.template_source(),
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>"},
    });
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).expect("tokenizer_config");
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": [258, 256]}"#,
    )
    .expect("generation_config");
}

fn logits(model: &Path, format: WeightFormat, tokens: &[u32]) -> Vec<f32> {
    let config = EngineConfig {
        block_tokens: 64,
        weight_format: format,
        ..EngineConfig::default()
    };
    let (engine, _) = MlxEngine::load(model.to_str().expect("utf-8"), config).expect("load");
    block_on(async {
        let seq = engine.open_sequence().await.expect("open");
        engine.prefill(seq, tokens.to_vec()).await.expect("prefill");
        engine.debug_logits(seq).await.expect("logits")
    })
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    common::max_abs_diff(a, b)
}

#[test]
fn hf_layout_matches_gguf_layout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let gguf = tmp.path().join("tiny.gguf");
    tiny::write(&gguf, Variant::default());
    let dir = tmp.path().join("hf");
    std::fs::create_dir(&dir).expect("mkdir");
    write_hf_dir(&gguf, &dir, false);

    let tokens: Vec<u32> = (0..40).map(|i| (i * 11 % 256) as u32).collect();
    let a = logits(&gguf, WeightFormat::F32, &tokens);
    let b = logits(&dir, WeightFormat::F32, &tokens);
    let d = max_diff(&a, &b);
    assert!(
        d < 1e-4,
        "GGUF (permuted, traditional RoPE) vs HF layout differ by {d}"
    );

    let (engine, fmt) =
        MlxEngine::load(dir.to_str().expect("utf-8"), EngineConfig::default()).expect("load dir");
    assert_eq!(engine.model().id, "hf");
    assert_eq!(fmt.stop_token_ids(), vec![256, 258]);
    assert_eq!(fmt.encode("<|im_start|>x").expect("encode"), vec![257, 87]);
}

#[test]
fn mlx_quantized_dir_loads_in_both_formats() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let gguf = tmp.path().join("tiny.gguf");
    tiny::write(&gguf, Variant::default());
    let dir = tmp.path().join("q4");
    std::fs::create_dir(&dir).expect("mkdir");
    write_hf_dir(&gguf, &dir, true);
    let tokens: Vec<u32> = (0..25).map(|i| (i * 5 % 256) as u32).collect();
    let f = logits(&dir, WeightFormat::F32, &tokens);
    let q = logits(&dir, WeightFormat::Quantized, &tokens);
    let d = max_diff(&f, &q);
    assert!(d < 1e-3, "dequantized vs quantized_matmul differ by {d}");
    // 4-bit weights stay close to the float model.
    let full = logits(&gguf, WeightFormat::F32, &tokens);
    assert!(max_diff(&full, &f) < 1.0);

    // A corrupt shard is a typed error.
    let shard = dir.join("model-00001-of-00002.safetensors");
    let bytes = std::fs::read(&shard).expect("read");
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).expect("truncate");
    let e = MlxEngine::load(dir.to_str().expect("utf-8"), EngineConfig::default())
        .expect_err("corrupt shard is rejected");
    assert!(matches!(e, engine_mlx::Error::Truncated { .. }), "{e}");
}
