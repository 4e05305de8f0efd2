#!/usr/bin/env python3
"""Golden fixtures for engine-mlx, made with the Python reference (mlx-lm on MLX's CPU backend).

For each architecture of the Llama family this builds a tiny random-weight model with
mlx-lm's own model classes, runs it on fixed token ids and writes, under
crates/engine-mlx/tests/fixtures/golden/<name>/:

  config.json             the Hugging Face config (with `quantization` for the q4 model)
  model.safetensors       the weights (fp16 for float models, so the files stay small; the
                          reference itself ran on exactly these values, upcast to fp32)
  tokenizer.json          a trivial word-level tokenizer (the engine needs one to load)
  expected.safetensors    `input_ids` (int32 [L]), `logits` (fp32 [L, vocab], every position)
                          and `greedy` (int32 [16]: greedy continuation with a KV cache)

Regenerate, never edit by hand:

  python3 crates/engine-mlx/scripts/golden.py [--venv DIR]

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
}

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


def main():
    ensure_venv()
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import _get_classes

    mx.set_default_device(mx.cpu)
    for seed, (name, config) in enumerate(MODELS.items()):
        mx.random.seed(1000 + seed)
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
        cache = make_prompt_cache(model)
        step_logits = model(ids[None], cache=cache)
        greedy = []
        gap = float("inf")
        for _ in range(GREEDY_STEPS):
            last = step_logits[0, -1]
            tok = mx.argmax(last).item()
            top2 = mx.sort(last)[-2:]
            gap = min(gap, (top2[1] - top2[0]).item())
            greedy.append(tok)
            step_logits = model(mx.array([[tok]], dtype=mx.int32), cache=cache)

        d = OUT / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
        mx.save_safetensors(str(d / "model.safetensors"), weights, metadata={"format": "mlx"})
        write_tokenizer(d / "tokenizer.json", config["vocab_size"])
        mx.save_safetensors(
            str(d / "expected.safetensors"),
            {
                "input_ids": ids,
                "logits": logits,
                "greedy": mx.array(greedy, dtype=mx.int32),
            },
            metadata={"generator": "crates/engine-mlx/scripts/golden.py", "pins": " ".join(PINNED)},
        )
        print(f"{name}: greedy {greedy} (smallest top-2 logit gap {gap:.4f})")


if __name__ == "__main__":
    main()
