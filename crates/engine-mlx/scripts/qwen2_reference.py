#!/usr/bin/env python3
"""Float reference for a Qwen2 GGUF (independent of the engine): numpy forward pass over the
weights dequantized with gguf-py's `gguf.quants.dequantize` (every type, to float32), NEOX
(rotate-half) RoPE, q/k/v biases, untied or tied LM head, greedy decoding with a KV cache.

The prompt comes on the command line as text (special tokens such as <|im_start|> are
recognised); it is tokenized with a `tokenizers` byte-level BPE built from the GGUF's own
vocabulary and merges with Qwen2's pre-tokenizer split. The script prints the prompt ids and
the greedy ids. Used once to produce the reference ids in crates/engine-mlx/tests/qwen_q4km.rs:

  python3 crates/engine-mlx/scripts/qwen2_reference.py MODEL.gguf "PROMPT" 32

It runs itself inside a virtual environment with pinned versions (default
.semantic-build/reference-venv).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

PINNED = ["gguf==0.19.0", "numpy==2.4.6", "tokenizers==0.23.3"]
ROOT = Path(__file__).resolve().parents[3]
VENV = ROOT / ".semantic-build" / "reference-venv"


def ensure_venv():
    if os.environ.get("QWEN_REF_IN_VENV") == "1":
        return
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
        subprocess.check_call([str(py), "-m", "pip", "install", "-q", *PINNED])
    env = dict(os.environ, QWEN_REF_IN_VENV="1")
    os.execve(str(py), [str(py), __file__, *sys.argv[1:]], env)


def main():
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    path, prompt, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    r = GGUFReader(path)

    def arr_str(k):
        f = r.fields[k]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def arr_int(k):
        f = r.fields[k]
        return [int(f.parts[i][0]) for i in f.data]

    tokens = arr_str("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in arr_str("tokenizer.ggml.merges")]
    ttype = arr_int("tokenizer.ggml.token_type")
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, ttype) if ty == 3]
    )
    ids = tok.encode(prompt, add_special_tokens=False).ids

    def kv(k):
        f = r.fields[k]
        return f.parts[f.data[0]].tolist()[0]

    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    L = kv(f"{arch}.block_count")
    D = kv(f"{arch}.embedding_length")
    H = kv(f"{arch}.attention.head_count")
    KVH = kv(f"{arch}.attention.head_count_kv")
    theta = kv(f"{arch}.rope.freq_base")
    eps = kv(f"{arch}.attention.layer_norm_rms_epsilon")
    hd = D // H
    W = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(x) for x in reversed(list(t.shape))]
        W[t.name] = a.reshape(shape)
    emb = W["token_embd.weight"]
    out_w = W.get("output.weight", emb)

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)

    def rope(x, pos):
        f = np.outer(pos, inv)
        c = np.cos(np.concatenate([f, f], -1))[:, None, :]
        s = np.sin(np.concatenate([f, f], -1))[:, None, :]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * c + np.concatenate([-x2, x1], -1) * s

    cache = [[None, None] for _ in range(L)]

    def lin(h, name):
        y = h @ W[name + ".weight"].T
        b = W.get(name + ".bias")
        return y + b if b is not None else y

    def forward(tok, start):
        x = emb[tok]
        T = len(tok)
        pos = np.arange(start, start + T)
        for i in range(L):
            p = f"blk.{i}."
            h = rms(x, W[p + "attn_norm.weight"])
            q = lin(h, p + "attn_q").reshape(T, H, hd)
            k = lin(h, p + "attn_k").reshape(T, KVH, hd)
            v = lin(h, p + "attn_v").reshape(T, KVH, hd)
            q, k = rope(q, pos), rope(k, pos)
            if cache[i][0] is not None:
                k = np.concatenate([cache[i][0], k])
                v = np.concatenate([cache[i][1], v])
            cache[i] = [k, v]
            S = k.shape[0]
            rep = H // KVH
            kk = np.repeat(k, rep, axis=1)
            vv = np.repeat(v, rep, axis=1)
            att = np.einsum("thd,shd->hts", q, kk) / np.sqrt(hd)
            mask = np.arange(S)[None, :] > pos[:, None]
            att = np.where(mask[None], -1e30, att)
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            o = np.einsum("hts,shd->thd", att, vv).reshape(T, H * hd)
            x = x + lin(o, p + "attn_output")
            h = rms(x, W[p + "ffn_norm.weight"])
            g = lin(h, p + "ffn_gate")
            u = lin(h, p + "ffn_up")
            x = x + lin((g / (1 + np.exp(-g))) * u, p + "ffn_down")
        return rms(x, W["output_norm.weight"]) @ out_w.T

    logits = forward(np.array(ids), 0)
    out = []
    margins = []
    for _ in range(steps):
        last = logits[-1]
        top2 = np.sort(last)[-2:]
        margins.append(float(top2[1] - top2[0]))
        nxt = int(np.argmax(last))
        out.append(nxt)
        logits = forward(np.array([nxt]), len(ids) + len(out) - 1)
    print(json.dumps({"prompt": ids, "greedy": out, "min_margin": min(margins)}))


if __name__ == "__main__":
    ensure_venv()
    main()
