#!/usr/bin/env python3
"""Golden fixtures for engine-mlx, made with the Python reference (mlx-lm on MLX's CPU backend).

For each architecture (the Llama family, and Gemma 3, Phi-3, Mixtral, Qwen3-MoE and
DeepSeek-V2) this builds a tiny random-weight model with mlx-lm's own model class for its
`model_type`, runs it on fixed token ids and writes, under
crates/engine-mlx/tests/fixtures/golden/<name>/:

  config.json             the Hugging Face config (with `quantization` for the q4 model)
  model.safetensors       the weights (fp16 for float models, so the files stay small; the
                          reference itself ran on exactly these values, upcast to fp32),
                          under the tensor names the Hugging Face checkpoints use (see
                          hf_layer_names below; MoE experts are stored one by one as HF
                          ships them, not stacked as mlx-lm's switch_mlp)
  tokenizer.json          a trivial word-level tokenizer (the engine needs one to load)
  expected.safetensors    `input_ids` (int32 [L]), `logits` (fp32 [L, vocab], every position)
                          and `greedy` (int32 [16]: greedy continuation with a KV cache)

Regenerate, never edit by hand:

  python3 crates/engine-mlx/scripts/golden.py [--venv DIR] [--only NAME,NAME...]

`--only` regenerates just the named fixtures (each model has its own fixed seed, so the
others are not needed for it to come out the same).

For the models after the first five (generate_hf) the script also checks, and stops if not:
the written tensor names are exactly those of hf_layer_names; mlx-lm's `load_model` (its
`sanitize` and strict `load_weights`) accepts them and gives bit-identical logits; the
greedy ids (from mlx-lm's own KV caches) equal the argmax of a cacheless forward over
prompt + continuation. It prints the smallest top-2 logit gap of the greedy steps and, for
MoE models, the smallest routing gap, so that a fixture never hinges on a near tie.

The script creates a virtual environment (default .semantic-build/golden-venv) with the pinned
versions below and re-runs itself inside it. Output is deterministic for a given MLX version.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

PINNED = ["mlx==0.32.2", "mlx-cpu==0.32.2", "mlx-lm==0.32.2"]
ROOT = Path(__file__).resolve().parents[3]
OUT = ROOT / "crates" / "engine-mlx" / "tests" / "fixtures" / "golden"

BASE = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "vocab_size": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
}

MODELS = {
    # Llama 3 style: llama3 RoPE scaling (small original context so it changes frequencies).
    "llama": dict(
        BASE,
        model_type="llama",
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral": dict(BASE, model_type="mistral", tie_word_embeddings=False, rope_theta=1e6),
    "qwen2": dict(BASE, model_type="qwen2", tie_word_embeddings=False, rope_theta=1e6),
    "qwen3": dict(BASE, model_type="qwen3", tie_word_embeddings=True, rope_theta=1e6),
    # MLX affine 4-bit (group 32) weights: exercises the quantized safetensors path.
    "llama_q4": dict(BASE, model_type="llama", tie_word_embeddings=False),
    # ---- Models below are saved under the Hugging Face checkpoint names (see HF_LAYER_NAMES)
    # and checked by reloading them through mlx-lm's own load path (`load_model`: config.json
    # -> ModelArgs, `Model.sanitize`, strict `load_weights`).
    #
    # Gemma 3 (text-only, as google/gemma-3-270m / 1b): 5 sliding-window layers then 1 global
    # layer (layers 0-4 and 6 sliding, layer 5 global). mlx-lm 0.32.2 reads only
    # `sliding_window_pattern` (default 6; layer i is global iff i % 6 == 5) and ignores
    # `layer_types` / `_sliding_window_pattern` (the 270M config has only those two; the 1B
    # config has `sliding_window_pattern`); all three are written here and agree.
    # Window semantics (mlx-lm, both paths): on a sliding layer the query at position p
    # attends to keys k with p - sliding_window < k <= p (itself and the 7 before it for a
    # window of 8). Prefill: `create_causal_mask(N, window_size=8)`, i.e.
    # `q >= k and q < k + 8`, applied whenever N > 8. Decode: the layer's cache is a
    # `RotatingKVCache(max_size=8)` (global layers: a plain KVCache); a one-token step gets
    # no mask and attends to all 8 keys the ring buffer holds, which are positions p-7..p
    # (the prefill's 24 keys are kept, trimmed to the last 7 before the first step writes).
    # Keys are rotated with their absolute positions before caching. Sliding layers use
    # RoPE base `rope_local_base_freq` (10000, no scaling); global layers `rope_theta` (1e6)
    # with `rope_scaling` (null here). Attention scale is query_pre_attn_scalar**-0.5 (24
    # here, not head_dim). RMSNorms (all six per layer incl. q/k norms, and the final norm)
    # scale by (1 + weight), which is why their stored weights are drawn around 0. The
    # embedding is multiplied by sqrt(hidden_size) rounded to bfloat16 (5.65625 for 32,
    # not 5.656854). MLP: down(gelu_tanh(gate(x)) * up(x)). Tied embeddings: no lm_head
    # tensor in the checkpoint (mlx-lm ties iff `lm_head.weight` is absent).
    "gemma3": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": 32,
        "num_hidden_layers": 7,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "vocab_size": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": None,
        "query_pre_attn_scalar": 24,
        "sliding_window": 8,
        "sliding_window_pattern": 6,
        "_sliding_window_pattern": 6,
        "layer_types": [
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(7)
        ],
        "max_position_embeddings": 512,
        "hidden_activation": "gelu_pytorch_tanh",
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "tie_word_embeddings": True,
    },
    # Phi-3 (as microsoft/Phi-3-mini-4k-instruct): fused qkv_proj (rows: q heads, then k,
    # then v) and gate_up_proj (rows: gate, then up); head_dim = hidden_size / heads (mlx-lm
    # reads no head_dim key); plain RoPE over the whole head.
    "phi3": {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": 512,
        "original_max_position_embeddings": 512,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    },
    # Phi-3 with LongRoPE, shaped like microsoft/Phi-4-mini-instruct (model_type phi3,
    # partial_rotary_factor 0.75 so RoPE covers the first 12 of 16 dims, tied embeddings).
    # mlx-lm's SuScaledRoPE always uses `long_factor` (inverse frequency of pair i is
    # 1 / (long_factor[i] * base^(2i/rope_dim))) and scales the rotated dims of q and k by
    # sqrt(1 + ln(f) / ln(original_max_position_embeddings)), f = max_position_embeddings /
    # original_max_position_embeddings (here f = 4: 1.2247). Hugging Face switches to
    # `short_factor` while the sequence is no longer than original_max_position_embeddings;
    # that is 16 here, below the 24 prompt tokens, so both use the long factors throughout.
    "phi3_longrope": {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.75,
        "rope_scaling": {
            "type": "longrope",
            "long_factor": [1.0, 1.25, 1.8, 2.6, 3.5, 4.0],
            "short_factor": [1.0, 1.0, 1.05, 1.1, 1.2, 1.3],
        },
        "max_position_embeddings": 64,
        "original_max_position_embeddings": 16,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
    },
    # Mixtral (as mistralai/Mixtral-8x7B-v0.1): every layer a sparse MoE of
    # num_local_experts SwiGLU experts (intermediate_size each); router `gate` [E, hidden];
    # top num_experts_per_tok by router logit, weights = softmax over those k logits (the
    # same as softmax over all E then renormalised over the k). head_dim = hidden / heads.
    "mixtral": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 512,
        "sliding_window": None,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    },
    # Qwen3-MoE (as Qwen/Qwen3-30B-A3B): Qwen3 attention (q/k RMSNorm per head before RoPE)
    # and in every layer (decoder_sparse_step 1, mlp_only_layers []) an MoE of num_experts
    # SwiGLU experts of moe_intermediate_size: p = softmax(router logits) over all experts,
    # top num_experts_per_tok of p, renormalised to sum 1 (norm_topk_prob), no shared expert.
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "moe_intermediate_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "vocab_size": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "rope_scaling": None,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "max_position_embeddings": 512,
        "attention_bias": False,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    },
    # DeepSeek-V2, shaped like deepseek-ai/DeepSeek-V2-Lite: MLA without a query low-rank
    # (q_lora_rank null: one q_proj), kv_lora_rank latent, decoupled RoPE key shared by all
    # heads; layer 0 dense (first_k_dense_replace 1), layers 1-2 MoE (moe_layer_freq 1) with
    # n_routed_experts routed + n_shared_experts always-on experts; `greedy` top-k of
    # softmax(router logits), not renormalised (norm_topk_prob false; mlx-lm never reads it),
    # times routed_scaling_factor. YaRN as V2-Lite (factor 40, mscale = mscale_all_dim =
    # 0.707) but original_max_position_embeddings 64 so the ramp is partial on 8 rope dims.
    "deepseek_v2": {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": 128,
        "rms_norm_eps": 1e-6,
        "q_lora_rank": None,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 64,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        "max_position_embeddings": 2560,
        "attention_bias": False,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    },
    # DeepSeek-V2 shaped like the full deepseek-ai/DeepSeek-V2: q_lora_rank set (q_a_proj,
    # q_a_layernorm, q_b_proj), `group_limited_greedy` routing (8 experts in n_group 4
    # groups of 2; the topk_group 2 groups with the highest max expert probability stay,
    # the others are zeroed; then top 3), 2 shared experts (one MLP of width
    # 2 * moe_intermediate_size), routed_scaling_factor 16 as in V2. Unlike the real
    # checkpoints, mscale (1.0) differs from mscale_all_dim (0.707), so the RoPE-side factor
    # yarn_mscale(40, 1.0) / yarn_mscale(40, 0.707) = 1.0857 on q_pe and k_pe is not 1.
    "deepseek_v2_q_lora": {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": 128,
        "rms_norm_eps": 1e-6,
        "q_lora_rank": 24,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "n_routed_experts": 8,
        "n_shared_experts": 2,
        "num_experts_per_tok": 3,
        "topk_method": "group_limited_greedy",
        "n_group": 4,
        "topk_group": 2,
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 16.0,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 64,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 0.707,
        },
        "max_position_embeddings": 2560,
        "attention_bias": False,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    },
}

# Per-model changes to the random initialisation (see generate_hf):
# `embed`: standard deviation of the embedding (default 0.5). With tied embeddings and a
#   strong embedding in the residual (Gemma multiplies it by sqrt(hidden_size)) the default
#   makes greedy decoding repeat one token forever; the smaller values give varied ids.
# `seed`: instead of 1000 + position in MODELS, where that seed's smallest routing gap or
#   top-2 logit gap was under 0.01 (mixtral: 0.0107 / 0.0069, deepseek_v2_q_lora:
#   0.0011 / 0.0061); 3011 was the first of 1011, 2011, 3011 clear of that for both.
INIT = {
    "gemma3": {"embed": 0.15},
    "phi3_longrope": {"embed": 0.1},
    "mixtral": {"seed": 3011},
    "deepseek_v2_q_lora": {"seed": 3011},
}

# The fixtures made before the Hugging Face-named ones: their mlx-lm parameter names are the
# HF names already, and they are written exactly as they always were (byte for byte).
LEGACY = ["llama", "mistral", "qwen2", "qwen3", "llama_q4"]

# Tensor names of one decoder layer, after `model.layers.N.`, as the Hugging Face
# checkpoints of each architecture store them (every name ends in `.weight`). Besides
# these: `model.embed_tokens.weight`, `model.norm.weight` and, unless the embeddings are
# tied, `lm_head.weight`. `{e}` runs over the experts: HF stores every expert separately;
# mlx-lm's `sanitize` stacks them into `...switch_mlp.{gate,up,down}_proj.weight`
# [E, out, in] (this script unstacks its parameters into the HF names below, and checks
# that the written names are exactly these).
ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
NORMS = ["input_layernorm", "post_attention_layernorm"]
SWIGLU = ["gate_proj", "up_proj", "down_proj"]


def hf_layer_names(config, layer):
    t = config["model_type"]
    if t == "gemma3_text":
        return (
            NORMS
            + ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
            + ATTN
            + ["self_attn.q_norm", "self_attn.k_norm"]
            + [f"mlp.{p}" for p in SWIGLU]
        )
    if t == "phi3":
        return NORMS + ["self_attn.qkv_proj", "self_attn.o_proj"] + [
            "mlp.gate_up_proj",
            "mlp.down_proj",
        ]
    if t == "mixtral":
        # w1 = gate_proj, w2 = down_proj, w3 = up_proj.
        return (
            NORMS
            + ATTN
            + ["block_sparse_moe.gate"]
            + [
                f"block_sparse_moe.experts.{e}.{w}"
                for e in range(config["num_local_experts"])
                for w in ["w1", "w2", "w3"]
            ]
        )
    if t == "qwen3_moe":
        return (
            NORMS
            + ATTN
            + ["self_attn.q_norm", "self_attn.k_norm", "mlp.gate"]
            + [f"mlp.experts.{e}.{p}" for e in range(config["num_experts"]) for p in SWIGLU]
        )
    if t == "deepseek_v2":
        if config["q_lora_rank"] is None:
            q = ["self_attn.q_proj"]
        else:
            q = ["self_attn.q_a_proj", "self_attn.q_a_layernorm", "self_attn.q_b_proj"]
        attn = q + [
            "self_attn.kv_a_proj_with_mqa",
            "self_attn.kv_a_layernorm",
            "self_attn.kv_b_proj",
            "self_attn.o_proj",
        ]
        moe = layer >= config["first_k_dense_replace"] and layer % config["moe_layer_freq"] == 0
        if not moe:
            return NORMS + attn + [f"mlp.{p}" for p in SWIGLU]
        return (
            NORMS
            + attn
            + ["mlp.gate"]
            + [f"mlp.experts.{e}.{p}" for e in range(config["n_routed_experts"]) for p in SWIGLU]
            + [f"mlp.shared_experts.{p}" for p in SWIGLU]
        )
    raise ValueError(t)


def hf_names(config):
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.get("tie_word_embeddings", False):
        names.add("lm_head.weight")
    for layer in range(config["num_hidden_layers"]):
        names |= {f"model.layers.{layer}.{n}.weight" for n in hf_layer_names(config, layer)}
    return names

INPUT_IDS = [(i * 37 + 11) % 128 for i in range(24)]
GREEDY_STEPS = 16


def ensure_venv():
    try:
        import mlx.core  # noqa: F401
        import mlx_lm

        if getattr(mlx_lm, "__version__", "") == "0.32.2":
            return
    except ImportError:
        pass
    venv = ROOT / ".semantic-build" / "golden-venv"
    if "--venv" in sys.argv:
        venv = Path(sys.argv[sys.argv.index("--venv") + 1])
    py = venv / "bin" / "python"
    if os.environ.get("SEMANTIC_GOLDEN_IN_VENV") == "1":
        sys.exit(f"mlx-lm 0.32.2 is not importable inside {venv}")
    if not py.exists():
        subprocess.check_call([sys.executable, "-m", "venv", str(venv)])
    subprocess.check_call([str(py), "-m", "pip", "install", "-q", *PINNED])
    env = dict(os.environ, SEMANTIC_GOLDEN_IN_VENV="1")
    sys.exit(subprocess.call([str(py), __file__, *sys.argv[1:]], env=env))


def write_tokenizer(path, vocab_size):
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
    }
    path.write_text(json.dumps(tok))


def parse_only():
    """The fixtures named by `--only NAME,NAME...` (all of them without it)."""
    if "--only" not in sys.argv:
        return list(MODELS)
    names = sys.argv[sys.argv.index("--only") + 1].split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        sys.exit(f"unknown fixture(s) {unknown}; known: {', '.join(MODELS)}")
    return names


def save_expected(d, ids, logits, greedy):
    import mlx.core as mx

    mx.save_safetensors(
        str(d / "expected.safetensors"),
        {
            "input_ids": ids,
            "logits": logits,
            "greedy": mx.array(greedy, dtype=mx.int32),
        },
        metadata={"generator": "crates/engine-mlx/scripts/golden.py", "pins": " ".join(PINNED)},
    )


def greedy_run(model, ids):
    """16 greedy steps with mlx-lm's own prompt cache (`make_prompt_cache`: the model's
    `make_cache`, e.g. RotatingKVCache for Gemma 3's sliding layers). Returns the ids, the
    smallest top-2 logit gap and the logits of each step."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    step_logits = model(ids[None], cache=cache)
    greedy, steps = [], []
    gap = float("inf")
    for _ in range(GREEDY_STEPS):
        last = step_logits[0, -1]
        steps.append(last)
        tok = mx.argmax(last).item()
        top2 = mx.sort(last)[-2:]
        gap = min(gap, (top2[1] - top2[0]).item())
        greedy.append(tok)
        step_logits = model(mx.array([[tok]], dtype=mx.int32), cache=cache)
    return greedy, gap, steps


