//! Loading model files: a tiny written GGUF in every supported tensor type (dequantization
//! checked against a Rust reference), and bad files giving typed errors, never a panic.

mod common;

use agent_session::{ChatFormatter, Conversation, InferenceEngine, Message, Role, SamplingParams};
use common::block_on;
use common::tiny::{self, Quant, Variant};
use engine_mlx::gguf::GgufHeader;
use engine_mlx::{EngineConfig, Error, MlxEngine, WeightFormat};
use std::path::Path;
use std::sync::Arc;

fn load(
    path: &Path,
    format: WeightFormat,
) -> Result<(MlxEngine, Arc<engine_mlx::MlxChatFormatter>), Error> {
    let config = EngineConfig {
        block_tokens: 64,
        weight_format: format,
        ..EngineConfig::default()
    };
    MlxEngine::load(path.to_str().expect("utf-8 path"), config)
}

fn last_logits(engine: &MlxEngine, tokens: Vec<u32>) -> Vec<f32> {
    block_on(async {
        let seq = engine.open_sequence().await.expect("open");
        engine.prefill(seq, tokens).await.expect("prefill");
        let l = engine.debug_logits(seq).await.expect("logits");
        engine.release(seq).await.expect("release");
        l
    })
}

#[test]
fn tiny_gguf_loads_renders_and_generates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tiny.gguf");
    tiny::write(&path, Variant::default());
    let (engine, fmt) = load(&path, WeightFormat::F32).expect("load");
    let m = engine.model();
    assert_eq!(m.id, "tiny");
    assert_eq!(m.architecture, "llama");
    assert_eq!(m.vocab_size, 259);
    assert_eq!(m.context_length, 512);
    assert_eq!(m.spec.num_layers(), 2);
    assert_eq!(m.spec.block_tokens(), 64);
    assert_eq!(m.fingerprint.len(), 64);

    let conv = Conversation {
        messages: vec![Message::text(Role::User, "hi")],
        tools: vec![],
    };
    let text = fmt.render(&conv, true).expect("render");
    assert_eq!(
        text,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = fmt.encode(&text).expect("encode");
    assert_eq!(ids[0], 257, "special token recognised");
    assert_eq!(fmt.decode(&ids).expect("decode"), "user\nhi\nassistant\n");
    assert_eq!(fmt.stop_token_ids(), vec![256, 258]);

    block_on(async {
        let seq = engine.open_sequence().await.expect("open");
        engine.prefill(seq, ids.clone()).await.expect("prefill");
        let params = Arc::new(SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            top_k: 20,
            min_p: 0.01,
            seed: Some(7),
            repetition_penalty: 1.1,
            presence_penalty: 0.1,
            frequency_penalty: 0.1,
        });
        let out = common::sample_continue(&engine, seq, params, 5, &[]).await;
        assert!(out.iter().all(|&t| (t as usize) < 259));
        assert_eq!(engine.sequence_len(seq).await.expect("len"), ids.len() + 4);
    });
}

#[test]
fn gguf_quant_types_dequantize_exactly_and_run_quantized() {
    for q in [Quant::Q4_0, Quant::Q4_1, Quant::Q8_0] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tiny.gguf");
        let reference = tiny::write(
            &path,
            Variant {
                linear: Some(q),
                ..Variant::default()
            },
        );
        // MLX's GGUF loader (quantized triple) dequantized in f32 equals the Rust reference.
        let header = GgufHeader::read(&path).expect("header");
        let mut map = engine_mlx::weights::load_gguf(&header).expect("load tensors");
        let t = map.take("blk.0.attn_q.weight").expect("attn_q");
        let got = t.to_f32().expect("f32").to_vec_exact::<f32>().expect("vec");
        assert_eq!(got.len(), reference.len());
        let err = common::max_abs_diff(&got, &reference);
        assert!(err < 1e-6, "{q:?}: max error {err}");

        // quantized_matmul path ≈ dequantized f32 path.
        let tokens: Vec<u32> = (0..20).map(|i| (i * 13 % 256) as u32).collect();
        let (f, _) = load(&path, WeightFormat::F32).expect("load f32");
        let (qe, _) = load(&path, WeightFormat::Quantized).expect("load quantized");
        assert!(
            qe.model().weight_format.starts_with("quantized"),
            "{}",
            qe.model().weight_format
        );
        assert_ne!(f.model().fingerprint, qe.model().fingerprint);
        let a = last_logits(&f, tokens.clone());
        let b = last_logits(&qe, tokens);
        let d = common::max_abs_diff(&a, &b);
        assert!(d < 1e-3, "{q:?}: quantized vs f32 logits differ by {d}");
        // The file's blocks on the host ≈ the f32 path.
        let (h, _) = load(&path, WeightFormat::Host).expect("load host");
        let c = last_logits(&h, (0..20).map(|i| (i * 13 % 256) as u32).collect());
        let d = common::max_abs_diff(&a, &c);
        assert!(d < 1e-4, "{q:?}: host blocks vs f32 logits differ by {d}");
    }
}

