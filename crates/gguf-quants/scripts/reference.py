#!/usr/bin/env python3
"""Regenerates tests/fixtures: GGUF blocks and their reference dequantization.

For every type gguf-quants supports, writes `tests/fixtures/<TYPE>.bin` (raw blocks) and
`tests/fixtures/<TYPE>.f32` (little-endian float32 of `gguf.quants.dequantize`, the
reference of the PyPI package gguf==0.19.0 with numpy). Blocks are deterministic: extreme
scales (f16 max / min normal / subnormals, zero, negative zero, +-inf, NaN), all-0 and
all-0xFF codes, and random bytes.

gguf-py 0.19.0 has no Q8_K dequantizer; its reference here is ggml's dequantize_row_q8_K
(`d * q`, f32 times int8 as float32) written in numpy.

Usage (from anywhere): python3 crates/gguf-quants/scripts/reference.py
The script creates its own venv under <repo>/.semantic-build/quants-venv on first run.
"""
import os
import subprocess
import sys

GGUF_VERSION = "0.19.0"
NUMPY_VERSION = "2.2.6"

HERE = os.path.dirname(os.path.abspath(__file__))
CRATE = os.path.dirname(HERE)
REPO = os.path.dirname(os.path.dirname(CRATE))
VENV = os.path.join(REPO, ".semantic-build", "quants-venv")
FIXTURES = os.path.join(CRATE, "tests", "fixtures")


def ensure_venv():
    py = os.path.join(VENV, "bin", "python")
    if os.path.abspath(sys.prefix) == os.path.abspath(VENV):
        return
    if not os.path.exists(py):
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
        subprocess.check_call([py, "-m", "pip", "install", "--quiet",
                               f"gguf=={GGUF_VERSION}", f"numpy=={NUMPY_VERSION}"])
    os.execv(py, [py, os.path.abspath(__file__)] + sys.argv[1:])


def main():
    import numpy as np
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf.constants import GGML_QUANT_SIZES

    assert np.__version__ == NUMPY_VERSION, np.__version__

    rng = np.random.default_rng(20240607)

    F16_SPECIAL = [0x7BFF, 0xFBFF, 0x0400, 0x8400, 0x0001, 0x03FF, 0x8001, 0x0000, 0x8000,
                   0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x3C00, 0x2E66]
    F32_SPECIAL = [0x7F7FFFFF, 0xFF7FFFFF, 0x00800000, 0x00000001, 0x807FFFFF, 0x00000000,
                   0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x3F800000, 0x3C23D70A]

    # (type, [(offset, "f16"|"f32"), ...] scale fields)
    types = [
        (T.Q4_0, [(0, "f16")]),
        (T.Q4_1, [(0, "f16"), (2, "f16")]),
        (T.Q5_0, [(0, "f16")]),
        (T.Q5_1, [(0, "f16"), (2, "f16")]),
        (T.Q8_0, [(0, "f16")]),
        (T.Q2_K, [(80, "f16"), (82, "f16")]),
        (T.Q3_K, [(108, "f16")]),
        (T.Q4_K, [(0, "f16"), (2, "f16")]),
        (T.Q5_K, [(0, "f16"), (2, "f16")]),
        (T.Q6_K, [(208, "f16")]),
        (T.Q8_K, [(0, "f32")]),
        (T.IQ4_NL, [(0, "f16")]),
        (T.IQ4_XS, [(0, "f16")]),
    ]

    def put(block, off, kind, bits):
        if kind == "f16":
            block[off:off + 2] = np.frombuffer(np.uint16(bits).tobytes(), np.uint8)
        else:
            block[off:off + 4] = np.frombuffer(np.uint32(bits).tobytes(), np.uint8)

    def normal_scale(kind):
        v = np.float32(rng.uniform(-0.05, 0.05))
        return int(np.float16(v).view(np.uint16)) if kind == "f16" else int(v.view(np.uint32))

    os.makedirs(FIXTURES, exist_ok=True)
    total = 0
    for ty, fields in types:
        _, bb = GGML_QUANT_SIZES[ty]
        if ty == T.Q8_K:
            bb = 292
        blocks = []
        patterns = [np.zeros(bb, np.uint8), np.full(bb, 0xFF, np.uint8)]
        # Every special scale in every field (others normal), over each code pattern.
        for fi, (off, kind) in enumerate(fields):
            specials = F16_SPECIAL if kind == "f16" else F32_SPECIAL
            for s in specials:
                for pat in patterns + [rng.integers(0, 256, bb, dtype=np.uint8)]:
                    b = pat.copy()
                    for fj, (o2, k2) in enumerate(fields):
                        put(b, o2, k2, s if fj == fi else normal_scale(k2))
                    blocks.append(b)
        # Pairs of specials in two-scale formats.
        if len(fields) == 2:
            for i, s in enumerate(F16_SPECIAL):
                t = F16_SPECIAL[(i * 7 + 3) % len(F16_SPECIAL)]
                b = rng.integers(0, 256, bb, dtype=np.uint8)
                put(b, fields[0][0], "f16", s)
                put(b, fields[1][0], "f16", t)
                blocks.append(b)
        # Random codes with normal scales, and fully random bytes.
        for _ in range(24):
            b = rng.integers(0, 256, bb, dtype=np.uint8)
            for off, kind in fields:
                put(b, off, kind, normal_scale(kind))
            blocks.append(b)
        for _ in range(8):
            blocks.append(rng.integers(0, 256, bb, dtype=np.uint8))
        raw = np.stack(blocks)
        if ty == T.Q8_K:
            d = raw[:, :4].copy().view(np.float32)
            q = raw[:, 4:260].copy().view(np.int8).astype(np.float32)
            out = d * q
        else:
            out = gguf.quants.dequantize(raw, ty)
        write(ty.name, raw, out)
        total += raw.nbytes + out.nbytes

    # Float types: special bit patterns plus random bits (NaN payloads, subnormals, ...).
    for ty, width in [(T.F32, 4), (T.F16, 2), (T.BF16, 2)]:
        specials = F32_SPECIAL if width == 4 else F16_SPECIAL + [0x7F7F, 0xFF80, 0x7FC0, 0x0080]
        vals = np.array(specials, dtype=np.uint32 if width == 4 else np.uint16)
        rand = rng.integers(0, 1 << (8 * width), 2048, dtype=np.uint64).astype(vals.dtype)
        raw = np.concatenate([vals, rand]).view(np.uint8)
        out = gguf.quants.dequantize(raw, ty)
        write(ty.name, raw, out)
        total += raw.nbytes + out.nbytes
    print(f"wrote {total} bytes of fixtures to {FIXTURES}")


def write(name, raw, out):
    import numpy as np
    out = np.ascontiguousarray(out, dtype="<f4")
    assert out.dtype == np.float32
    with open(os.path.join(FIXTURES, f"{name}.bin"), "wb") as f:
        f.write(np.ascontiguousarray(raw).tobytes())
    with open(os.path.join(FIXTURES, f"{name}.f32"), "wb") as f:
        f.write(out.tobytes())


if __name__ == "__main__":
    ensure_venv()
    main()