def generate_legacy(name, config, seed):
    """The original fixtures, made exactly as before (their names are HF names already)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import _get_classes

    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    params = []
    for key, p in tree_flatten(model.parameters()):
        if key.endswith("norm.weight"):
            v = 1.0 + 0.2 * mx.random.normal(p.shape)
        elif "embed_tokens" in key:
            v = 0.5 * mx.random.normal(p.shape)
        else:
            v = 0.35 * mx.random.normal(p.shape)
        # fp16 storage; compute in fp32 on exactly the stored values.
        params.append((key, v.astype(mx.float16).astype(mx.float32)))
    model.update(tree_unflatten(params))
    quantized = name.endswith("_q4")
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
        config = dict(config, quantization={"group_size": 32, "bits": 4})
    weights = dict(tree_flatten(model.parameters()))
    if not quantized:
        weights = {k: v.astype(mx.float16) for k, v in weights.items()}
    mx.eval(model.parameters())

    ids = mx.array(INPUT_IDS, dtype=mx.int32)
    logits = model(ids[None])[0].astype(mx.float32)
    greedy, gap, _ = greedy_run(model, ids)

    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    mx.save_safetensors(str(d / "model.safetensors"), weights, metadata={"format": "mlx"})
    write_tokenizer(d / "tokenizer.json", config["vocab_size"])
    save_expected(d, ids, logits, greedy)
    print(f"{name}: greedy {greedy} (smallest top-2 logit gap {gap:.4f})")


# Routing margins: for every MoE call, the gap (in router-logit units) between the last
# expert chosen and the best one left out, and for group-limited routing between the last
# group kept and the best group dropped. A tiny gap would let float rounding flip which
# experts run, so the script reports the smallest one.
ROUTING_GAPS = []


def _topk_gap(logits, k, eligible=None):
    import mlx.core as mx

    if eligible is not None:
        logits = mx.where(eligible, logits, -mx.inf)
    s = mx.sort(logits.astype(mx.float32), axis=-1)
    if s.shape[-1] <= k:
        return
    gap = s[..., -k] - s[..., -k - 1]
    gap = mx.where(mx.isinf(gap), mx.inf, gap)
    ROUTING_GAPS.append(mx.min(gap).item())


def record_routing():
    """Wraps the MoE routers of mlx-lm's mixtral, qwen3_moe and deepseek_v2 so that every
    call records its routing gap (no change to what they compute)."""
    import mlx.core as mx
    from mlx_lm.models import deepseek_v2, mixtral, qwen3_moe

    def wrap(cls, gap_of):
        if getattr(cls, "_golden_wrapped", False):
            return
        orig = cls.__call__

        def call(self, x):
            gap_of(self, x)
            return orig(self, x)

        cls.__call__ = call
        cls._golden_wrapped = True

    wrap(mixtral.MixtralSparseMoeBlock, lambda m, x: _topk_gap(m.gate(x), m.num_experts_per_tok))
    wrap(qwen3_moe.Qwen3MoeSparseMoeBlock, lambda m, x: _topk_gap(m.gate(x), m.top_k))

    def deepseek_gap(m, x):
        # Softmax is monotonic and a group's score is its largest probability, so ranks (and
        # gaps) can be taken on the logits.
        logits = x @ m.weight.T
        eligible = None
        if m.topk_method == "group_limited_greedy":
            grouped = logits.reshape(*logits.shape[:-1], m.n_group, -1)
            group_best = grouped.max(axis=-1)
            _topk_gap(group_best, m.topk_group)
            kth = mx.sort(group_best, axis=-1)[..., -m.topk_group]
            keep = group_best >= kth[..., None]
            eligible = mx.broadcast_to(keep[..., None], grouped.shape).reshape(logits.shape)
        _topk_gap(logits, m.top_k, eligible)

    wrap(deepseek_v2.MoEGate, deepseek_gap)


def to_hf(config, params):
    """mlx-lm parameter names -> the HF checkpoint's (per-expert tensors instead of the
    stacked switch_mlp ones; Mixtral's experts are w1 = gate, w2 = down, w3 = up)."""
    mixtral = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    out = {}
    for key, v in params.items():
        if ".switch_mlp." not in key:
            out[key] = v
            continue
        prefix, rest = key.split(".switch_mlp.")
        proj, leaf = rest.split(".")
        for e in range(v.shape[0]):
            if config["model_type"] == "mixtral":
                out[f"{prefix}.experts.{e}.{mixtral[proj]}.{leaf}"] = v[e]
            else:
                out[f"{prefix}.experts.{e}.{proj}.{leaf}"] = v[e]
    return out


