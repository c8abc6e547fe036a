#!/usr/bin/env bash
# fastvar on one CUDA GPU: every family at full size with random weights (timing does not depend on weight
# values), half precision, the unpatched model and every preset side by side. Needs torch only (no internet;
# flash-attn is used if installed). Its time on a card is not measured yet.
#
#   benchmarks/gpu.sh OUT_DIR                          # OUT_DIR/<case>.json and .txt, OUT_DIR/table.md
#   FASTVAR_BENCH_SMOKE=1 benchmarks/gpu.sh OUT_DIR    # the same steps on tiny models on the CPU
set -euo pipefail
if [[ $# -ne 1 ]]; then
  echo "error: usage: benchmarks/gpu.sh OUT_DIR (FASTVAR_BENCH_SMOKE=1 for the CPU smoke run)" >&2
  exit 2
fi
out=$1
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

cases=(  # name | family and its options
  "var-d16-256-b1|var --depth 16 --batch 1"
  "var-d16-256-b16|var --depth 16 --batch 16"
  "var-d30-256-b1|var --depth 30 --batch 1"
  "var-d30-256-b16|var --depth 30 --batch 16"
  "var-d36-512-b1|var --depth 36 --batch 1"
  "var-d36-512-b16|var --depth 36 --batch 16"
  "infinity-2b-1024-b1|infinity --model 2b --size 1024x1024 --batch 1"
  "infinity-2b-1024-b4|infinity --model 2b --size 1024x1024 --batch 4"
  "infinity-2b-1344-b1|infinity --model 2b --aspect-ratio 1.0 --pixels extended --batch 1"
  "infinity-8b-1024-b8|infinity --model 8b --size 1024x1024 --batch 8 --preset scalekv-10 --preset paper-scalekv-10 --preset paper"
  "hart-0.7b-1024-b1|hart --batch 1"
  # a 5 s clip takes about a minute per run unpatched: fewer presets and repeats (a case's options win)
  "infinitystar-480p-5s-b1|infinitystar --model 8b-480p --duration 5 --batch 1 --preset default --preset skip-last --repeats 1"
  "infinitystar-720p-5s-b1|infinitystar --model 8b-720p --duration 5 --batch 1 --preset default --repeats 1"
)
if [[ "${FASTVAR_BENCH_SMOKE:-0}" == 1 ]]; then  # tiny stand-ins of the same architectures, on the CPU
  command=(python tests/tiny_cli.py bench)
  run=(--random-weights --device cpu --dtype fp32 --repeats 1 --warmup 0)
  declare -A dtype=([var]=fp32 [infinity]=fp32 [hart]=fp32 [infinitystar]=fp32)
  cases=("${cases[@]/--size 1024x1024/--size 256x256}")
  cases=("${cases[@]/--pixels extended/--pixels 0.06M}")
  cases=("${cases[@]/--duration 5/--duration 0}")  # an image: a video's last scales are too big for a CPU
  for i in "${!cases[@]}"; do  # every VAR depth has the same stand-in: d16's cases cover them
    [[ ${cases[$i]} == var-d30* || ${cases[$i]} == var-d36* ]] && unset "cases[$i]"
  done
else
  command=(python -m fastvar bench)
  run=(--random-weights --device cuda --repeats 3 --warmup 1)
  declare -A dtype=([var]=bf16 [infinity]=bf16 [hart]=fp16 [infinitystar]=bf16)  # as each official inference runs
fi

for case in "${cases[@]}"; do
  name=${case%%|*}
  read -r -a options <<< "${case#*|}"
  family=${options[0]}
  echo "== $name" >&2
  "${command[@]}" "$family" "${run[@]}" "${options[@]:1}" --dtype "${dtype[$family]}" --json "$out/$name.json" \
    > "$out/$name.txt"
done

python - "$out" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = ["| case | device | torch | variant | FLOP ratio | total min ms | total median ms | speedup (min) | "
        "speedup (median) | peak GiB |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
for path in sorted(out.glob("*.json")):
    if path.name == "all.json":
        continue
    data = json.loads(path.read_text())
    for v in data["variants"]:
        peak = "" if v["peak_memory_bytes"] is None else f"{v['peak_memory_bytes'] / 2**30:.2f}"
        rows.append(f"| {path.stem} | {data['device']} | {data['torch']} | {v['name']} | {v['flop_ratio']:.3f} | "
                    f"{v['total_min_s'] * 1e3:.0f} | {v['total_median_s'] * 1e3:.0f} | {v['speedup_min']:.2f}x | "
                    f"{v['speedup_median']:.2f}x | {peak} |")
(out / "table.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
