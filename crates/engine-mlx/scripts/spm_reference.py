#!/usr/bin/env python3
"""Reference tokenizer for GGUF SentencePiece vocabularies (`tokenizer.ggml.model == "llama"`),
independent of the engine. Used to write crates/engine-mlx/tests/fixtures/tokenizer/gemma3_spm.json:

  python3 crates/engine-mlx/scripts/spm_reference.py MODEL.gguf OUT.json

Three implementations, compared on every case (the script fails if any two disagree):

1. `sentencepiece` (the pinned PyPI package, Google's C++ implementation). A ModelProto is built
   from the GGUF alone:
   - pieces from `tokenizer.ggml.tokens` / `scores` / `token_type`, in id order. GGUF token types
     are SentencePiece's own enum (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
     6 byte) and are kept, with two adjustments:
       * the piece at `tokenizer.ggml.unknown_token_id` becomes UNKNOWN (llama.cpp's converter
         writes Gemma's <unk> as CONTROL; SentencePiece needs exactly one UNKNOWN piece);
       * in USER_DEFINED pieces ' ' becomes '▁' (U+2581). llama.cpp's converter "pre-normalizes"
         user-defined pieces by turning '▁' into ' ' because llama.cpp matches them against the
         raw text; SentencePiece matches them against the normalized text, where every space is
         already '▁'. (Gemma 3 has user-defined runs of 2..31 spaces: ids 138..167.)
   - trainer_spec: model_type BPE, byte_fallback true (the file has the 256 <0xXX> pieces),
     unk/bos/eos/pad ids from the GGUF.
   - normalizer_spec: name "identity" with no precompiled charsmap (no NFKC), add_dummy_prefix =
     `tokenizer.ggml.add_space_prefix` (false for Gemma 3), remove_extra_whitespaces false (no
     whitespace collapsing), escape_whitespaces true (' ' -> '▁').
   SentencePiece's BPE encoder starts from characters (user-defined pieces matched longest-first
   and frozen), repeatedly merges the adjacent pair whose concatenation is a NORMAL /
   USER_DEFINED / UNUSED piece with the highest score (ties: leftmost), and falls back to the
   UTF-8 bytes <0xXX> for characters that are not pieces.

2. A Python transcription of llama.cpp's SPM path (llama-vocab.cpp: tokenizer_st_partition,
   then llm_tokenizer_spm_session per text fragment): special tokens (attr CONTROL |
   USER_DEFINED | UNKNOWN, longest text first) are cut out of the raw text first, CONTROL and
   UNKNOWN ones only when parse_special is true (llama-server, llama-cli and llama-completion
   pass parse_special = true for prompts); USER_DEFINED ones always. Each remaining fragment gets
   ' ' prepended when add_space_prefix is set and it follows a special token or starts the text,
   ' ' -> '▁', then the same score-ordered pair merging (ties: leftmost), except that llama.cpp
   accepts a merge into any vocabulary entry (any type) and emits <0xXX> bytes for leftovers.

3. HF `tokenizers` (pinned): a BPE model with byte_fallback whose merges are derived from the
   scores the way transformers' SentencePieceExtractor does (for each normal piece, every split
   into two normal pieces, ordered by the merged piece's score, then by the ids of the halves),
   a Replace(' ', '▁') normalizer, no pre-tokenizer, control tokens as special added tokens and
   user-defined tokens as non-special added tokens (both matched on the raw text).

SentencePiece itself never splits control tokens out of text (it encodes "<start_of_turn>" as
plain characters). The fixture's `control_tokens` case therefore shows llama.cpp's
parse_special = true behaviour: the text is split on the control-token strings first (longest
first, leftmost occurrence), each piece between them is encoded by SentencePiece, and the
control-token ids are put in between (`encode_special` below). `ids_parse_special_false` in the
fixture gives what llama.cpp produces with parse_special = false (control tokens as text).

Ids in the fixture never include BOS: a model with `tokenizer.ggml.add_bos_token` true (Gemma 3)
gets `bos_id` prepended by llama.cpp's tokenize(add_special = true).

It runs itself inside a virtual environment with pinned versions (default
.semantic-build/gemma-reference-venv, shared with gemma3_reference.py).
"""

