#!/usr/bin/env bash
# Runs the SGLang engine's GPU validation and/or benchmarks on a GPU machine without network.
#
#   bash scripts/gpu/sglang_device.sh GPU_DIR STAGE...
#   STAGE: validate-tiny validate-8b validate-families validate-tp regen-check regen-bench bench bench-server bench-dump bench-dump-large cli-dump diag-sync diag-dump export-8b bench-transport diag-io check-client
#
# GPU_DIR (copied to the machine, git-ignored) holds bundle/ (SGLang and the wheels it needs, with an install.sh),
# jit-caches-sglang-0.5.16-h100.tgz, optionally fi-cache.tgz (flashinfer JIT cache from an
# earlier run) and, for the server and dump stages, extra/ (wheels the GPU image lacks:
# fastapi, uvicorn, httptools, opentelemetry-api, typing-inspection; for SGLang's Engine: setproctitle,
# uvloop, prometheus-client). The code run is this
# script's own repository. Results and one log
# go to $OUT; the flashinfer JIT cache is packed to $OUT/fi-cache.tgz for the next run.
set -uo pipefail
G=$(cd "${1:?usage: sglang_device.sh GPU_DIR STAGE...}" && pwd); shift
REPO=$(cd "$(dirname "$0")/../.." && pwd)  # this repository's code, as it is on the machine
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG=$OUT/device.log
exec > >(tee -a "$LOG") 2>&1
echo "== $(date -u +%FT%TZ) stages: $*"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
bash "$G/bundle/install.sh" | tail -1
if [ -d "$G/extra" ]; then
  python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site "$G"/extra/*.whl 2>&1 | tail -2
fi
# This image's transformers registers config names SGLang 0.5.16 registers too; the engine
# patches AutoConfig.register in its own process, but SGLang's offline Engine starts its
# scheduler in a fresh interpreter. sitecustomize applies the same patch there (only when
# EAGLE3_TF_REGISTER_PATCH=1, so other processes do not import transformers at start).
cat > /tmp/site/sitecustomize.py <<'PY'
import os
if os.environ.get("EAGLE3_TF_REGISTER_PATCH") == "1":
    from transformers import AutoConfig
    _orig = AutoConfig.register
    AutoConfig.register = staticmethod(lambda t, c, exist_ok=False: _orig(t, c, exist_ok=True))
PY
tar xzf "$G/jit-caches-sglang-0.5.16-h100.tgz" -C /tmp
[ -f "$G/fi-cache.tgz" ] && mkdir -p /tmp/fiws && tar xzf "$G/fi-cache.tgz" -C /tmp/fiws
# The installs above have just rewritten flashinfer's sources and headers, so ninja would
# find them newer than the cached build and recompile rmsnorm (40 s inside the first
# forward on each machine; a user pays that once per install, not per run). Backdate the
# installed files; the cache keeps its own dates (touching it instead makes ninja distrust
# its deps log and rebuild all the same).
find /tmp/site -exec touch -h -d 2020-01-01 {} +
export PYTHONPATH=/tmp/site:$REPO/src SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1 \
  TVM_FFI_CACHE_DIR=/tmp/tvmcache TRITON_CACHE_DIR=/tmp/tritoncache FLASHINFER_WORKSPACE_BASE=/tmp/fiws \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TOKENIZERS_PARALLELISM=false
S=$REPO/scripts/gpu
rc=0
step() {  # step SECONDS CMD...: a hang in one stage must not eat the whole call
  echo "== $(date -u +%T) $*"
  timeout "$@"; local status=$?
  [ $status = 0 ] || { echo "== FAILED ($status): $*"; rc=1; }
  return $status
}
chat_target_8b() {  # the 8B shape at /tmp/llama8b (built once per machine) with a tokenizer to render chats
  # The 8B shape has no tokenizer of its own: borrow the tiny model's (its ids all lie
  # below the 8B vocabulary). Checked by file, as another stage may have built the model alone.
  [ -f /tmp/llama8b/config.json ] || step 180 python3 "$S/make_target.py" llama3-8b /tmp/llama8b
  if [ ! -f /tmp/llama8b/tokenizer_config.json ]; then
    [ -d /tmp/tiny-peaked ] || step 60 python3 "$S/make_target.py" tiny-peaked /tmp/tiny-peaked
    cp /tmp/tiny-peaked/*token* /tmp/tiny-peaked/*.jinja /tmp/llama8b/
  fi
}
for stage in "$@"; do
  case $stage in
    validate-tiny)
      step 60 python3 "$S/make_target.py" tiny-peaked /tmp/tiny-peaked
      step 240 python3 "$S/validate_sglang.py" --name tiny-peaked --model /tmp/tiny-peaked \
        --attention-backend triton --aux-ids 5,0,3 --out "$OUT/validate_tiny.json" ;;
    validate-families)
      # Tiny bf16 models (H=256, head dim 64, LM head x8) of every family and the
      # Llama-3.1-8B shape, SGLang vs an fp32 reference beside transformers bf16.
      # FAMILIES=... narrows the list; one JSON per family and summary.json, packed into
      # $OUT/families.tgz (few files come back from a machine).
      step 560 python3 "$S/validate_sglang.py" \
        --families ${FAMILIES:-llama,qwen3,qwen3-moe,mixtral,gpt-oss,deepseek-v3,gemma3,phi3,llama3-8b} \
        --attention-backend ${ATTN:-triton} --work-dir /tmp/eagle3-families --out-dir "$OUT/families" \
        ${VALIDATE_ARGS:-}
      cp "$OUT/families/summary.json" "$OUT/families-summary.json" 2>/dev/null
      tar czf "$OUT/families.tgz" -C "$OUT" families && rm -rf "$OUT/families" ;;
    validate-tp)
      # Needs TP_SIZE (2) GPUs: TP=N against TP=1 and fp32 on the peaked tiny model and the
      # 8B shape, with speed on 8 x 2048; TP_LARGE=1 adds the Llama-3-70B shape (random
      # weights filled on the GPUs), which only TP=N can hold.
      step 60 python3 "$S/make_target.py" tiny-peaked /tmp/tiny-peaked
      step 240 python3 "$S/validate_tp.py" --model /tmp/tiny-peaked --tp ${TP_SIZE:-2} --out "$OUT/tp_tiny.json"
      chat_target_8b
      step 420 python3 "$S/validate_tp.py" --model /tmp/llama8b --tp ${TP_SIZE:-2} --lengths 2048,1000,517,300 \
        --bench-batch 8 --bench-seq 2048 --out "$OUT/tp_8b.json"
      if [ -n "${TP_LARGE:-}" ]; then
        step 560 python3 "$S/validate_tp.py" --model /tmp/llama70b-config --dummy-70b --tp ${TP_SIZE:-2} \
          --bench-batch 8 --bench-seq 2048 --out "$OUT/tp_large.json"
      fi ;;
    regen-check)
      # regenerate through SGLang's offline Engine: greedy rows equal the transformers engine's
      # (bf16, same GPU) on a tiny model trained on the rows it answers (REGEN_TINY=tiny-peaked:
      # the random peaked one, whose near-ties bf16 cannot resolve); each divergence is tested
      # against fp32.
      tiny=${REGEN_TINY:-tiny-trained}
      step 180 python3 "$S/make_target.py" $tiny /tmp/$tiny --rows ${REGEN_ROWS:-32}
      EAGLE3_TF_REGISTER_PATCH=1 step 420 python3 "$S/regen_sglang.py" check --model /tmp/$tiny --rows ${REGEN_ROWS:-32} \
        --out "$OUT/regen_check.json" ;;
    regen-bench)
      # regenerate's SGLang engine against sglang.bench_offline_throughput on the same prompts
      # (8B shape, EOS ignored by both); the goal is >= 0.9x its output tokens/s. SGLang's
      # benchmark imports datasets (so pyarrow and pandas): put them on PYTHONPATH too.
      chat_target_8b
      EAGLE3_TF_REGISTER_PATCH=1 step 560 python3 "$S/regen_sglang.py" bench --model /tmp/llama8b --prompts ${REGEN_PROMPTS:-512} \
        --max-new-tokens ${REGEN_NEW:-256} --out "$OUT/regen_bench.json" ;;
    validate-8b)
      step 180 python3 "$S/make_target.py" llama3-8b /tmp/llama8b
      step 420 python3 "$S/validate_sglang.py" --name llama3-8b --model /tmp/llama8b \
        --attention-backend flashinfer --lengths 2048,1000,517,300 --aux-ids 28,1,15 \
        --out "$OUT/validate_8b.json" ;;
    bench)
      step 180 python3 "$S/make_target.py" llama3-8b /tmp/llama8b
      step 420 python3 "$REPO/bench/bench_sglang.py" --model /tmp/llama8b --batch 8 --seq 2048 \
        --attention-backend flashinfer --out "$OUT/bench_sglang.json" ;;
    bench-server)
      # Server vs in-process on the 8B shape; triton attention (its JIT cache is carried).
      # Every mode: SERVER_MODES=hidden,draft,topk,logits; SERVER_RUNS (12) requests per
      # client, enough for the steady rate beside the end-to-end one. What never
      # merging costs (dump --server's batch=alone): SERVER_BATCH=shared,alone runs the
      # policies one after the other, SERVER_ROUNDS (1) times, one file each; rows per
      # request: SERVER_REQ_BATCH (4); SERVER_CLIENTS (1,2), SERVER_PREFETCH (0,2) and
      # SERVER_REPEAT (2) narrow a run.
      [ -f /tmp/llama8b/config.json ] || step 180 python3 "$S/make_target.py" llama3-8b /tmp/llama8b
      for round in $(seq ${SERVER_ROUNDS:-1}); do
        for policy in $(echo "${SERVER_BATCH:-shared}" | tr , " "); do
          step 560 python3 "$REPO/bench/bench_server.py" --model /tmp/llama8b --engine sglang \
            --device cuda --dtype bfloat16 --batch ${SERVER_REQ_BATCH:-4} --seq-len 2048 \
            --clients ${SERVER_CLIENTS:-1,2} --runs ${SERVER_RUNS:-12} --repeat ${SERVER_REPEAT:-2} \
            --modes ${SERVER_MODES:-hidden} --prefetch ${SERVER_PREFETCH:-0,2} \
            --engine-arg attention_backend=triton --batch-policy $policy \
            | tee "$OUT/bench_server_${policy}_$round.txt"; [ "${PIPESTATUS[0]}" = 0 ] || rc=1
        done
      done ;;
    bench-dump)
      chat_target_8b
      step 420 python3 "$REPO/bench/bench_dump.py" --model /tmp/llama8b --engine sglang \
        --device cuda --dtype bfloat16 --repeat 2 --synthetic-mb 0 --batch-tokens 16384 \
        --draft-vocab-size 32000 --engine-arg attention_backend=triton \
        --engine-arg max_batch_rows=256 --engine-arg max_batch_tokens=16384 \
        | tee "$OUT/bench_dump.txt"; [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    bench-dump-large)
      # Hidden mode on DUMP_COPIES (10) x the sample chats (~385k tokens), so the dump's fixed costs
      # (writing the 1 GB LM head once, start-up) weigh as little as in a real dump.
      chat_target_8b
      chats=$REPO/src/eagle3_target/data/sample_chats.jsonl
      for i in $(seq ${DUMP_COPIES:-10}); do cat "$chats"; done > /tmp/chats-large.jsonl
      step 560 python3 "$REPO/bench/bench_dump.py" --model /tmp/llama8b --engine sglang \
        --device cuda --dtype bfloat16 --repeat ${DUMP_REPEAT:-3} --synthetic-mb ${SYNTHETIC_MB:-2048} --batch-tokens 16384 \
        --modes hidden --data /tmp/chats-large.jsonl --shard-size-mb 256 --breakdown --check --variants ${VARIANTS:-base} \
        --engine-arg attention_backend=triton \
        --engine-arg max_batch_rows=256 --engine-arg max_batch_tokens=16384 \
        | tee "$OUT/bench_dump_large.txt"; [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    cli-dump)
      # The CLI end to end on the 8B shape (engine load included): its summary says how many
      # rows the render process took (all of them when its start overlapped the engine load).
      # CLI_BREAKDOWN=1 and CLI_STACKS=$OUT/stacks: see scripts/gpu/cli_dump.py.
      chat_target_8b
      for i in $(seq ${CLI_COPIES:-4}); do cat "$REPO/src/eagle3_target/data/sample_chats.jsonl"; done > /tmp/chats-cli.jsonl
      # CLI_VARIANTS (base) and CLI_ROUNDS (1): "prewarm" sets CLI_PREWARM=$CLI_PREWARM_SPEC,
      # "warmup" CLI_WARMUP=1 and "warmup-small" CLI_WARMUP=$CLI_WARMUP_SMALL (1x16) (see
      # cli_dump.py), "p0" passes --prefetch 0 (the forwards on
      # the main thread), "engine" runs the engine alone in a fresh process on the dump's
      # batches (CLI_ENGINE_ONLY=1); the variants alternate within each round, one file each.
      for round in $(seq ${CLI_ROUNDS:-1}); do
        for variant in $(echo "${CLI_VARIANTS:-base}" | tr , " "); do
          warm=""; [ "$variant" = prewarm ] && warm=${CLI_PREWARM_SPEC:?prewarm needs CLI_PREWARM_SPEC}
          up=0; [ "$variant" = warmup ] && up=1; [ "$variant" = warmup-small ] && up=${CLI_WARMUP_SMALL:-1x16}
          extra=""; [ "$variant" = p0 ] && extra="--prefetch 0"
          only=0; [ "$variant" = engine ] && only=1
          rm -rf /tmp/cli-dump
          CLI_ENGINE_ONLY=$only CLI_PREWARM=$warm CLI_WARMUP=$up step 300 python3 "$S/cli_dump.py" dump --model /tmp/llama8b --engine sglang --dtype bfloat16 \
            --data /tmp/chats-cli.jsonl --out /tmp/cli-dump --batch-tokens 16384 $extra \
            --engine-arg attention_backend=triton --engine-arg max_batch_rows=256 --engine-arg max_batch_tokens=16384 \
            | tee "$OUT/cli_dump_${variant}_$round.txt"; [ "${PIPESTATUS[0]}" = 0 ] || rc=1
        done
      done
      rm -rf /tmp/cli-dump ;;
    diag-sync)
      # Whether a hidden-mode engine call waits for the GPU, and where: the padded path
      # against the packed one, SYNC_COPIES (8) x the sample chats (scripts/gpu/diag_sync.py).
      chat_target_8b
      for i in $(seq ${SYNC_COPIES:-8}); do cat "$REPO/src/eagle3_target/data/sample_chats.jsonl"; done > /tmp/chats-sync.jsonl
      step 300 python3 "$S/diag_sync.py" --model /tmp/llama8b --engine sglang --device cuda --dtype bfloat16 \
        --data /tmp/chats-sync.jsonl --batch-tokens 16384 --rounds ${SYNC_ROUNDS:-3} \
        --engine-arg attention_backend=triton --engine-arg max_batch_rows=256 --engine-arg max_batch_tokens=16384 \
        | tee "$OUT/diag_sync.txt"; [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    diag-dump)
      # Where the dump loses engine throughput: the engine alone, then with the host
      # copies, the shard writes, synthetic disk writes beside it, and run_dump itself,
      # on DIAG_COPIES (12) x the sample chats (scripts/gpu/diag_dump_stages.py).
      chat_target_8b
      for i in $(seq ${DIAG_COPIES:-12}); do cat "$REPO/src/eagle3_target/data/sample_chats.jsonl"; done > /tmp/chats-diag.jsonl
      step 560 python3 "$S/diag_dump_stages.py" --model /tmp/llama8b --engine sglang --device cuda --dtype bfloat16 \
        --data /tmp/chats-diag.jsonl --batch-tokens 16384 --rounds ${DIAG_ROUNDS:-2} ${DIAG_ARGS:-} \
        --engine-arg attention_backend=triton --engine-arg max_batch_rows=256 --engine-arg max_batch_tokens=16384 \
        --out "$OUT/diag_dump.json" | tee "$OUT/diag_dump.txt"; [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    export-8b)
      # The trainers' formats at the 8B shape: a draft-mode dump with --with-prenorm (SGLang,
      # EXPORT_ROWS (200) sample chats cut at 512 tokens), then both exports of it; prints
      # bytes/token and MB/s of each (bench/bench_export.py --dump). Needs datasets + pyarrow.
      chat_target_8b
      head -n ${EXPORT_ROWS:-200} "$REPO/src/eagle3_target/data/sample_chats.jsonl" > /tmp/chats-export.jsonl
      rm -rf /tmp/export-dump /tmp/export-work; mkdir -p /tmp/export-work
      step 120 python3 -m eagle3_target.cli vocab --model /tmp/llama8b --data /tmp/chats-export.jsonl \
        --draft-vocab-size 32000 --out /tmp/export-vocab.safetensors
      step 420 python3 -m eagle3_target.cli dump --model /tmp/llama8b --engine sglang --dtype bfloat16 \
        --data /tmp/chats-export.jsonl --out /tmp/export-dump --mode draft --vocab /tmp/export-vocab.safetensors \
        --with-prenorm --max-length 512 --batch-tokens 16384 --engine-arg attention_backend=triton \
        --engine-arg max_batch_rows=256 --engine-arg max_batch_tokens=16384 | tee "$OUT/export_dump.txt"
      python3 -c 'import pyarrow, pandas, datasets' 2>/dev/null || echo "no pyarrow/pandas/datasets here: add their wheels to GPU_DIR/extra for the speculators export"
      step 420 python3 "$REPO/bench/bench_export.py" --formats ${EXPORT_FORMATS:-speculators,nemo} --dump /tmp/export-dump --vocab /tmp/export-vocab.safetensors \
        --model /tmp/llama8b --workdir /tmp/export-work --json "$OUT/bench_export.json" | tee "$OUT/bench_export.txt"
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1
      # EXPORT_KEEP=1 leaves the dump and vocabulary in /tmp for a later call on the same
      # machine (the speculators export's wheels do not fit a carry beside SGLang's).
      [ -n "${EXPORT_KEEP:-}" ] || rm -rf /tmp/export-dump /tmp/export-work ;;
    check-client)
      # The client's CUDA path (pinned reads, non-blocking device copies) vs in process.
      step 60 python3 "$S/make_target.py" tiny-peaked /tmp/tiny-peaked
      step 240 python3 "$S/check_client_cuda.py" /tmp/tiny-peaked | tee "$OUT/check_client.txt"
      [ "${PIPESTATUS[0]}" = 0 ] || rc=1 ;;
    bench-transport)
      # One 268 MB answer over loopback: the old and new send and read paths, under
      # uvicorn's httptools as shipped and under the guarded protocol serve runs, the two
      # in turn TRANSPORT_ROUNDS (1) times, one file each.
      for round in $(seq ${TRANSPORT_ROUNDS:-1}); do
        step 300 python3 "$REPO/bench/bench_transport.py" | tee "$OUT/bench_transport_$round.txt"
        step 300 python3 "$REPO/bench/bench_transport.py" --http guarded \
          | tee "$OUT/bench_transport_guarded_$round.txt"
      done ;;
    diag-io)
      # The I/O ceilings of this host: disk, sha256, memcpy, device-to-host, loopback HTTP.
      step 300 python3 "$S/diag_io.py" --dir /tmp --mb 4096 --http-mb 256 | tee "$OUT/diag_io.txt" ;;
    *) echo "unknown stage $stage"; rc=1 ;;
  esac
done
if [ -d /tmp/fiws/.cache ]; then
  (cd /tmp/fiws && tar czf "$OUT/fi-cache.tgz" .cache) && ls -la "$OUT/fi-cache.tgz"
fi
echo "== $(date -u +%T) done rc=$rc"
exit $rc