#[test]
fn a_model_too_large_for_ram_is_refused_before_loading() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("huge.gguf");
    tiny::write(
        &path,
        Variant {
            huge_tensor: true,
            ..Variant::default()
        },
    );
    // Truncated as written: reported first, with the memory problem after it; inspect
    // (which reports memory instead of refusing) says truncated.
    match expect_err(&path) {
        Error::Problems { problems, .. } => {
            assert_eq!(problems.len(), 2, "{problems:?}");
            assert!(matches!(problems[0], Error::Truncated { .. }));
            assert!(problems[0].to_string().contains("truncated download"));
            assert!(matches!(problems[1], Error::OutOfMemory { .. }));
        }
        other => panic!("expected truncation and memory, got {other}"),
    }
    let e = engine_mlx::inspect_report(path.to_str().expect("utf-8"), &EngineConfig::default())
        .expect_err("inspect of a truncated file");
    assert!(matches!(e, Error::Truncated { .. }), "{e}");

    // Extended to its full (sparse) size: 256 GiB of weights do not fit this machine.
    let header = GgufHeader::read(&path).expect("header");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(header.data_end))
        .expect("extend");
    let started = std::time::Instant::now();
    match expect_err(&path) {
        Error::OutOfMemory {
            needed_mib,
            available_mib,
            ..
        } => assert!(needed_mib > available_mib && needed_mib >= 256 << 10),
        other => panic!("expected an out-of-memory refusal, got {other}"),
    }
    // Refused from the header alone (reading 256 GiB would take minutes).
    assert!(started.elapsed().as_secs() < 30);
    let (_, report) =
        engine_mlx::inspect_report(path.to_str().expect("utf-8"), &EngineConfig::default())
            .expect("inspect reports a model too large instead of failing");
    let report = report.expect("a GGUF report");
    assert_eq!(report.fits(), Some(false));
    assert!(report.types.contains("× F32"), "{}", report.types);
}

#[test]
fn unfused_projections_match_fused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tiny.gguf");
    tiny::write(&path, Variant::default());
    let tokens: Vec<u32> = (0..30).map(|i| (i * 7 % 256) as u32).collect();
    let (fused, _) = load(&path, WeightFormat::F32).expect("load");
    let config = EngineConfig {
        block_tokens: 64,
        fuse_projections: false,
        ..EngineConfig::default()
    };
    let (split, _) = MlxEngine::load(path.to_str().expect("utf-8"), config).expect("load");
    let a = last_logits(&fused, tokens.clone());
    let b = last_logits(&split, tokens);
    let d = common::max_abs_diff(&a, &b);
    assert!(d < 1e-4, "fused vs split differ by {d}");
}

fn expect_err(path: &Path) -> Error {
    match load(path, WeightFormat::F32) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e,
    }
}

#[test]
fn bad_model_files_give_typed_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.gguf");
    tiny::write(&good, Variant::default());
    let bytes = std::fs::read(&good).expect("read");
    let header = GgufHeader::read(&good).expect("header");

    // Wrong magic.
    let p = dir.path().join("magic.gguf");
    let mut b = bytes.clone();
    b[..4].copy_from_slice(b"GGML");
    std::fs::write(&p, &b).expect("write");
    let e = expect_err(&p);
    assert!(matches!(e, Error::BadMagic { .. }), "{e}");
    assert!(
        e.to_string().contains("magic.gguf"),
        "error names the file: {e}"
    );

    // Unsupported version.
    let p = dir.path().join("version.gguf");
    let mut b = bytes.clone();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&p, &b).expect("write");
    assert!(matches!(
        expect_err(&p),
        Error::UnsupportedVersion { version: 1, .. }
    ));

    // Truncated: empty, inside the header, inside the metadata, inside the tensor table,
    // inside the tensor data.
    for cut in [
        0usize,
        6,
        40,
        3000,
        header.data_offset as usize - 8,
        bytes.len() - 100,
    ] {
        let p = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&p, &bytes[..cut]).expect("write");
        let e = expect_err(&p);
        assert!(matches!(e, Error::Truncated { .. }), "cut at {cut}: {e}");
    }

    // Missing tensor.
    let p = dir.path().join("missing.gguf");
    tiny::write(
        &p,
        Variant {
            drop_tensor: true,
            ..Variant::default()
        },
    );
    let e = expect_err(&p);
    assert!(
        matches!(&e, Error::MissingTensor { tensor, .. } if tensor == "blk.1.ffn_down.weight"),
        "{e}"
    );

    // Unknown quantization type.
    let p = dir.path().join("qtype.gguf");
    tiny::write(
        &p,
        Variant {
            unknown_type: true,
            ..Variant::default()
        },
    );
    let e = expect_err(&p);
    assert!(
        matches!(&e, Error::UnsupportedTensorTypes { example, found, .. }
            if example == "blk.0.attn_v.weight" && found == "1 × Q8_1"),
        "{e}"
    );
    // The message names the type properly and gives the file's whole histogram.
    let text = e.to_string();
    assert!(
        text.contains("1 × Q8_1") && text.contains("× F32"),
        "{text}"
    );
    assert!(
        text.contains("Q4_K") && text.contains("IQ4_NL"),
        "supported list: {text}"
    );

    // Every problem at once, in check order: architecture before tensor types.
    let p = dir.path().join("both.gguf");
    tiny::write(
        &p,
        Variant {
            unknown_type: true,
            arch_gpt2: true,
            ..Variant::default()
        },
    );
    match expect_err(&p) {
        Error::Problems { problems, .. } => {
            assert_eq!(problems.len(), 2, "{problems:?}");
            assert!(matches!(problems[0], Error::UnsupportedArchitecture { .. }));
            assert!(matches!(problems[1], Error::UnsupportedTensorTypes { .. }));
        }
        other => panic!("expected both problems, got {other}"),
    }

    // Unsupported architecture lists the supported ones.
    let p = dir.path().join("arch.gguf");
    tiny::write(
        &p,
        Variant {
            arch_gpt2: true,
            ..Variant::default()
        },
    );
    let e = expect_err(&p);
    assert!(matches!(e, Error::UnsupportedArchitecture { .. }), "{e}");
    assert!(
        e.to_string().contains("llama, mistral, qwen2, qwen3"),
        "{e}"
    );

    // Garbage and missing paths.
    let p = dir.path().join("garbage.gguf");
    std::fs::write(&p, vec![0xAB; 4096]).expect("write");
    assert!(matches!(expect_err(&p), Error::BadMagic { .. }));
    let e = expect_err(&dir.path().join("nope.gguf"));
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
}