import heapq
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

PINNED = [
    "gguf==0.19.0",
    "numpy==2.4.6",
    "tokenizers==0.23.3",
    "sentencepiece==0.2.1",
    "protobuf==6.33.6",
    "regex==2026.11.19",
]
ROOT = Path(__file__).resolve().parents[3]
VENV = ROOT / ".semantic-build" / "gemma-reference-venv"

# GGUF token types (gguf-py TokenType) == SentencePiece ModelProto.SentencePiece.Type values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def ensure_venv(script):
    """Re-executes `script` with the venv's python (created with the pinned versions)."""
    if os.environ.get("GEMMA_REF_IN_VENV") == "1":
        return
    py = VENV / "bin" / "python"
    stamp = VENV / "pinned.txt"
    want = "\n".join(PINNED)
    if not py.exists():
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    if not stamp.exists() or stamp.read_text() != want:
        subprocess.check_call([str(py), "-m", "pip", "install", "-q", *PINNED])
        stamp.write_text(want)
    env = dict(os.environ, GEMMA_REF_IN_VENV="1")
    os.execve(str(py), [str(py), script, *sys.argv[1:]], env)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class Vocab:
    """The tokenizer part of a GGUF's metadata."""

    def __init__(self, reader):
        f = reader.fields

        def scalar(k, default=None):
            if k not in f:
                return default
            v = f[k].contents()
            return v

        assert scalar("tokenizer.ggml.model") == "llama", scalar("tokenizer.ggml.model")
        tf = f["tokenizer.ggml.tokens"]
        self.tokens = [bytes(tf.parts[i]).decode("utf-8") for i in tf.data]
        sf = f["tokenizer.ggml.scores"]
        self.scores = [float(sf.parts[i][0]) for i in sf.data]
        yf = f["tokenizer.ggml.token_type"]
        self.types = [int(yf.parts[i][0]) for i in yf.data]
        self.bos_id = scalar("tokenizer.ggml.bos_token_id")
        self.eos_id = scalar("tokenizer.ggml.eos_token_id")
        self.unk_id = scalar("tokenizer.ggml.unknown_token_id")
        self.pad_id = scalar("tokenizer.ggml.padding_token_id", -1)
        self.add_bos = bool(scalar("tokenizer.ggml.add_bos_token", True))
        self.add_eos = bool(scalar("tokenizer.ggml.add_eos_token", False))
        self.add_space_prefix = bool(scalar("tokenizer.ggml.add_space_prefix", True))
        self.token_to_id = {t: i for i, t in enumerate(self.tokens)}
        assert len(self.token_to_id) == len(self.tokens), "duplicate pieces"

    def control_tokens(self):
        return [i for i, t in enumerate(self.types) if t == CONTROL or i == self.unk_id]


def build_sentencepiece(v):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    for i, (text, score, ty) in enumerate(zip(v.tokens, v.scores, v.types)):
        p = m.pieces.add()
        if i == v.unk_id:
            ty = UNKNOWN
        if ty == USER_DEFINED:
            text = text.replace(" ", "\u2581")
        p.piece = text
        p.score = score
        p.type = ty
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(v.tokens)
    ts.byte_fallback = True
    ts.unk_id = v.unk_id
    ts.bos_id = v.bos_id if v.bos_id is not None else -1
    ts.eos_id = v.eos_id if v.eos_id is not None else -1
    ts.pad_id = v.pad_id if v.pad_id is not None else -1
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.precompiled_charsmap = b""
    ns.add_dummy_prefix = v.add_space_prefix
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(m.SerializeToString())
    assert sp.GetPieceSize() == len(v.tokens)
    return sp


