#!/usr/bin/env bash
# The default model requantized by llama.cpp into other GGUF types, each served by the
# release `semantic` binary with its weights kept as the file's blocks (`host`) and
# dequantized to f32 (`f32`): prints each greedy answer to one question and whether the two
# formats agree (they run the same dequantized values, so they must), plus llama.cpp's own
# answer on the same file when its server is built (it rounds activations to 8 bits in its
# quantized dot products, so near-ties may differ).
#
# Needs the benchmark's llama.cpp build (`cargo xtask bench --peers` once) and a release
# build (`cargo build --release -p semantic --config .semantic-build/mlx-linux/cargo-config.toml`).
# Usage: crates/engine-mlx/scripts/requantized.sh [TYPE ...]   (default: Q4_K_M Q5_K_M Q6_K
# IQ4_NL IQ4_XS Q3_K_S Q2_K Q8_0)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
llama="$(ls -d "$root"/.peers/llama.cpp-*/build 2>/dev/null | head -1)"
[ -n "$llama" ] || { echo "no llama.cpp build under .peers/: run cargo xtask bench --peers once" >&2; exit 1; }
[ -x "$llama/bin/llama-quantize" ] || cmake --build "$llama" --target llama-quantize -j"$(nproc)"
semantic="$root/target/release/semantic"
[ -x "$semantic" ] || { echo "build $semantic first (see the header)" >&2; exit 1; }
model="${SEMANTIC_HOME:-$HOME/.semantic}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
port=18555
ask() {
  curl -s "localhost:$port/v1/chat/completions" -H 'content-type: application/json' \
    -d '{"model":"default","max_tokens":24,"temperature":0,"messages":[{"role":"user","content":"What is the capital of France?"}]}' |
    python3 -c 'import sys,json; d=json.load(sys.stdin); print(d["choices"][0]["message"]["content"] if "choices" in d else d)'
}
wait_ready() {
  for _ in $(seq 1 120); do curl -sf "localhost:$port$1" >/dev/null && return 0; sleep 0.5; done
  return 1
}
types=("$@")
[ ${#types[@]} -gt 0 ] || types=(Q4_K_M Q5_K_M Q6_K IQ4_NL IQ4_XS Q3_K_S Q2_K Q8_0)
status=0
for t in "${types[@]}"; do
  file="$work/smol-$t.gguf"
  "$llama/bin/llama-quantize" --allow-requantize "$model" "$file" "$t" >"$work/quantize-$t.log" 2>&1
  declare -A answer=()
  for w in host f32; do
    SEMANTIC_MLX_WEIGHTS=$w SEMANTIC_AGENT_CACHE_DIR="$work/cache-$t-$w" \
      "$semantic" serve --model "$file" --host 127.0.0.1 --port $port >"$work/serve-$t-$w.log" 2>&1 &
    pid=$!
    wait_ready /health/ready || { echo "$t ($w): the server did not start:"; tail -3 "$work/serve-$t-$w.log"; status=1; kill $pid; continue; }
    answer[$w]="$(ask)"
    kill $pid; wait $pid 2>/dev/null || true
  done
  same=$([ "${answer[host]:-}" == "${answer[f32]:-x}" ] && echo "host == f32" || echo "HOST != F32")
  [ "$same" == "host == f32" ] || status=1
  echo "$t ($(stat -c %s "$file") bytes): $same: ${answer[host]:-}"
  if [ -x "$llama/bin/llama-server" ]; then
    "$llama/bin/llama-server" -m "$file" --port $port -t "$(nproc)" >"$work/llama-$t.log" 2>&1 &
    pid=$!
    wait_ready /health && echo "  llama.cpp: $(ask)"
    kill $pid; wait $pid 2>/dev/null || true
  fi
  unset answer
done
exit $status
