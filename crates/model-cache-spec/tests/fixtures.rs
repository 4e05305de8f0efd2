//! Published `config.json` values of the model matrix, with known answers.

use model_cache_spec::{KvStorage, LayerKind, ModelCacheSpec, SpecError, DEFAULT_BLOCK_TOKENS};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn spec(json: &str) -> Result<ModelCacheSpec, Box<dyn std::error::Error>> {
    let config: serde_json::Value = serde_json::from_str(json)?;
    Ok(ModelCacheSpec::from_config(&config, DEFAULT_BLOCK_TOKENS)?)
}

/// (layers, kv heads, k dim, v dim, bytes per block per layer, bytes per block) at fp16, 256.
fn check_shape(s: &ModelCacheSpec, shape: (u32, u32, u32, u32), per_layer: u64, per_block: u64) {
    assert_eq!(
        (
            s.num_layers(),
            s.num_kv_heads(),
            s.k_head_dim(),
            s.v_head_dim()
        ),
        shape
    );
    assert_eq!(s.block_tokens(), 256);
    assert_eq!(s.kv_storage(), KvStorage::Float { bytes: 2 });
    assert_eq!(s.bytes_per_block_per_layer(), per_layer);
    assert_eq!(s.bytes_per_block(), per_block);
    assert_eq!(s.bytes_per_token() * 256, per_block);
}

#[test]
fn smollm2_135m() -> TestResult {
    let s = spec(include_str!("fixtures/smollm2-135m.json"))?;
    check_shape(&s, (30, 3, 64, 64), 196_608, 5_898_240);
    assert!(s.layers().iter().all(|l| *l == LayerKind::Global));
    // A 1 GiB budget (the seed's test configuration) holds 182 blocks = 46,592 tokens.
    assert_eq!(s.blocks_for_budget(1 << 30), 182);
    assert_eq!(s.tokens_for_budget(1 << 30), 46_592);
    Ok(())
}

#[test]
fn llama_3_1_8b() -> TestResult {
    let s = spec(include_str!("fixtures/llama-3.1-8b.json"))?;
    check_shape(&s, (32, 8, 128, 128), 1_048_576, 33_554_432);
    // The well-known 128 KiB of fp16 KV per token.
    assert_eq!(s.bytes_per_token(), 128 * 1024);
    Ok(())
}

#[test]
fn mistral_7b_v0_3() -> TestResult {
    let s = spec(include_str!("fixtures/mistral-7b-v0.3.json"))?;
    check_shape(&s, (32, 8, 128, 128), 1_048_576, 33_554_432);
    // `sliding_window: null` means full attention.
    assert_eq!(s.num_sliding_layers(), 0);
    Ok(())
}

#[test]
fn qwen2_5_7b() -> TestResult {
    let s = spec(include_str!("fixtures/qwen2.5-7b.json"))?;
    check_shape(&s, (28, 4, 128, 128), 524_288, 14_680_064);
    // `use_sliding_window: false` wins over `sliding_window: 131072`.
    assert_eq!(s.num_sliding_layers(), 0);
    assert_eq!(s.bytes_per_token(), 56 * 1024);
    Ok(())
}

#[test]
fn qwen3_8b() -> TestResult {
    let s = spec(include_str!("fixtures/qwen3-8b.json"))?;
    check_shape(&s, (36, 8, 128, 128), 1_048_576, 37_748_736);
    assert_eq!(s.bytes_per_token(), 144 * 1024);
    Ok(())
}

fn check_gemma(s: &ModelCacheSpec) -> TestResult {
    check_shape(s, (48, 8, 256, 256), 2_097_152, 100_663_296);
    for (i, layer) in s.layers().iter().enumerate() {
        let expected = if i % 6 == 5 {
            LayerKind::Global
        } else {
            LayerKind::SlidingWindow { window: 1024 }
        };
        assert_eq!(*layer, expected, "layer {i}");
    }
    assert_eq!(s.num_sliding_layers(), 40);
    let q8 = s.clone().with_kv_storage(KvStorage::Quantized {
        bits: 8,
        group_size: 64,
    })?;
    assert_eq!(q8.bytes_per_block_per_layer(), 1_114_112);
    let q4 = s.clone().with_kv_storage(KvStorage::Quantized {
        bits: 4,
        group_size: 64,
    })?;
    assert_eq!(q4.bytes_per_block_per_layer(), 589_824);
    assert_eq!(q4.bytes_per_block(), 589_824 * 48);
    Ok(())
}

