//! Property tests of the capacity maths and of extraction robustness.

use std::collections::HashMap;

use model_cache_spec::{KvStorage, LayerKind, ModelCacheSpec};
use proptest::prelude::*;
use serde_json::{Map, Number, Value};

/// Valid specs: dims multiples of 32 so every storage (group 32) applies.
fn any_spec() -> impl Strategy<Value = ModelCacheSpec> {
    (
        prop::collection::vec(
            prop_oneof![Just(None), (1u32..100_000).prop_map(Some)],
            1..64,
        ),
        1u32..64,
        1u32..16,
        1u32..16,
        1u32..16,
    )
        .prop_filter_map("valid", |(layers, heads, k, v, bt)| {
            let layers = layers
                .into_iter()
                .map(|w| {
                    w.map_or(LayerKind::Global, |window| LayerKind::SlidingWindow {
                        window,
                    })
                })
                .collect();
            ModelCacheSpec::new(layers, heads, k * 32, v * 32, bt * 64, KvStorage::FP16).ok()
        })
}

fn with(spec: &ModelCacheSpec, storage: KvStorage) -> Option<ModelCacheSpec> {
    spec.clone().with_kv_storage(storage).ok()
}

proptest! {
    #[test]
    fn quantized_lt_fp16_lt_fp32(spec in any_spec(), group in prop_oneof![Just(32u32), Just(64), Just(128)]) {
        let q = |bits| KvStorage::Quantized { bits, group_size: group };
        // Group 64/128 may not divide the dims; fall back to 32, which always does.
        let q4 = with(&spec, q(4)).or_else(|| with(&spec, KvStorage::Quantized { bits: 4, group_size: 32 }));
        let q8 = with(&spec, q(8)).or_else(|| with(&spec, KvStorage::Quantized { bits: 8, group_size: 32 }));
        let fp32 = with(&spec, KvStorage::FP32);
        prop_assert!(q4.is_some() && q8.is_some() && fp32.is_some());
        if let (Some(q4), Some(q8), Some(fp32)) = (q4, q8, fp32) {
            prop_assert!(q4.bytes_per_block() < q8.bytes_per_block());
            prop_assert!(q8.bytes_per_block() < spec.bytes_per_block());
            prop_assert!(spec.bytes_per_block() < fp32.bytes_per_block());
            prop_assert_eq!(fp32.bytes_per_block(), 2 * spec.bytes_per_block());
        }
    }

    #[test]
    fn capacity_is_monotonic_and_within_budget(spec in any_spec(), a in any::<u64>(), b in any::<u64>()) {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        prop_assert!(spec.blocks_for_budget(lo) <= spec.blocks_for_budget(hi));
        prop_assert!(spec.tokens_for_budget(lo) <= spec.tokens_for_budget(hi));
        let blocks = spec.blocks_for_budget(hi);
        let bpb = spec.bytes_per_block();
        prop_assert!(blocks.checked_mul(bpb).is_some_and(|used| used <= hi));
        // Maximal: one more block would not fit.
        prop_assert!((blocks + 1).checked_mul(bpb).is_none_or(|more| more > hi));
        prop_assert_eq!(spec.tokens_for_budget(hi), blocks.saturating_mul(u64::from(spec.block_tokens())));
    }

    #[test]
    fn resident_cost_is_monotonic_and_bounded(spec in any_spec(), a in 0u64..10_000_000, b in 0u64..10_000_000, extra in 0u64..100_000) {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        // Never more than full blocks on every layer, never less than the global layers' share.
        let full = spec.blocks_for_tokens(hi);
        prop_assert!(spec.resident_blocks(hi, extra) <= full);
        prop_assert!(spec.resident_bytes(hi, extra) <= full * spec.bytes_per_block());
        prop_assert!(spec.resident_bytes(lo, extra) <= spec.resident_bytes(hi, extra));
        prop_assert!(spec.resident_bytes(hi, 0) <= spec.resident_bytes(hi, extra));
        if spec.num_sliding_layers() == 0 {
            prop_assert_eq!(spec.resident_blocks(hi, extra), full);
            prop_assert_eq!(spec.resident_bytes(hi, extra), full * spec.bytes_per_block());
        }
        let globals = u64::from(spec.num_layers() - spec.num_sliding_layers());
        prop_assert!(spec.resident_bytes(hi, extra) >= full * globals * spec.bytes_per_block_per_layer());
    }

    #[test]
    fn max_sequence_fits_and_is_maximal(spec in any_spec(), budget in 0u64..(1u64 << 36)) {
        let n = spec.max_sequence_tokens(budget);
        if n == u64::MAX {
            prop_assert_eq!(spec.num_sliding_layers(), spec.num_layers());
        } else {
            prop_assert!(spec.resident_bytes(n, 0) <= budget);
            prop_assert!(n % u64::from(spec.block_tokens()) == 0);
            prop_assert!(n >= spec.tokens_for_budget(budget));
            if spec.num_sliding_layers() < spec.num_layers() {
                prop_assert!(spec.resident_bytes(n + u64::from(spec.block_tokens()), 0) > budget);
            }
        }
    }

    #[test]
    fn per_token_and_per_layer_are_exact(spec in any_spec(), bits in prop_oneof![Just(4u8), Just(8)]) {
        for s in [Some(spec.clone()), with(&spec, KvStorage::Quantized { bits, group_size: 32 })].into_iter().flatten() {
            prop_assert_eq!(s.bytes_per_token() * u64::from(s.block_tokens()), s.bytes_per_block());
            prop_assert_eq!(s.bytes_per_block_per_layer() * u64::from(s.num_layers()), s.bytes_per_block());
        }
    }

    #[test]
    fn serde_round_trips_and_canonical_string_identifies(a in any_spec(), b in any_spec()) {
        let back: ModelCacheSpec = serde_json::from_value(serde_json::to_value(&a).map_err(|e| TestCaseError::fail(e.to_string()))?)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, &a);
        prop_assert_eq!(a.canonical_string() == b.canonical_string(), a == b);
    }

    #[test]
    fn from_config_never_panics(config in any_config(), bt in any::<u32>()) {
        let _ = ModelCacheSpec::from_config(&config, bt);
        if let Value::Object(map) = &config {
            let md: HashMap<String, Value> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let _ = ModelCacheSpec::from_gguf_metadata(&md, bt);
        }
    }

    #[test]
    fn from_config_never_panics_on_any_json(config in any_json()) {
        let _ = ModelCacheSpec::from_config(&config, 256);
    }
}

const KEYS: &[&str] = &[
    "num_hidden_layers",
    "num_layers",
    "n_layers",
    "num_attention_heads",
    "n_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "text_config",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "sliding_window",
    "layer_types",
    "sliding_window_pattern",
    "use_sliding_window",
    "max_window_layers",
    "model_type",
    "general.architecture",
    "llama.block_count",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.embedding_length",
    "llama.attention.key_length",
    "llama.attention.key_length_mla",
    "llama.attention.sliding_window",
    "llama.attention.sliding_window_pattern",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (0u64..10).prop_map(Value::from),
        (0u64..5000).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter_map("finite", Number::from_f64)
            .prop_map(Value::Number),
        prop_oneof![
            Just("llama"),
            Just("gemma3"),
            Just("gemma2"),
            Just("gemma3_text"),
            Just("full_attention"),
            Just("sliding_attention"),
            Just("x")
        ]
        .prop_map(Value::from),
    ]
}

/// Objects over the keys this crate reads, with nested values (including `text_config`).
fn any_config() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 64, 12, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..12).prop_map(|kv| {
                Value::Object(
                    kv.into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect::<Map<_, _>>(),
                )
            }),
        ]
    })
}

fn any_json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::hash_map(".{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