def split_on(text, specials):
    """llama.cpp's tokenizer_st_partition: for each special token, longest text first, cut every
    occurrence out of the raw fragments left so far. Returns [str | int] (text or token id)."""
    frags = [text] if text else []
    for tid, st in specials:
        out = []
        for fr in frags:
            if isinstance(fr, int):
                out.append(fr)
                continue
            start = 0
            while True:
                j = fr.find(st, start)
                if j < 0:
                    break
                if j > start:
                    out.append(fr[start:j])
                out.append(tid)
                start = j + len(st)
            if start < len(fr):
                out.append(fr[start:])
        frags = out
    return frags


def specials_sorted(v, types):
    ids = [i for i, t in enumerate(v.types) if t in types or (UNKNOWN in types and i == v.unk_id)]
    ids.sort(key=lambda i: -len(v.tokens[i].encode("utf-8")))  # Python's sort is stable
    return [(i, v.tokens[i]) for i in ids]


def encode_special(sp, v, text):
    """Control tokens written in the text become their ids (llama.cpp's parse_special = true);
    the text around them is encoded by SentencePiece."""
    out = []
    for fr in split_on(text, specials_sorted(v, {CONTROL, UNKNOWN})):
        if isinstance(fr, int):
            out.append(fr)
        else:
            out.extend(sp.encode(fr, out_type=int))
    return out


def llama_cpp_spm(v, text, parse_special):
    """Transcription of llama.cpp's SPM tokenization (see the module docstring)."""
    kinds = {USER_DEFINED} | ({CONTROL, UNKNOWN} if parse_special else set())
    out = []
    prev_special = True
    for fr in split_on(text, specials_sorted(v, kinds)):
        if isinstance(fr, int):
            out.append(fr)
            prev_special = True
            continue
        s = (" " if v.add_space_prefix and prev_special else "") + fr
        s = s.replace(" ", "\u2581")
        out.extend(_spm_merge(v, s))
        prev_special = False
    return out


def _spm_merge(v, s):
    syms = list(s)  # one symbol per code point (llama.cpp splits on UTF-8 sequence lengths)
    n = len(syms)
    text = syms[:]
    prev = list(range(-1, n - 1))
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    alive = [True] * n
    heap = []

    def add(left, right):
        if left < 0 or right < 0:
            return
        t = text[left] + text[right]
        tid = v.token_to_id.get(t)
        if tid is None:
            return
        heapq.heappush(heap, (-v.scores[tid], left, right, t))

    for i in range(1, n):
        add(i - 1, i)
    while heap:
        _, left, right, t = heapq.heappop(heap)
        if not alive[left] or not alive[right] or text[left] + text[right] != t:
            continue
        text[left] = t
        alive[right] = False
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        add(prev[left], left)
        add(left, nxt[left])
    out = []
    i = 0 if n else -1
    while i != -1:
        tid = v.token_to_id.get(text[i])
        if tid is not None:
            out.append(tid)
        else:
            out.extend(v.token_to_id["<0x%02X>" % b] for b in text[i].encode("utf-8"))
        i = nxt[i]
    return out


def build_hf(v):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    normal = {t: i for i, (t, ty) in enumerate(zip(v.tokens, v.types)) if ty == NORMAL}
    merges = []
    for t, i in normal.items():
        local = []
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in normal and b in normal:
                local.append((normal[a], normal[b], a, b))
        local.sort()
        merges.extend((-v.scores[i], i, a, b) for _, _, a, b in local)
    merges.sort(key=lambda m: (m[0], m[1]))  # stable: keeps the halves' order within a piece
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(v.tokens)},
            merges=[(a, b) for _, _, a, b in merges],
            fuse_unk=True,
            byte_fallback=True,
            unk_token=v.tokens[v.unk_id],
        )
    )
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    added = []
    for i, ty in enumerate(v.types):
        if ty == CONTROL or i == v.unk_id:
            added.append(AddedToken(v.tokens[i], special=True, normalized=False))
        elif ty == USER_DEFINED:
            added.append(AddedToken(v.tokens[i], special=False, normalized=False))
    tok.add_tokens(added)
    # added tokens must keep their GGUF ids: they are all in the vocabulary already
    for i, ty in enumerate(v.types):
        if ty in (CONTROL, USER_DEFINED) or i == v.unk_id:
            assert tok.token_to_id(v.tokens[i]) == i, (i, v.tokens[i])
    return tok, len(merges)