def generate_hf(name, config, seed):
    """A fixture saved under HF checkpoint names, its reference run on the model that
    mlx-lm's `load_model` builds from the written files (upcast to fp32), and checked
    against the model it was made from."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import _get_classes, load_model

    record_routing()
    init = INIT.get(name, {})
    seed = init.get("seed", seed)
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    offset_norms = config["model_type"] == "gemma3_text"
    if offset_norms:
        model.sanitize({})  # no lm_head.weight: ties the embeddings, drops lm_head
    params = []
    for key, p in tree_flatten(model.parameters()):
        if key.endswith("norm.weight"):
            # Gemma's norms scale by (1 + weight): draw the stored weight around 0.
            v = (0.0 if offset_norms else 1.0) + 0.2 * mx.random.normal(p.shape)
        elif "embed_tokens" in key:
            v = init.get("embed", 0.5) * mx.random.normal(p.shape)
        else:
            v = 0.35 * mx.random.normal(p.shape)
        params.append((key, v.astype(mx.float16).astype(mx.float32)))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())

    weights = to_hf(config, dict(tree_flatten(model.parameters())))
    weights = {k: v.astype(mx.float16) for k, v in sorted(weights.items())}
    want = hf_names(config)
    if set(weights) != want:
        sys.exit(
            f"{name}: names differ from HF_LAYER_NAMES: extra {sorted(set(weights) - want)}, "
            f"missing {sorted(want - set(weights))}"
        )

    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    mx.save_safetensors(str(d / "model.safetensors"), weights, metadata={"format": "pt"})
    write_tokenizer(d / "tokenizer.json", config["vocab_size"])

    # mlx-lm's load path: config.json -> ModelArgs, sanitize (stacks the experts), strict
    # load_weights (every parameter present, no extra tensor). Then fp32, as for the others.
    loaded, _ = load_model(d)
    loaded.set_dtype(mx.float32)
    mx.eval(loaded.parameters())
    a = dict(tree_flatten(model.parameters()))
    b = dict(tree_flatten(loaded.parameters()))
    assert set(a) == set(b), (name, set(a) ^ set(b))
    assert all(mx.array_equal(a[k], b[k]).item() for k in a), name

    ids = mx.array(INPUT_IDS, dtype=mx.int32)
    ROUTING_GAPS.clear()
    logits = loaded(ids[None])[0].astype(mx.float32)
    direct = model(ids[None])[0].astype(mx.float32)
    reload_diff = mx.max(mx.abs(logits - direct)).item()
    assert reload_diff == 0.0, (name, reload_diff)
    greedy, gap, steps = greedy_run(loaded, ids)

    # The cached steps must agree with a cacheless forward over prompt + greedy ids (for
    # Gemma 3 this checks that the rotating cache and the prefill window mask agree).
    full_ids = mx.array(INPUT_IDS + greedy[:-1], dtype=mx.int32)
    full = loaded(full_ids[None])[0].astype(mx.float32)[len(INPUT_IDS) - 1 :]
    step_diff = mx.max(mx.abs(full - mx.stack(steps))).item()
    assert mx.argmax(full, axis=-1).tolist() == greedy, name
    routing = min(ROUTING_GAPS) if ROUTING_GAPS else None

    save_expected(d, ids, logits, greedy)
    size = sum(f.stat().st_size for f in d.iterdir())
    print(
        f"{name}: greedy {greedy} (smallest top-2 logit gap {gap:.4f}; max |logit| "
        f"{mx.max(mx.abs(logits)).item():.2f}; cached vs cacheless {step_diff:.1e}"
        + (f"; smallest routing gap {routing:.4f}" if routing is not None else "")
        + f"; {size} bytes)"
    )


def main():
    ensure_venv()
    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    only = parse_only()
    # Seed of each model: 1000 + its position in MODELS, whichever ones are generated.
    for seed, (name, config) in enumerate(MODELS.items()):
        if name not in only:
            continue
        if name in LEGACY:
            generate_legacy(name, config, 1000 + seed)
        else:
            generate_hf(name, config, 1000 + seed)


if __name__ == "__main__":
    main()
