#!/bin/bash
# Device driver for benchmarks/gpu_probe.py: one process per model, a shared deadline, report last.
#   bash benchmarks/run_gpu.sh call1        (run from the repo root; wheels in .whl/, OUT set by the device tool)
set -u
PLAN=${1:-call1}
BUDGET=${BUDGET:-560}
START=$(date +%s)
END=$(( START + BUDGET ))
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1 || { echo "pip install failed"; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/probe_out}; mkdir -p "$OUT"
echo "plan $PLAN budget ${BUDGET}s; pip done after $(( $(date +%s) - START ))s"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader

P() {  # P <cap_s> <args...>: one phase, bounded by min(deadline, now+cap); console (bnb's per-call warnings
       # filtered) to a file
  local cap=$1; shift
  local now=$(date +%s); local end=$(( now + cap )); [ $end -gt $END ] && end=$END
  local left=$(( end - now ))
  if [ $left -lt 25 ]; then echo "no time left for: $*"; return; fi
  echo ">>> $* (cap ${left}s)"
  timeout $(( left + 10 )) python3 benchmarks/gpu_probe.py --out "$OUT" --deadline $end "$@" 2>&1 \
    | grep -v "MatMul8bitLt: inputs will be cast" >> "$OUT/console.txt"
  echo "<<< rc=${PIPESTATUS[0]}"
  grep -h "FAIL\|Traceback\|Error" "$OUT/console.txt" | tail -n 3
}

case $PLAN in
  call1)
    P 600 --phase env
    P 600 --phase run --target bf16 --steps plain,profile,graph,graph-eager,deferred,graphc
    P 600 --phase run --target nf4 --steps plain,profile,graph,deferred,graphc
    P 600 --phase run --target int8 --steps plain,quiet,profile,graphfail
    P 600 --phase run --target fp4 --steps plain,profile,graph
    P 600 --phase run --target int8 --int8-threshold 0 --steps plain,graph,graphc
    ;;
  call2)
    BW="--bw 3.0008e12"   # measured in call 1 (copy, read+write)
    P 150 --phase run --target bf16 $BW --steps plain,diag,eager,static,graphc,graphcd,plain@8,graph@8,deferred@8
    P 110 --phase run --target nf4 $BW --steps plain,graphc,graphcd,plain@8,graph@8,deferred@8
    P 80 --phase small --small-dtypes fp32,bf16,nf4,int8,int8thr0 --small-methods eager,graph,quiet --small-batches 1,8
    P 110 --phase run --target int8 $BW --steps quiet,compileonly
    P 110 --phase run --target bf16 $BW --steps plain,hfauto
    P 600 --phase small --small-dtypes bf16,nf4,fp32 --small-methods graphc --small-batches 1
    ;;
  call3)
    BW="--bw 3.0008e12"
    P 65 --phase run --target bf16 $BW --runs-always 2 --steps plain,nocudnn
    P 45 --phase run --target nf4 $BW --steps plain@8
    P 125 --phase run --target int8 $BW --new-tokens 48 --steps plain,quiet,compileonly
    ;;
  call4)
    P 125 --phase run --target int8 --bw 3.0008e12 --new-tokens 32 --steps quiet,compileonly
    ;;
  smoke)
    P 600 --phase env
    P 600 --phase run --target bf16 --steps graph --new-tokens 16
    ;;
  *)
    echo "unknown plan"; exit 2;;
esac
python3 benchmarks/gpu_probe.py --out "$OUT" --phase report
echo "total $(( $(date +%s) - START ))s"