#[test]
fn unknown_hub_id_is_a_clear_error() {
    let cache = tempfile::tempdir().expect("tempdir");
    let config = EngineConfig {
        hf_cache_dir: Some(cache.path().to_path_buf()),
        ..EngineConfig::default()
    };
    let e =
        MlxEngine::load("semantic-tests/no-such-model-7f3a", config).expect_err("no such model");
    eprintln!("{e}");
    assert!(matches!(e, Error::Hub { .. }), "{e}");
    assert!(
        e.to_string().contains("semantic-tests/no-such-model-7f3a"),
        "{e}"
    );
}

#[test]
fn inspect_and_fingerprint_binding() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("tiny.gguf");
    tiny::write(&a, Variant::default());
    let b = dir.path().join("tiny-copy.gguf");
    std::fs::copy(&a, &b).expect("copy");
    let path = |p: &Path| p.to_str().expect("utf-8").to_owned();

    let bound = EngineConfig::default();
    let info = engine_mlx::inspect(&path(&a), &bound).expect("inspect");
    let (engine, _) = MlxEngine::load(&path(&a), bound.clone()).expect("load");
    assert_eq!(info.fingerprint, engine.model().fingerprint);
    assert_eq!(info.spec, engine.model().spec);
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.context_length, 512);

    let other = engine_mlx::inspect(&path(&b), &bound).expect("inspect copy");
    assert_ne!(info.fingerprint, other.fingerprint, "bound to the file");
    let loose = EngineConfig {
        bind_to_weights: false,
        ..EngineConfig::default()
    };
    let la = engine_mlx::inspect(&path(&a), &loose).expect("inspect");
    let lb = engine_mlx::inspect(&path(&b), &loose).expect("inspect");
    assert_eq!(la.fingerprint, lb.fingerprint, "only spec and tokenizer");
    let q8 = EngineConfig {
        kv_bits: Some(8),
        ..loose
    };
    // KV quantization groups of 64 need a head dim divisible by 64 (the tiny model has 16).
    assert!(matches!(
        engine_mlx::inspect(&path(&a), &q8),
        Err(Error::Spec { .. })
    ));
    let bad = EngineConfig {
        kv_bits: Some(3),
        ..EngineConfig::default()
    };
    assert!(matches!(
        engine_mlx::inspect(&path(&a), &bad),
        Err(Error::Config {
            field: "kv_bits",
            ..
        })
    ));
}

#[test]
fn gguf_f16_and_bf16_tensors_load_exactly() {
    use engine_mlx::gguf::{write_gguf, GgufValue};
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("halves.gguf");
    let vals = [1.5f32, -2.0, 0.25, 3.0];
    let f16: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    write_gguf(
        &p,
        &[("general.architecture", GgufValue::String("llama".into()))],
        &[("a", vec![2, 2], 1, f16), ("b", vec![4], 30, bf16)],
    )
    .expect("write");
    let header = GgufHeader::read(&p).expect("header");
    let mut map = engine_mlx::weights::load_gguf(&header).expect("load");
    for name in ["a", "b"] {
        let t = map.take(name).expect("tensor");
        let v = t.to_f32().expect("f32").to_vec_exact::<f32>().expect("vec");
        assert_eq!(v, vals, "{name}");
    }
}
