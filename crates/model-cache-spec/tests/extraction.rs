//! Key variants, sliding-window rules, GGUF metadata and typed errors.

use std::collections::HashMap;

use model_cache_spec::{LayerKind, ModelCacheSpec, SpecError, MAX_LAYERS};
use serde_json::{json, Value};

fn from(config: Value) -> Result<ModelCacheSpec, SpecError> {
    ModelCacheSpec::from_config(&config, 256)
}

fn field_of(r: Result<ModelCacheSpec, SpecError>) -> Option<String> {
    r.err().and_then(|e| e.field().map(str::to_owned))
}

#[test]
fn layer_count_spellings() -> Result<(), SpecError> {
    for key in ["num_hidden_layers", "num_layers", "n_layers", "n_layer"] {
        let s = from(json!({ key: 4, "num_attention_heads": 2, "hidden_size": 128 }))?;
        assert_eq!(s.num_layers(), 4, "{key}");
    }
    // Preference order: num_hidden_layers first.
    let s = from(
        json!({"num_hidden_layers": 3, "n_layers": 9, "num_attention_heads": 2, "head_dim": 64}),
    )?;
    assert_eq!(s.num_layers(), 3);
    Ok(())
}

#[test]
fn kv_heads_fall_back_to_attention_heads() -> Result<(), SpecError> {
    let s = from(json!({"num_hidden_layers": 2, "num_attention_heads": 12, "hidden_size": 768}))?;
    assert_eq!((s.num_kv_heads(), s.k_head_dim()), (12, 64));
    let s = from(json!({"n_layers": 2, "n_heads": 8, "n_kv_heads": 1, "d_model": 512}))?;
    assert_eq!((s.num_kv_heads(), s.k_head_dim()), (1, 64));
    Ok(())
}

#[test]
fn null_means_absent() -> Result<(), SpecError> {
    let s = from(json!({
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": null,
        "head_dim": null, "hidden_size": 256, "sliding_window": null
    }))?;
    assert_eq!(
        (s.num_kv_heads(), s.k_head_dim(), s.num_sliding_layers()),
        (4, 64, 0)
    );
    Ok(())
}