PYTHON_CODE = (
    "def fibonacci(n):\n"
    '    """Return the n-th Fibonacci number."""\n'
    "    a, b = 0, 1\n"
    "    for _ in range(n):   \n"
    "        a, b = b, a + b\n"
    "\n"
    "\n"
    "\n"
    "    return a\n"
    "\n"
    "if __name__ == '__main__':\n"
    "\tprint([fibonacci(i) for i in range(10)])  # tab-indented\n"
)
RUST_CODE = (
    "use std::collections::HashMap;\n"
    "\n"
    "fn main() {\n"
    "    let mut counts: HashMap<&str, usize> = HashMap::new();\n"
    "    for word in \"a b a\".split_whitespace() {\n"
    "        *counts.entry(word).or_insert(0) += 1;  \n"
    "    }\n"
    "\t\tprintln!(\"{:?}\", counts); // two tabs\n"
    "}\n"
)
CASES = [
    ("english", "Hello, world! The quick brown fox jumps over the lazy dog."),
    ("german", "Grüße aus München: Äpfel, Öl und Übermut – schön, größer, weiß."),
    ("french", "Où est l'hôpital ? À bientôt, garçon ; déjà vu, naïve, cœur, Noël."),
    ("chinese", "你好，世界！我们今天学习机器学习和自然语言处理。"),
    ("japanese", "こんにちは、世界。東京は日本の首都です。カタカナとひらがな。"),
    ("russian", "Привет, мир! Съешь же ещё этих мягких французских булок, да выпей чаю."),
    ("arabic", "مرحبا بالعالم! كيف حالك اليوم؟"),
    ("emoji", "Emoji: 😀 👍🏽 👨\u200d👩\u200d👧\u200d👦 🏳️\u200d🌈 🇫🇷🇯🇵 ❤️ 🤖✨ 🫠"),
    ("python", PYTHON_CODE),
    ("rust", RUST_CODE),
    ("numbers", "Numbers: 0 7 42 3.14159 -17 1,234,567.89 1e-9 0xFF 2024-06-01 12:30:45 100% ½"),
    ("spaces", "a b  c   d    e" + " " * 40 + "end\n   leading and trailing   \n \n  \t \t"),
    ("byte_fallback", "Rare: 🧌 𠀋 ䷀ ꓐ ᚠ, e\u0301 (combining), zero\u200bwidth, soft\u00adhyphen."),
    ("leading_space", " Hello there,  friend "),
    ("html", "<table><tr><td>1</td></tr></table> <b>bold</b> <h1>T</h1>"),
]
SPECIAL_TEXT = "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"


