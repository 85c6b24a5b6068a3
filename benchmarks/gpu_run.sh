#!/usr/bin/env bash
# One device call: install the carried wheels, run the GPU tests, the decode benchmark and the split check.
# Carry: .whl (bitsandbytes and transformers wheels, tokenizer/ with SmolLM2's tokenizer files).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LLM_APP_TEST_TOKENIZER=$PWD/.whl/tokenizer
python3 -c "import torch, transformers, bitsandbytes; print(torch.__version__, transformers.__version__, bitsandbytes.__version__, torch.cuda.get_device_name(0))"
mkdir -p "$OUT"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
python3 benchmarks/decode.py --model llama8b --quant "${QUANTS:-none,nf4,fp4,int8}" --batch 1,8 --prompt-len 128 \
  --new "${NEW:-64}" --repeats 1 --compile "${COMPILE:-none,nf4}" --tokenizer .whl/tokenizer \
  --results "$OUT/decode.md" --json "$OUT/decode.json" 2>&1 | grep -v "Loading weights\|Writing model" | tail -40
python3 benchmarks/split.py --model smol --tokenizer .whl/tokenizer 2>&1 | tee "$OUT/split.md" | tail -8
