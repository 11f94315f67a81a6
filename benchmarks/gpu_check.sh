#!/usr/bin/env bash
# GPU readiness in one go (make gpu-check): the CUDA tests, then the GPU benchmarks. < 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # logs and tables in $OUT (default benchmarks/results/gpu)
#
# Meant for a bare CUDA machine: python3 with torch, transformers, accelerate, pyarrow and pytest, no
# network, the project not installed (PYTHONPATH=. instead) and perhaps no vllm, polars, zstandard,
# matplotlib, hypothesis or pytest-timeout. Whatever is missing is skipped, not failed. Without a
# CUDA device it says so and exits 0. Exit status: 1 when a test or benchmark failed.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu-check: no CUDA device visible to $PY (or no torch): nothing to run, skipped." | tee "$OUT/summary.txt"
    exit 0
fi
"$PY" -c "import torch; print('gpu-check:', torch.cuda.get_device_name(), 'torch', torch.__version__)" | tee "$OUT/summary.txt"

failed=0
run() {  # run NAME SECONDS COMMAND...: log to $OUT/NAME.log, one summary line
    local name=$1 limit=$2 start status
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    status=$?
    local line="$name: $([ $status -eq 0 ] && echo ok || echo "FAILED (exit $status)") in $(($(date +%s) - start)) s"
    [ $status -eq 0 ] || failed=1
    echo "$line" | tee -a "$OUT/summary.txt"
}

# pytest: the project's addopts deselect gpu tests, so they are cleared; without pytest-timeout its
# `timeout` setting is only an "unknown config option" warning (checked with polars, zstandard,
# datasets, hypothesis, vllm, matplotlib and pytest-timeout hidden). No cache written into the tree.
run test_gpu 300 "$PY" -m pytest tests/test_gpu.py -m gpu -q -rs -o addopts= -p no:cacheprovider
tail -n 5 "$OUT/test_gpu.log"

run bench_scoring 120 "$PY" benchmarks/bench_scoring.py --device cuda --repeats 3 --out "$OUT"
run bench_vocab_memory 120 "$PY" benchmarks/bench_vocab_memory.py --device cuda --batch 4 --json "$OUT/vocab_memory.json"
run bench_gpu_mfu 180 "$PY" benchmarks/bench_gpu_mfu.py --json "$OUT/gpu_mfu.json"
# bf16 + gradient checkpointing + LoRA on Gemma-3-270M's shape: tokens/s, peak memory vs lopd plan
run bench_scale 240 "$PY" benchmarks/bench_scale.py --device cuda --json "$OUT/scale.json"
# packed vs padded stage-two micro-batches on long-tailed lengths: step time, peak memory
run bench_packing 180 "$PY" benchmarks/bench_packing.py --device cuda
# vLLM scoring at Gemma-3-270M's 262k vocabulary: the fitted tokens per step vs vLLM-sized 8192
if "$PY" -c "import vllm" 2>/dev/null; then
    run bench_vllm_vocab 300 "$PY" benchmarks/bench_vllm_vocab.py --device cuda --json "$OUT/vllm_vocab.json"
else
    echo "bench_vllm_vocab: skipped (no vllm)" | tee -a "$OUT/summary.txt"
fi

echo
echo "== summary ($OUT) =="
cat "$OUT/summary.txt"
for name in bench_scoring bench_vocab_memory bench_gpu_mfu bench_scale bench_packing bench_vllm_vocab; do
    echo "-- $name"
    [ -f "$OUT/$name.log" ] && grep -E "x$|x |MFU|method|ours|naive|vocab|lora_rank|planned|^[0-9]+ \||padded|packed|^\| " "$OUT/$name.log" | tail -n 16
done
exit $failed
