#!/usr/bin/env python3
"""Float reference for a Gemma 3 (`gemma3`) GGUF, independent of the engine: numpy float32 forward
pass over the weights dequantized with gguf-py's `gguf.quants.dequantize` (every type, to
float32), greedy decoding with a KV cache. Tokenization: the SentencePiece tokenizer built from
the GGUF by spm_reference.py (control tokens written in the prompt become their ids, as llama.cpp
does with parse_special), BOS prepended when `tokenizer.ggml.add_bos_token` is true.

  python3 crates/engine-mlx/scripts/gemma3_reference.py MODEL.gguf "PROMPT" 32
      prints JSON: prompt ids, greedy ids, the top-5 [id, logit] of the first generated position
  python3 crates/engine-mlx/scripts/gemma3_reference.py MODEL.gguf --fixture OUT.json
      writes crates/engine-mlx/tests/fixtures/gemma3_270m_reference.json (the three cases below)
  options: --bf16-embed-scale (mlx-lm's rounding, see 1.), --window-delta N (mask experiments)

The forward pass, as established from mlx-lm (mlx_lm/models/gemma3_text.py), HF transformers
(Gemma3 modeling, masking_utils) and llama.cpp (src/models/gemma3.cpp, llama-model.cpp,
llama-hparams.cpp), and checked on gemma-3-270m Q4_K_M:

1. x = token_embd[ids] * sqrt(hidden_size). llama.cpp scales by sqrtf(n_embd) in float32
   (25.298222 for 640); mlx-lm (and HF, which casts the scale to the weights' dtype) round the
   scalar to bf16 first (25.25 for 640, -0.19%). This script follows llama.cpp's plain sqrt;
   --bf16-embed-scale switches to 25.25. Measured on 270M Q4_K_M: the bf16 scalar moves the
   first-position logits by at most 0.014 / 0.038 / 0.021 (max abs over the whole vocabulary;
   the fixture's capital / fibonacci / long prompts) and changes no greedy token of the fixture.
2. RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w, eps = gemma3.attention.layer_norm_rms_epsilon,
   with w taken from the file as it is. Gemma's checkpoints store w - 1 (the model computes
   x * (1 + w)); llama.cpp's converter adds the 1 when writing the GGUF, so the file already
   holds the multiplier. Verified on the file: every one of the 55,936 norm values minus 1 is
   exactly a bf16 number (only 75% are as stored), i.e. the file holds 1 + w_bf16 computed in
   float32. (On 270M the multipliers are not near 1: means of 2 to 26, some up to 741.) llama.cpp
   uses x * w with no further shift.
3. Per layer (18 on 270M):
     h = x + post_attention_norm(attn(attn_norm(x)))
     x = h + post_ffw_norm(ffn_down(gelu_tanh(ffn_gate(ffn_norm(h))) * ffn_up(ffn_norm(h))))
   GeGLU with the tanh approximation of GELU (HF gelu_pytorch_tanh, mlx-lm gelu_approx,
   llama.cpp LLM_FFN_GELU + LLM_FFN_PAR). Tensor names: attn_norm = input_layernorm,
   post_attention_norm, ffn_norm = pre_feedforward_layernorm, post_ffw_norm.
4. Attention: q = attn_q(h) as heads of key_length (256), k/v = attn_k/attn_v(h) (GQA, 4 q heads
   share 1 kv head on 270M); q_norm / k_norm = RMSNorm over each head's 256 values with
   attn_q_norm / attn_k_norm, then RoPE on q and k. NEOX (rotate-half: dims i and i + 128 form a
   pair) over the whole head, inv_freq_i = base^(-2i/256).
5. Scores scaled by 1/sqrt(key_length) = 1/16 (llama.cpp's f_attention_scale for every gemma3
   size except 27B, which uses 1/sqrt(n_embd/n_head); mlx-lm/HF use query_pre_attn_scalar^-0.5
   with query_pre_attn_scalar = 256 in the 270M config: the same 1/16). The GGUF has no key for
   it. No attention logit softcapping (gemma3 has none; the script fails if the file has
   gemma3.attn_logit_softcapping).
6. Layer kinds: no GGUF key gives the pattern; llama.cpp hard-codes set_swa_pattern(6) for
   gemma3 when gemma3.attention.sliding_window is present and > 0: layer il is sliding iff
   il % 6 < 5, so layers 5, 11, 17 are global (full causal) and the other 15 are sliding.
   mlx-lm's (i + 1) % sliding_window_pattern != 0 with pattern 6 gives the same.
7. Sliding window W = gemma3.attention.sliding_window (512): query at position p sees keys at
   positions p-W+1 .. p (W keys, itself included). llama.cpp masks when p - k >= W
   (llama_hparams::is_masked_swa, LLAMA_SWA_TYPE_STANDARD); HF keeps kv_idx > q_idx - W; mlx-lm
   keeps q < k + W. All three agree. Global layers see 0 .. p. Measured: a window one key
   wider or narrower moves the long (765-token) case's first-position logits by at most 0.029
   (max abs) without changing its greedy tokens, so a test that wants to catch that off-by-one
   must compare logits to better than ~0.01, not greedy ids.
8. RoPE base: 10000 for sliding layers (llama.cpp rope_freq_base_train_swa, HF/mlx-lm
   rope_local_base_freq), gemma3.rope.freq_base (1e6) for global layers. Linear rope scaling
   (gemma3.rope.scaling.type = linear, .factor; used by the 4B+ checkpoints) applies to global
   layers only (llama.cpp keeps rope_freq_scale_train_swa = 1); the 270M file has no scaling key.
9. Final RMSNorm (output_norm), logits = x @ token_embd^T (tied head; output.weight is used if
   the file has one). No final logit softcapping: gemma3 has none (llama.cpp applies
   gemma3.final_logit_softcapping only for the non-SWA variant and only if the key exists; the
   270M file has none).
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spm_reference  # noqa: E402  (same directory; shares the pinned venv)


def long_prompt():
    """A fixed > 600-token English text (numbers vary, so it is not periodic)."""
    towns = ["Millbrook", "Ashford", "Cedar Falls", "Dunmore", "Elmstead", "Fairhaven", "Glenrock"]
    trades = ["bakers", "smiths", "weavers", "millers", "coopers", "masons", "tanners"]
    parts = []
    for i in range(1, 15):
        parts.append(
            f"In {1800 + 13 * i}, the town of {towns[i % 7]} had {120 + 37 * i} houses, "
            f"{3 + (i * 5) % 11} {trades[(i * 3) % 7]} and a library of {250 + 113 * i * i} books; "
            f"its river rose {i % 4 + 1} times that year, and the council met on day {(i * 29) % 365 + 1}."
        )
    return " ".join(parts) + " Looking back at these records, the most remarkable change was"


CASES = [
    ("capital", "The capital of France is", 32),
    ("fibonacci", "def fibonacci(n):\n", 32),
    ("long", long_prompt(), 16),
]


class Gemma3:
    def __init__(self, path, bf16_embed_scale=False, window_delta=0):
        import numpy as np
        from gguf import GGUFReader
        from gguf.quants import dequantize

        self.np = np
        r = GGUFReader(path)
        self.reader = r
        f = r.fields

        def kv(k, default=None):
            return f[k].contents() if k in f else default

        arch = kv("general.architecture")
        assert arch == "gemma3", arch
        for k in ("attn_logit_softcapping",):
            assert f"{arch}.{k}" not in f, f"{k} is not implemented"
        self.softcap = kv(f"{arch}.final_logit_softcapping")
        self.L = kv(f"{arch}.block_count")
        self.D = kv(f"{arch}.embedding_length")
        self.H = kv(f"{arch}.attention.head_count")
        self.KVH = kv(f"{arch}.attention.head_count_kv")
        self.hd = kv(f"{arch}.attention.key_length", self.D // self.H)
        assert kv(f"{arch}.attention.value_length", self.hd) == self.hd
        self.eps = kv(f"{arch}.attention.layer_norm_rms_epsilon")
        self.window = kv(f"{arch}.attention.sliding_window", 0)
        self.window_delta = window_delta
        self.theta_global = kv(f"{arch}.rope.freq_base", 1e6)
        self.theta_local = 10000.0
        scaling = kv(f"{arch}.rope.scaling.type", "none")
        assert scaling in ("none", "linear"), scaling
        self.rope_scale = 1.0 / kv(f"{arch}.rope.scaling.factor", 1.0) if scaling == "linear" else 1.0
        # llama.cpp's f_attention_scale: 1/sqrt(n_embd/n_head) for 27B (62 layers), else 1/sqrt(hd)
        self.attn_scale = 1.0 / np.sqrt(self.D / self.H if self.L == 62 else self.hd)
        # llama.cpp's set_swa_pattern(6): sliding iff il % 6 < 5 (no sliding layers without a window)
        self.sliding = [self.window > 0 and il % 6 < 5 for il in range(self.L)]
        scale = np.float32(np.sqrt(self.D))
        if bf16_embed_scale:
            b = np.array([np.sqrt(self.D)], dtype=np.float32).view(np.uint32)
            b = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)  # round to nearest even
            scale = b.view(np.float32)[0]
        self.embed_scale = scale

        W = {}
        for t in r.tensors:
            a = dequantize(t.data, t.tensor_type).astype(np.float32)
            W[t.name] = a.reshape([int(x) for x in reversed(list(t.shape))])
        self.W = W
        self.emb = W["token_embd.weight"]
        self.out_w = W.get("output.weight", self.emb)
        self.norm_check = self._check_norms()
        self.vocab = spm_reference.Vocab(r)
        self.sp = spm_reference.build_sentencepiece(self.vocab)
        self.reset()

    def _check_norms(self):
        """Counts norm values for which value - 1 is exactly a bf16 number (see docstring 2.)."""
        np = self.np
        n = exact = exact_minus1 = 0
        for name, a in self.W.items():
            if name.endswith("norm.weight"):
                n += a.size
                exact += int(((a.view(np.uint32) & 0xFFFF) == 0).sum())
                m = (a - np.float32(1)).astype(np.float32)
                exact_minus1 += int(((m.view(np.uint32) & 0xFFFF) == 0).sum())
        return {"values": n, "bf16_exact": exact, "bf16_exact_minus_1": exact_minus1}

    def tokenize(self, text):
        ids = spm_reference.encode_special(self.sp, self.vocab, text)
        return ([self.vocab.bos_id] if self.vocab.add_bos else []) + ids

    def reset(self):
        self.cache = [[None, None] for _ in range(self.L)]
        self.pos = 0

    def rms(self, x, w):
        np = self.np
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(self.eps)) * w

    def rope(self, x, pos, base, scale):
        np = self.np
        hd = self.hd
        inv = 1.0 / base ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
        f = np.outer(pos.astype(np.float64) * scale, inv)
        c = np.cos(np.concatenate([f, f], -1)).astype(np.float32)[:, None, :]
        s = np.sin(np.concatenate([f, f], -1)).astype(np.float32)[:, None, :]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * c + np.concatenate([-x2, x1], -1) * s

    def forward(self, tokens):
        """Appends `tokens` to the sequence; returns the logits of the last position."""
        np = self.np
        W, H, KVH, hd = self.W, self.H, self.KVH, self.hd
        T = len(tokens)
        pos = np.arange(self.pos, self.pos + T)
        x = self.emb[np.array(tokens)] * self.embed_scale
        for i in range(self.L):
            p = f"blk.{i}."
            sliding = self.sliding[i]
            h = self.rms(x, W[p + "attn_norm.weight"])
            q = (h @ W[p + "attn_q.weight"].T).reshape(T, H, hd)
            k = (h @ W[p + "attn_k.weight"].T).reshape(T, KVH, hd)
            v = (h @ W[p + "attn_v.weight"].T).reshape(T, KVH, hd)
            q = self.rms(q, W[p + "attn_q_norm.weight"])
            k = self.rms(k, W[p + "attn_k_norm.weight"])
            base = self.theta_local if sliding else self.theta_global
            scale = 1.0 if sliding else self.rope_scale
            q, k = self.rope(q, pos, base, scale), self.rope(k, pos, base, scale)
            if self.cache[i][0] is not None:
                k = np.concatenate([self.cache[i][0], k])
                v = np.concatenate([self.cache[i][1], v])
            self.cache[i] = [k, v]
            S = k.shape[0]
            kpos = np.arange(S)[None, :]
            masked = kpos > pos[:, None]
            if sliding:
                # keys p-W+1 .. p visible (window_delta only for experiments)
                masked |= pos[:, None] - kpos >= self.window + self.window_delta
            rep = H // KVH
            kk = np.repeat(k, rep, axis=1)
            vv = np.repeat(v, rep, axis=1)
            att = np.einsum("thd,shd->hts", q * np.float32(self.attn_scale), kk)
            att = np.where(masked[None], np.float32(-np.inf), att)
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            o = np.einsum("hts,shd->thd", att, vv).reshape(T, H * hd)
            o = o @ W[p + "attn_output.weight"].T
            x = x + self.rms(o, W[p + "post_attention_norm.weight"])
            h = self.rms(x, W[p + "ffn_norm.weight"])
            g = h @ W[p + "ffn_gate.weight"].T
            u = h @ W[p + "ffn_up.weight"].T
            gelu = 0.5 * g * (1.0 + np.tanh(np.float32(np.sqrt(2.0 / np.pi)) * (g + np.float32(0.044715) * g * g * g)))
            d = (gelu * u) @ W[p + "ffn_down.weight"].T
            x = x + self.rms(d, W[p + "post_ffw_norm.weight"])
        self.pos += T
        last = self.rms(x[-1:], W["output_norm.weight"])
        logits = (last @ self.out_w.T)[0]
        if self.softcap:
            logits = np.tanh(logits / self.softcap) * self.softcap
        return logits

    def greedy(self, ids, steps):
        np = self.np
        self.reset()
        logits = self.forward(ids)
        first = logits
        out, margins = [], []  # margins[s]: top-1 minus top-2 logit before choosing out[s]
        for s in range(steps):
            top2 = np.sort(logits)[-2:]
            margins.append(float(top2[1] - top2[0]))
            nxt = int(np.argmax(logits))
            out.append(nxt)
            if s + 1 < steps:
                logits = self.forward([nxt])
        top = np.argsort(-first)[:5]
        return {
            "prompt_ids": ids,
            "greedy_ids": out,
            "top5": [[int(i), round(float(first[i]), 4)] for i in top],
            "min_margin": round(min(margins), 4),
            "min_margin_step": int(np.argmin(margins)),
            "greedy_text": self.sp.decode(out),
            "first_logits": first,
        }


def main():
    import numpy as np

    args = sys.argv[1:]
    bf16 = "--bf16-embed-scale" in args
    args = [a for a in args if a != "--bf16-embed-scale"]
    delta = 0
    if "--window-delta" in args:
        j = args.index("--window-delta")
        delta = int(args[j + 1])
        del args[j : j + 2]
    path = args[0]
    m = Gemma3(path, bf16_embed_scale=bf16, window_delta=delta)
    print(
        f"layers {m.L}, sliding {[i for i in range(m.L) if m.sliding[i]]}, window {m.window}, "
        f"attn scale {m.attn_scale}, embed scale {m.embed_scale!r}, rope {m.theta_local}/"
        f"{m.theta_global} x{m.rope_scale}, softcap {m.softcap}, norms {m.norm_check}",
        file=sys.stderr,
    )
    if args[1] != "--fixture":
        r = m.greedy(m.tokenize(args[1]), int(args[2]))
        r.pop("first_logits")
        print(json.dumps(r, ensure_ascii=False))
        return

    out_path = args[2]
    cases = []
    for name, text, steps in CASES:
        ids = m.tokenize(text)
        r = m.greedy(ids, steps)
        r.pop("first_logits")
        print(name, len(ids), "tokens:", json.dumps(r["greedy_text"], ensure_ascii=False), file=sys.stderr)
        cases.append({"name": name, "text": text, "steps": steps, **r})
    fixture = {
        "about": (
            "Greedy references for Gemma 3 270M Q4_K_M from crates/engine-mlx/scripts/"
            "gemma3_reference.py: numpy float32 forward pass over the dequantized weights, "
            "embedding scale sqrt(640) in float32 (llama.cpp's), sliding layers see keys "
            "p-511..p, layers 5/11/17 global. prompt_ids include BOS. top5 = the 5 largest "
            "logits [id, logit] of the first generated position; min_margin = the smallest "
            "top-1 minus top-2 logit gap over the greedy steps, at greedy index min_margin_step "
            "(an implementation that rounds activations may flip a choice there)."
        ),
        "model_file": os.path.basename(path),
        "model_sha256": spm_reference.sha256_file(path),
        "embed_scale": float(m.embed_scale),
        "cases": cases,
    }
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(spm_reference.compact_json(fixture))


if __name__ == "__main__":
    spm_reference.ensure_venv(__file__)
    main()