#[test]
fn gemma_3_12b_text_config() -> TestResult {
    check_gemma(&spec(include_str!("fixtures/gemma-3-12b.json"))?)
}

#[test]
fn gemma_3_12b_google_config_uses_class_defaults() -> TestResult {
    // head_dim 256 is not hidden / heads (3840 / 16 = 240): the class default must win.
    let s = spec(include_str!("fixtures/gemma-3-12b-google.json"))?;
    check_gemma(&s)?;
    assert_eq!(s, spec(include_str!("fixtures/gemma-3-12b.json"))?);
    Ok(())
}

#[test]
fn deepseek_coder_v2_lite_counts_the_latent_cache() -> TestResult {
    let s = spec(include_str!("fixtures/deepseek-coder-v2-lite.json"))?;
    // One KV head of 512 latent + 64 RoPE dims, the key and also the value (stored once):
    // 256 × 576 × 2 = 294,912 bytes per layer; × 27 = 7,962,624 per block.
    check_shape(&s, (27, 1, 576, 576), 294_912, 7_962_624);
    assert!(s.values_are_keys());
    assert_eq!(s.bytes_per_token(), 31_104);
    // Expanded heads would be 256 × 16 × (192 + 128) × 2 = 2,621,440 bytes per layer.
    assert_eq!(2_621_440 * 100 / s.bytes_per_block_per_layer(), 888);
    // 8-bit with group 64 (divides 576): 256 × 576 bytes + 256 × 9 groups × 4 B.
    let q8 = s.clone().with_kv_storage(KvStorage::Q8)?;
    assert_eq!(q8.bytes_per_block_per_layer(), 147_456 + 9_216);
    assert!(q8.values_are_keys());
    // The fingerprint text says so (a cache of K and V is another cache).
    assert!(s.canonical_string().ends_with(";values=keys"));
    let back: ModelCacheSpec = serde_json::from_value(serde_json::to_value(&s)?)?;
    assert_eq!(back, s);
    Ok(())
}

#[test]
fn block_size_changes_scale_linearly() -> TestResult {
    let s = spec(include_str!("fixtures/smollm2-135m.json"))?;
    let s64 = s.clone().with_block_tokens(64)?;
    assert_eq!(
        s64.bytes_per_block_per_layer() * 4,
        s.bytes_per_block_per_layer()
    );
    assert_eq!(s64.bytes_per_token(), s.bytes_per_token());
    assert_eq!(
        s.with_block_tokens(96),
        Err(SpecError::BlockTokens { value: 96 })
    );
    Ok(())
}

#[test]
fn every_fixture_serializes_and_has_a_distinct_canonical_string() -> TestResult {
    let fixtures = [
        include_str!("fixtures/smollm2-135m.json"),
        include_str!("fixtures/llama-3.1-8b.json"),
        include_str!("fixtures/qwen2.5-7b.json"),
        include_str!("fixtures/qwen3-8b.json"),
        include_str!("fixtures/gemma-3-12b.json"),
        include_str!("fixtures/deepseek-coder-v2-lite.json"),
    ];
    let mut seen = std::collections::BTreeSet::new();
    for json in fixtures {
        let s = spec(json)?;
        let back: ModelCacheSpec = serde_json::from_value(serde_json::to_value(&s)?)?;
        assert_eq!(back, s);
        assert!(seen.insert(s.canonical_string()));
    }
    // Llama 3.1 8B and Mistral 7B v0.3 have the same cache shape, hence the same string.
    assert_eq!(
        spec(include_str!("fixtures/llama-3.1-8b.json"))?.canonical_string(),
        spec(include_str!("fixtures/mistral-7b-v0.3.json"))?.canonical_string()
    );
    Ok(())
}
