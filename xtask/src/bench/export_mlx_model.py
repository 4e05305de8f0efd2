"""Export a llama-family GGUF to the Hugging Face layout that mlx-lm loads.

Written by `cargo xtask bench --peers` into .peers/ and run with the peers' venv python:

    python export_mlx_model.py MODEL.gguf OUT_DIR

OUT_DIR gets model.safetensors (float32: on MLX's CPU backend f32 with OpenBLAS is the
fastest format, f16/bf16 and quantized kernels are several times slower), config.json,
tokenizer.json (byte-level BPE rebuilt from the GGUF's vocabulary and merges) and
tokenizer_config.json (the GGUF's own chat template and special tokens), so mlx-lm sees
the same weights (dequantized), the same tokens and the same prompt text as the other
servers. Needs numpy, gguf, safetensors and tokenizers (pinned in xtask's peers.rs).
"""

import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors


def field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    if len(f.data) == 1 and len(f.types) == 1:
        part = f.parts[f.data[0]]
        if f.types[0].name == "STRING":
            return bytes(part).decode("utf-8")
        return part[0].item()
    return f


def str_array(reader, key):
    f = reader.fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def int_array(reader, key):
    f = reader.fields[key]
    return [int(f.parts[i][0]) for i in f.data]


def unpermute(w, n_heads):
    # llama.cpp stores Q and K rows permuted for interleaved rotary embedding.
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main():
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    r = GGUFReader(src)
    arch = field(r, "general.architecture")
    if arch != "llama":
        sys.exit(f"export_mlx_model.py: only llama-family GGUFs are supported, not {arch!r}")
    p = lambda k: field(r, f"llama.{k}")
    heads, kv_heads = int(p("attention.head_count")), int(p("attention.head_count_kv"))
    hidden = int(p("embedding_length"))
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    sub = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    tensors = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float32)
        a = a.reshape([int(x) for x in reversed(list(t.shape))])
        if t.name in names:
            name = names[t.name]
        else:
            _, i, s, _ = t.name.split(".")
            name = f"model.layers.{i}.{sub[s]}.weight"
            if s == "attn_q":
                a = unpermute(a, heads)
            elif s == "attn_k":
                a = unpermute(a, kv_heads)
        tensors[name] = np.ascontiguousarray(a)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})

    tokens = str_array(r, "tokenizer.ggml.tokens")
    bos, eos = int(field(r, "tokenizer.ggml.bos_token_id")), int(field(r, "tokenizer.ggml.eos_token_id"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": int(p("feed_forward_length")),
        "num_hidden_layers": int(p("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "vocab_size": len(tokens),
        "rope_theta": float(p("rope.freq_base") or 10000.0),
        "rms_norm_eps": float(p("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(p("context_length")),
        "tie_word_embeddings": "output.weight" not in {t.name for t in r.tensors},
        "hidden_act": "silu", "bos_token_id": bos, "eos_token_id": eos,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    merges = str_array(r, "tokenizer.ggml.merges")
    types = int_array(r, "tokenizer.ggml.token_type")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ", 1)) for m in merges],
                               unk_token=None, fuse_unk=False, byte_fallback=False))
    # The GGUF's pre-tokenizer "smollm": digits one by one, then GPT-2 byte-level.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    tok.save(os.path.join(out, "tokenizer.json"))
    unk = field(r, "tokenizer.ggml.unknown_token_id")
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[bos], "eos_token": tokens[eos],
        "unk_token": tokens[int(unk)] if unk is not None else None,
        "pad_token": tokens[eos], "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": config["max_position_embeddings"],
        "chat_template": field(r, "tokenizer.chat_template"),
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": bos, "eos_token_id": eos}, f, indent=2)
    print(f"exported {len(tensors)} tensors (float32) and the tokenizer to {out}")


if __name__ == "__main__":
    main()
