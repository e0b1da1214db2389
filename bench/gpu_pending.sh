#!/usr/bin/env bash
# The GPU measurements still owed, in priority order, each under its own time limit so that one device call
# (10 minutes at most) brings back whatever finished. Run on the GPU machine from the repository root:
#   STAGES="cc weights" bash bench/gpu_pending.sh        (default: every stage, in this order)
# Needs the cryptography wheel carried in .whl/ (see README "GPU runs"). Results and logs go to $OUT.
#
#   cc       issue 6 row 4: the always-on per-step cost of --cc naive/pipelined on A-mixed and C-decode (goal < 2%)
#   weights  issue 6 row 2: OPT-30B weight streaming, off and pipelined (goal: off >= 4x vLLM's 12.8 tok/s), on
#            vLLM's workload: 64 requests of 512 prompt and 32 output tokens, 35 of 48 layers (40 GiB) on the host;
#            WEIGHT_MODES picks the modes (pipelined alone needs most of a call), WEIGHTS_LIMIT_S the time limit
#   kv       issue 7: fp8/K8V8 engine rows with more sequences admitted (B-pressure, max_num_seqs 512)
#   lora     issue 6 row 3: 64 rank-16 adapters, Zipf, 8 GPU slots
#   swap     issue 6 row 1: B-pressure with swap preemption, off/naive/pipelined
#   tp8      issue 10 (2 GPUs): Llama-3-8B engine at TP=2 (tiny-model check first), TP=1, TP=2 under --cc pipelined
#   tp70     issue 10 (2 GPUs): Llama-3-70B engine at TP=2
#   canary   issue 8: a prompt's marker searched in free GPU memory after the request, scrub of freed activations
#            on and off
#   tpmodel  issue 10 (2 GPUs): model-level decode/prefill times at TP=1/2, NCCL vs sealed collectives
#   tpcc     issue 10 (2 GPUs): sealed collectives captured in graphs: model level at TP=2, then the engine rows
#   tppeer   issue 10 (2 GPUs): the one-shot all-reduce over peer memory: model level at TP=2 (NCCL beside it),
#            then the engine rows
#   sealed   issue 10 (2 GPUs): one sealed all-reduce and its parts per call, with a kernel table (gpu_sealed.py)
#   aes      issue 4: GPU AES-GCM, both paths checked against OpenSSL, then 1 / 4 / 64 / 1024 MiB
#   tpcrash  issue 10 (2 GPUs): a worker killed under NCCL, between steps and inside one; close() quiet
#   sparsity issue 7: importance kernels checked on the GPU and timed (gpu_sparsity.py), then the engine at
#            --kv-sparsity 0.5 (its throughput against the cc stage's off rows, same workloads)
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export OUT CCSERVE_COMMIT=${CCSERVE_COMMIT:-unknown}

stage() {   # name, seconds, command...: run one stage under a time limit, keep its log, print its table
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $?"
    grep -v -i -E "warn|it/s\]|file/s\]" "$OUT/$name.log" | tail -12
}

for s in ${STAGES:-cc weights kv lora swap}; do
    case $s in
        cc) stage cc 200 env MODES=off,pipelined REPEATS=1 python3 bench/gpu_cc.py A-mixed C-decode ;;
        weights) stage weights "${WEIGHTS_LIMIT_S:-280}" env MODES="${WEIGHT_MODES:-off,pipelined}" BATCHES="${WEIGHT_BATCHES:-64}" GEN="${WEIGHT_GEN:-32}" \
                     STREAM_FRACTION=0.729 CC_THREADS=14 TIME_LIMIT_S=150 python3 bench/gpu_weight_stream.py opt-30b ;;
        kv) stage kv 260 env SKIP_KERNEL=1 WORKLOADS=B-pressure MAX_NUM_SEQS=512 ENGINE_PRESETS="fp8 K8V8" \
                python3 bench/gpu_kv_formats.py fp8 K8V8 ;;
        lora) stage lora 240 python3 bench/gpu_lora.py ;;
        swap) stage swap 300 env MODES=off,pipelined REPEATS=1 python3 bench/gpu_cc.py B-pressure ;;
        tp8) stage tp8-tp2 240 env TP=2 SKIP_BATCH1=1 python3 bench/gpu_engine.py A-mixed C-decode
             stage tp8-tp1 130 env SKIP_CHECK=1 SKIP_BATCH1=1 python3 bench/gpu_engine.py A-mixed C-decode
             stage tp8-tp2-cc 160 env TP=2 CC_MODE=pipelined SKIP_CHECK=1 SKIP_BATCH1=1 \
                 python3 bench/gpu_engine.py A-mixed C-decode ;;
        tp70) stage tp70 330 env MODEL=llama3-70b TP=2 SKIP_CHECK=1 SKIP_BATCH1=1 \
                  python3 bench/gpu_engine.py A-mixed C-decode ;;
        canary) stage canary 120 python3 bench/gpu_canary.py ;;
        tpmodel) stage tpmodel 240 env CC_MODES=off,pipelined python3 bench/gpu_tp.py ;;
        tpcc) stage tpcc-model 200 env CC_MODES=off,pipelined SIZES=2 python3 bench/gpu_tp.py
              stage tpcc-engine 200 env TP=2 CC_MODE=pipelined SKIP_BATCH1=1 python3 bench/gpu_engine.py A-mixed C-decode ;;
        tppeer) stage tppeer-model 200 env SIZES=2 ALL_REDUCES=nccl,peer python3 bench/gpu_tp.py
                stage tppeer-engine 200 env TP=2 TP_ALL_REDUCE=peer SKIP_BATCH1=1 \
                    python3 bench/gpu_engine.py A-mixed C-decode ;;
        tpcrash) stage tpcrash 150 python3 bench/gpu_tp_crash.py ;;
        sealed) stage sealed 150 python3 bench/gpu_sealed.py ;;
        sparsity) stage sparsity-kernels 150 python3 bench/gpu_sparsity.py
                  stage sparsity-engine 240 env KV_SPARSITY=0.5 SKIP_CHECK=1 SKIP_BATCH1=1 \
                      python3 bench/gpu_engine.py A-mixed C-decode ;;
        aes) stage aes "${AES_LIMIT_S:-240}" bash -c "cd bench && python3 secure_kernel.py --sizes-mib 1,4,64,1024" ;;
        *) echo "unknown stage $s" ;;
    esac
done