def compact_json(obj, indent=0):
    """Indented JSON with each list of scalars (or of lists of scalars) on one line."""
    pad = " " * indent

    def flat(x):
        return not isinstance(x, (dict, list)) or (
            isinstance(x, list) and all(not isinstance(y, (dict, list)) for y in x)
        )

    if isinstance(obj, dict):
        items = [
            f'{pad} {json.dumps(k)}: {compact_json(v, indent + 1).lstrip()}' for k, v in obj.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}" if indent else (
            "{\n" + ",\n".join(items) + "\n}\n"
        )
    if isinstance(obj, list) and not all(flat(x) for x in obj):
        items = [pad + " " + compact_json(x, indent + 1).lstrip() for x in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def main():
    from gguf import GGUFReader

    path, out_path = sys.argv[1], sys.argv[2]
    v = Vocab(GGUFReader(path))
    sp = build_sentencepiece(v)
    hf, n_merges = build_hf(v)
    print(f"vocab {len(v.tokens)}, {n_merges} derived merges", file=sys.stderr)

    whole = "\n".join(t for _, t in CASES)
    cases = CASES + [("whole", whole)]
    disagreements = []
    out_cases = []
    for name, text in cases:
        ids = sp.encode(text, out_type=int)
        dec = sp.decode(ids)
        lcpp = llama_cpp_spm(v, text, parse_special=True)
        h = hf.encode(text, add_special_tokens=False)
        for other, oids in (("llama.cpp-transcription", lcpp), ("tokenizers", h.ids)):
            if oids != ids:
                disagreements.append((name, other, ids, oids))
        if dec != text:
            disagreements.append((name, "sentencepiece-decode", text, dec))
        if hf.decode(ids, skip_special_tokens=False) != text:
            disagreements.append((name, "tokenizers-decode", text, hf.decode(ids)))
        case = {"name": name, "text": text, "ids": ids, "decoded": dec}
        if name != "whole":
            case["pieces"] = [v.tokens[i] for i in ids]  # the GGUF's token texts
        out_cases.append(case)

    # control tokens written in the text
    ids = encode_special(sp, v, SPECIAL_TEXT)
    lcpp = llama_cpp_spm(v, SPECIAL_TEXT, parse_special=True)
    h = hf.encode(SPECIAL_TEXT, add_special_tokens=False).ids
    for other, oids in (("llama.cpp-transcription", lcpp), ("tokenizers", h)):
        if oids != ids:
            disagreements.append(("control_tokens", other, ids, oids))
    plain_sp = sp.encode(SPECIAL_TEXT, out_type=int)
    plain_lcpp = llama_cpp_spm(v, SPECIAL_TEXT, parse_special=False)
    if plain_sp != plain_lcpp:
        disagreements.append(("control_tokens parse_special=false", "llama.cpp-transcription", plain_sp, plain_lcpp))
    dec_runs = []
    for i in ids:  # decode runs of ordinary ids together (bytes may span ids)
        if v.types[i] == CONTROL:
            dec_runs.append(v.tokens[i])
        elif dec_runs and isinstance(dec_runs[-1], list):
            dec_runs[-1].append(i)
        else:
            dec_runs.append([i])
    dec = "".join(r if isinstance(r, str) else sp.decode(r) for r in dec_runs)
    assert dec == SPECIAL_TEXT, dec
    out_cases.append(
        {
            "name": "control_tokens",
            "text": SPECIAL_TEXT,
            "parse_special": True,
            "ids": ids,
            "pieces": [v.tokens[i] for i in ids],
            "decoded": dec,
            "ids_parse_special_false": plain_sp,
        }
    )

    for d in disagreements:
        print("DISAGREEMENT", json.dumps(d, ensure_ascii=False), file=sys.stderr)
    fixture = {
        "about": (
            "Reference ids for the Gemma 3 SentencePiece vocabulary, written by "
            "crates/engine-mlx/scripts/spm_reference.py from the GGUF's own tokenizer metadata "
            "(sentencepiece, a transcription of llama.cpp's SPM tokenizer and HF tokenizers agree "
            "on every case). ids exclude BOS; prepend bos_id when add_bos is true. "
            "decoded = the ids decoded back (control tokens rendered as their text)."
        ),
        "model_file": os.path.basename(path),
        "model_sha256": sha256_file(path),
        "vocab_size": len(v.tokens),
        "bos_id": v.bos_id,
        "eos_id": v.eos_id,
        "unk_id": v.unk_id,
        "pad_id": v.pad_id,
        "add_bos": v.add_bos,
        "add_space_prefix": v.add_space_prefix,
        "cases": out_cases,
    }
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(compact_json(fixture))
    print(f"{len(out_cases)} cases, {len(disagreements)} disagreements", file=sys.stderr)
    sys.exit(1 if disagreements else 0)


if __name__ == "__main__":
    ensure_venv(__file__)
    main()
