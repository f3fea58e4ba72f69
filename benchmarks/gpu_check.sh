#!/usr/bin/env bash
# The GPU figures, in one command for a borrowed GPU (aimed at under 8 minutes on one H200), from the
# repository's root after the README's set-up: bash benchmarks/gpu_check.sh
# Writes each step's output to benchmarks/gpu/, the "gpu" entry of benchmarks/results.json and the
# table between the gpu markers in BENCHMARKS.md (benchmarks/gpu_report.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=benchmarks/gpu
rm -rf "$OUT" && mkdir -p "$OUT"
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'error: no usable GPU here')"
BENCH=("$PY" benchmarks/bench.py --accelerator gpu --quick --throughput-config configs/gpu.yaml)

echo "1/3 the design card's command: python cli.py fit --config configs/gpu.yaml"
start=$(date +%s)
"$PY" cli.py fit --config configs/gpu.yaml --trainer.default_root_dir "$OUT/fit" --trainer.enable_progress_bar false
echo $(( $(date +%s) - start )) > "$OUT/fit_wall_seconds"

echo "2/3 samples and seconds to 99 %, Lightning against plain PyTorch, inference (gpu.yaml)"
# Step 2's ratio is the one reported: 10 rounds of 50 steps, as 4 rounds of 20 gave 1.13 and 0.86 on one
# H200 with the same settings (BENCHMARKS.md, GPU); 1,000 steps there take seconds.
"${BENCH[@]}" --rounds 10 --steps 50 --config configs/gpu.yaml --results "$OUT/bench.json" --report "$OUT/bench.md"

echo "3/3 Lightning's training throughput with one setting of gpu.yaml changed"
throughput() {
    local name=$1; shift
    "${BENCH[@]}" --only throughput --results "$OUT/throughput ${name}.json" --report "$OUT/throughput.md" "$@"
}
throughput "gpu.yaml"
throughput "precision 32-true" --trainer.precision 32-true
throughput "on_device false" --data.on_device false

"$PY" benchmarks/gpu_report.py "$OUT"