#[test]
fn layer_types_decide_each_layer() -> Result<(), SpecError> {
    let s = from(json!({
        "num_hidden_layers": 4, "num_attention_heads": 4, "head_dim": 64, "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    }))?;
    let w = LayerKind::SlidingWindow { window: 128 };
    assert_eq!(s.layers(), &[w, LayerKind::Global, w, LayerKind::Global]);
    // layer_types wins over a pattern.
    let s = from(json!({
        "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 64, "sliding_window": 128,
        "sliding_window_pattern": 2, "layer_types": ["full_attention", "full_attention"]
    }))?;
    assert_eq!(s.num_sliding_layers(), 0);
    Ok(())
}

#[test]
fn layer_types_errors() {
    let base = |types: Value, window: Value| {
        from(
            json!({"num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 64,
                    "sliding_window": window, "layer_types": types}),
        )
    };
    assert_eq!(
        base(json!(["full_attention"]), json!(64)),
        Err(SpecError::LayerCount {
            field: "layer_types".into(),
            expected: 2,
            found: 1
        })
    );
    assert!(matches!(
        base(json!(["full_attention", "linear_attention"]), json!(64)),
        Err(SpecError::UnsupportedLayerType { index: 1, .. })
    ));
    assert_eq!(
        field_of(base(
            json!(["sliding_attention", "full_attention"]),
            Value::Null
        )),
        Some("sliding_window".into())
    );
    assert_eq!(
        field_of(base(json!("full_attention"), json!(64))),
        Some("layer_types".into())
    );
}

#[test]
fn sliding_rules_without_layer_types() -> Result<(), SpecError> {
    let base = json!({"num_hidden_layers": 6, "num_attention_heads": 4, "head_dim": 64});
    let with = |extra: Value| {
        let mut c = base.clone();
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(extra.clone());
        }
        from(c)
    };
    // A bare window: every layer slides (Mistral v0.1).
    assert_eq!(
        with(json!({"sliding_window": 4096}))?.num_sliding_layers(),
        6
    );
    // Qwen 2: off, or on from max_window_layers.
    assert_eq!(
        with(json!({"sliding_window": 4096, "use_sliding_window": false}))?.num_sliding_layers(),
        0
    );
    let s =
        with(json!({"sliding_window": 4096, "use_sliding_window": true, "max_window_layers": 4}))?;
    assert_eq!(s.layers()[3], LayerKind::Global);
    assert_eq!(s.layers()[4], LayerKind::SlidingWindow { window: 4096 });
    // Pattern 3: layers 2 and 5 global.
    let s = with(json!({"sliding_window": 512, "sliding_window_pattern": 3}))?;
    let globals: Vec<usize> = s
        .layers()
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.is_sliding())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(globals, vec![2, 5]);
    // Gemma 2 by model type: alternate, layer 0 sliding.
    let s = with(json!({"model_type": "gemma2", "sliding_window": 4096}))?;
    assert_eq!(s.layers()[0], LayerKind::SlidingWindow { window: 4096 });
    assert_eq!(s.layers()[1], LayerKind::Global);
    assert_eq!(
        s.k_head_dim(),
        64,
        "explicit head_dim wins over the Gemma default"
    );
    Ok(())
}

#[test]
fn typed_errors_name_the_field() {
    assert_eq!(from(json!([1, 2])), Err(SpecError::NotAnObject));
    assert_eq!(
        field_of(from(json!({"num_attention_heads": 4, "head_dim": 64}))),
        Some("num_hidden_layers".into())
    );
    assert_eq!(
        field_of(from(
            json!({"num_layers": "32", "num_attention_heads": 4, "head_dim": 64})
        )),
        Some("num_layers".into())
    );
    assert!(matches!(
        from(json!({"num_hidden_layers": -3, "num_attention_heads": 4, "head_dim": 64})),
        Err(SpecError::NotPositive { .. })
    ));
    assert!(matches!(
        from(json!({"num_hidden_layers": 2.5, "num_attention_heads": 4, "head_dim": 64})),
        Err(SpecError::WrongType { .. })
    ));
    assert!(matches!(
        from(
            json!({"num_hidden_layers": u64::from(MAX_LAYERS) + 1, "num_attention_heads": 4, "head_dim": 64})
        ),
        Err(SpecError::TooLarge { .. })
    ));
    assert!(matches!(
        from(json!({"num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 1u64 << 40})),
        Err(SpecError::TooLarge { .. })
    ));
    assert_eq!(
        from(json!({"num_hidden_layers": 2, "num_attention_heads": 7, "hidden_size": 100})),
        Err(SpecError::HeadDimNotDerivable {
            field: "hidden_size".into(),
            hidden_size: 100,
            num_heads: 7
        })
    );
    assert_eq!(
        field_of(from(
            json!({"num_hidden_layers": 2, "num_key_value_heads": 2})
        )),
        Some("head_dim".into())
    );
    assert_eq!(
        field_of(from(json!({"num_hidden_layers": 2, "head_dim": 64}))),
        Some("num_key_value_heads".into())
    );
    // MLA without its dims.
    assert_eq!(
        field_of(from(
            json!({"num_hidden_layers": 2, "num_attention_heads": 4, "kv_lora_rank": 512,
                             "qk_nope_head_dim": 128, "qk_rope_head_dim": 64})
        )),
        Some("v_head_dim".into())
    );
    let big = json!({"num_hidden_layers": 4096, "num_attention_heads": 4000000000u32,
                     "head_dim": 4000000000u32});
    assert_eq!(
        ModelCacheSpec::from_config(&big, 256),
        Err(SpecError::Overflow)
    );
}

fn gguf(pairs: &[(&str, Value)]) -> HashMap<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

#[test]
fn gguf_llama_derives_head_dim_from_embedding_length() -> Result<(), SpecError> {
    let md = gguf(&[
        ("general.architecture", json!("llama")),
        ("llama.block_count", json!(30)),
        ("llama.attention.head_count", json!(9)),
        ("llama.attention.head_count_kv", json!(3)),
        ("llama.embedding_length", json!(576)),
    ]);
    let s = ModelCacheSpec::from_gguf_metadata(&md, 256)?;
    assert_eq!(s.bytes_per_block_per_layer(), 196_608);
    let config: Value = serde_json::from_str(include_str!("fixtures/smollm2-135m.json"))
        .map_err(|_| SpecError::NotAnObject)?;
    assert_eq!(s, ModelCacheSpec::from_config(&config, 256)?);
    Ok(())
}

/// llama.cpp's Phi-3 converter writes `sliding_window` 0 for models without one (Phi-4-mini):
/// every layer global, not an error.
#[test]
fn gguf_sliding_window_zero_means_none() -> Result<(), SpecError> {
    let md = gguf(&[
        ("general.architecture", json!("phi3")),
        ("phi3.block_count", json!(32)),
        ("phi3.attention.head_count", json!(24)),
        ("phi3.attention.head_count_kv", json!(8)),
        ("phi3.embedding_length", json!(3072)),
        ("phi3.attention.sliding_window", json!(0)),
    ]);
    let s = ModelCacheSpec::from_gguf_metadata(&md, 256)?;
    assert_eq!(s.num_sliding_layers(), 0);
    assert_eq!(s.layers().len(), 32);
    Ok(())
}

#[test]
fn gguf_gemma3_default_pattern_and_explicit_lengths() -> Result<(), SpecError> {
    let md = gguf(&[
        ("general.architecture", json!("gemma3")),
        ("gemma3.block_count", json!(48)),
        ("gemma3.attention.head_count", json!(16)),
        ("gemma3.attention.head_count_kv", json!(8)),
        ("gemma3.attention.key_length", json!(256)),
        ("gemma3.attention.value_length", json!(256)),
        ("gemma3.embedding_length", json!(3840)),
        ("gemma3.attention.sliding_window", json!(1024)),
    ]);
    let s = ModelCacheSpec::from_gguf_metadata(&md, 256)?;
    assert_eq!(s.bytes_per_block_per_layer(), 2_097_152);
    assert_eq!(s.num_sliding_layers(), 40);
    assert_eq!(s.layers()[5], LayerKind::Global);
    // A per-layer boolean pattern overrides the default.
    let mut md = md;
    md.insert(
        "gemma3.attention.sliding_window_pattern".into(),
        Value::Array((0..48).map(|i| json!(i % 2 == 0)).collect()),
    );
    assert_eq!(
        ModelCacheSpec::from_gguf_metadata(&md, 256)?.num_sliding_layers(),
        24
    );
    Ok(())
}

#[test]
fn gguf_deepseek2_both_conversions_match_config() -> Result<(), SpecError> {
    let common = [
        ("general.architecture", json!("deepseek2")),
        ("deepseek2.block_count", json!(27)),
        ("deepseek2.attention.head_count", json!(16)),
        ("deepseek2.embedding_length", json!(2048)),
        ("deepseek2.attention.kv_lora_rank", json!(512)),
        ("deepseek2.rope.dimension_count", json!(64)),
    ];
    // Older llama.cpp: key/value lengths are the expanded per-head sizes.
    let mut old = gguf(&common);
    old.extend(gguf(&[
        ("deepseek2.attention.head_count_kv", json!(16)),
        ("deepseek2.attention.key_length", json!(192)),
        ("deepseek2.attention.value_length", json!(128)),
    ]));
    // Newer llama.cpp (MLA): key/value lengths describe the latent; *_mla the expanded heads.
    let mut new = gguf(&common);
    new.extend(gguf(&[
        ("deepseek2.attention.head_count_kv", json!(1)),
        ("deepseek2.attention.key_length", json!(576)),
        ("deepseek2.attention.value_length", json!(512)),
        ("deepseek2.attention.key_length_mla", json!(192)),
        ("deepseek2.attention.value_length_mla", json!(128)),
    ]));
    let config: Value = serde_json::from_str(include_str!("fixtures/deepseek-coder-v2-lite.json"))
        .map_err(|_| SpecError::NotAnObject)?;
    let expected = ModelCacheSpec::from_config(&config, 256)?;
    assert_eq!(ModelCacheSpec::from_gguf_metadata(&old, 256)?, expected);
    assert_eq!(ModelCacheSpec::from_gguf_metadata(&new, 256)?, expected);
    Ok(())
}

#[test]
fn gguf_per_layer_head_counts_and_errors() -> Result<(), SpecError> {
    let mut md = gguf(&[
        ("general.architecture", json!("llama")),
        ("llama.block_count", json!(2)),
        ("llama.attention.head_count", json!([8, 8])),
        ("llama.attention.head_count_kv", json!([2, 2])),
        ("llama.embedding_length", json!(512)),
    ]);
    assert_eq!(
        ModelCacheSpec::from_gguf_metadata(&md, 64)?.num_kv_heads(),
        2
    );
    md.insert("llama.attention.head_count_kv".into(), json!([2, 4]));
    assert!(matches!(
        ModelCacheSpec::from_gguf_metadata(&md, 64),
        Err(SpecError::VariableHeads { .. })
    ));
    md.remove("llama.block_count");
    assert_eq!(
        field_of(ModelCacheSpec::from_gguf_metadata(&md, 64)),
        Some("llama.block_count".into())
    );
    let empty: HashMap<String, Value> = HashMap::new();
    assert_eq!(
        field_of(ModelCacheSpec::from_gguf_metadata(&empty, 64)),
        Some("general.architecture".into())
    );
    // Any lookup works, for example a BTreeMap.
    let tree: std::collections::BTreeMap<String, Value> = gguf(&[
        ("general.architecture", json!("qwen2")),
        ("qwen2.block_count", json!(28)),
        ("qwen2.attention.head_count", json!(28)),
        ("qwen2.attention.head_count_kv", json!(4)),
        ("qwen2.embedding_length", json!(3584)),
    ])
    .into_iter()
    .collect();
    let s = ModelCacheSpec::from_gguf_lookup(|k| tree.get(k), 256)?;
    assert_eq!(s.bytes_per_block_per_layer(), 524_288);
    Ok(())
}
