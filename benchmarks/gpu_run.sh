#!/usr/bin/env bash
# One device call: install the carried wheels, then run the stages named in $STAGES, in order
# (default "tests decode split"), each under its own time limit, logs under $OUT:
#   tests   the GPU tests (tests/test_gpu.py; $TESTS_K selects with -k)
#   sweep   the fast path's kernels against the libraries' and torchao's per 8B layer shape, at $ROWS rows
#           (decode_sweep.py: each format compiled and checked in its own process first, then timed alone)
#   decode  the decode table, 8B shapes, batch sizes $BATCH, torchao peers beside, compile mode $COMPILE_MODE
#   split   split placement at fast-path speed (benchmarks/split.py): $SPLIT_MODEL (smol; llama8b for the
#           8B run) over GPU 0 and GPU 1 against GPU 0 alone; the app's report text to $OUT/app_report.md
#   serve   visitors at once through the worker (benchmarks/serve.py): $SERVE_QUANTS, $STREAMS, $SERVINGS; with
#           $SERVE_COMPILE the graphed steps of a compiled forward; $TIMELINE (here and in decode) traces steps
#   seq2seq T5 shapes ($SEQ2SEQ_SHAPES, t5-11b) in bf16, nf4 and int8: footprint, peak, decode paths $SEQ2SEQ_PATHS
#           (plain and the fast path), fit estimate (benchmarks/seq2seq.py)
# Random checkpoints are built under $WORK: /dev/shm (memory) where it is writable, else /tmp.
# Carry .whl (bitsandbytes, transformers and torchao wheels; tokenizer/ with SmolLM2's tokenizer);
# $WHL names that folder when it is not ./.whl.
set -u
WHL=${WHL:-$PWD/.whl}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LLM_APP_TEST_TOKENIZER=$WHL/tokenizer
mkdir -p "$OUT"
WORK=${WORK:-$( [ -w /dev/shm ] && echo /dev/shm/llm-bench || echo /tmp/llm-bench )}
python3 -c "import torch, transformers, bitsandbytes, triton; print(torch.__version__, transformers.__version__, bitsandbytes.__version__, triton.__version__, torch.cuda.device_count(), 'x', torch.cuda.get_device_name(0))"
nvidia-smi topo -m 2>/dev/null | head -4
for stage in ${STAGES:-tests decode split}; do
  echo "=== $stage"
  case $stage in
    tests) timeout "${TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py ${TESTS_K:+-k "$TESTS_K"} \
        2>&1 | tee "$OUT/gpu_tests.txt" | tail -40 ;;
    sweep) for format in bf16 int8 nf4; do
          timeout "${SWEEP_S:-300}" python3 benchmarks/decode_sweep.py --rows "${ROWS:-1,2,4,8,16}" --formats $format \
            --check-only > "$OUT/warm_$format.txt" 2>&1 &
        done; wait
        grep -h "failed\|Error" "$OUT"/warm_*.txt | head -5
        timeout "${SWEEP_S:-300}" python3 benchmarks/decode_sweep.py --rows "${ROWS:-1,2,4,8,16}" --peers \
          --results "$OUT/sweep.md" > "$OUT/sweep_log.txt" 2>&1; sed -n '/^Summary/,$p' "$OUT/sweep.md" ;;
    decode) timeout "${DECODE_S:-420}" python3 benchmarks/decode.py --model llama8b --quant "${QUANTS:-none,nf4,int8}" \
        --batch "${BATCH:-1,4,8,16}" --paths "${PATHS:-graph,kernels}" --compile "${COMPILE-none,nf4,int8}" \
        --compile-batches "${COMPILE_BATCHES:-1}" \
        --compile-mode "${COMPILE_MODE:-default}" --peers "${PEERS-int8wo,int4wo}" --prompt-len 128 --new "${NEW:-128}" \
        --repeats 1 --raw ${PROFILE:+--profile "$OUT/profiles.txt"} ${TIMELINE:+--timeline} --tokenizer "$WHL/tokenizer" \
        --results "$OUT/decode.md" --json "$OUT/decode.json" 2>&1 | grep -v "Loading weights\|Writing model" \
        | tee "$OUT/decode_log.txt" | tail -60 ;;
    serve) timeout "${SERVE_S:-420}" python3 benchmarks/serve.py --model llama8b --quant "${SERVE_QUANTS:-none,nf4,int8}" \
        --streams "${STREAMS:-1,16}" --rate "${RATE:-0}" --new "${NEW:-128}" --prompt-len 128 --tokenizer "$WHL/tokenizer" \
        --work "$WORK" --servings "${SERVINGS:-batched,one}" ${SERVE_COMPILE:+--compile} ${TIMELINE:+--timeline} \
        --results "$OUT/serve.md" 2>&1 | grep -v "MatMul8bitLt\|Loading weights\|Writing model" | tail -40 ;;
    seq2seq) timeout "${SEQ2SEQ_S:-480}" python3 benchmarks/seq2seq.py --shapes "${SEQ2SEQ_SHAPES:-t5-11b}" \
        --tokenizer "$WHL/tokenizer" --work "$WORK" --modes "${SEQ2SEQ_MODES:-none,nf4,int8}" \
        --paths "${SEQ2SEQ_PATHS:-plain,fast path}" --results "$OUT/seq2seq.md" --json "$OUT/seq2seq.json" 2>&1 \
        | grep -v "MatMul8bitLt\|Loading weights\|Writing model" | tail -40 ;;
    split) timeout "${SPLIT_S:-240}" python3 benchmarks/split.py --model "${SPLIT_MODEL:-smol}" --tokenizer "$WHL/tokenizer" \
        --work "$WORK" --quant "${SPLIT_QUANTS:-none,int8,nf4}" --new "${NEW:-128}" --repeats "${REPEATS:-1}" \
        ${SPLIT_PLAIN:+--plain} --results "$OUT/split.md" --json "$OUT/split.json" --report "$OUT/app_report.md" 2>&1 \
        | grep -v "MatMul8bitLt\|Loading weights\|Writing model" | tail -30 ;;
  esac
done
