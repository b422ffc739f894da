#!/usr/bin/env bash
# Runs the SGLang engine's GPU validation and/or benchmark on a device-tool machine.
#
#   bash scripts/gpu/sglang_device.sh GPU_DIR STAGE...      STAGE: validate-tiny validate-8b bench
#
# GPU_DIR (carried, git-ignored) holds bundle/ (../shared/gpu/build-sglang-bundle.sh),
# jit-caches-sglang-0.5.16-h100.tgz, optionally fi-cache.tgz (flashinfer JIT cache from an
# earlier run), and code/ (src/, scripts/, bench/ of this repository). Results and one log
# go to $OUT; the flashinfer JIT cache is packed to $OUT/fi-cache.tgz for the next run.
set -uo pipefail
G=$(cd "${1:?usage: sglang_device.sh GPU_DIR STAGE...}" && pwd); shift
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG=$OUT/device.log
exec > >(tee -a "$LOG") 2>&1
echo "== $(date -u +%FT%TZ) stages: $*"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
bash "$G/bundle/install.sh" | tail -1
tar xzf "$G/jit-caches-sglang-0.5.16-h100.tgz" -C /tmp
[ -f "$G/fi-cache.tgz" ] && mkdir -p /tmp/fiws && tar xzf "$G/fi-cache.tgz" -C /tmp/fiws
export PYTHONPATH=/tmp/site:$G/code/src SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1 \
  TVM_FFI_CACHE_DIR=/tmp/tvmcache TRITON_CACHE_DIR=/tmp/tritoncache FLASHINFER_WORKSPACE_BASE=/tmp/fiws \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TOKENIZERS_PARALLELISM=false
S=$G/code/scripts/gpu
rc=0
step() {  # step SECONDS CMD...: a hang in one stage must not eat the whole call
  echo "== $(date -u +%T) $*"
  timeout "$@" || { echo "== FAILED ($?): $*"; rc=1; }
}
for stage in "$@"; do
  case $stage in
    validate-tiny)
      step 60 python3 "$S/make_target.py" tiny-peaked /tmp/tiny-peaked
      step 240 python3 "$S/validate_sglang.py" --name tiny-peaked --model /tmp/tiny-peaked \
        --attention-backend triton --aux-ids 5,0,3 --out "$OUT/validate_tiny.json" ;;
    validate-8b)
      step 180 python3 "$S/make_target.py" llama3-8b /tmp/llama8b
      step 420 python3 "$S/validate_sglang.py" --name llama3-8b --model /tmp/llama8b \
        --attention-backend flashinfer --lengths 2048,1000,517,300 --aux-ids 28,1,15 \
        --out "$OUT/validate_8b.json" ;;
    bench)
      step 180 python3 "$S/make_target.py" llama3-8b /tmp/llama8b
      step 420 python3 "$G/code/bench/bench_sglang.py" --model /tmp/llama8b --batch 8 --seq 2048 \
        --attention-backend flashinfer --out "$OUT/bench_sglang.json" ;;
    *) echo "unknown stage $stage"; rc=1 ;;
  esac
done
if [ -d /tmp/fiws/.cache ]; then
  (cd /tmp/fiws && tar czf "$OUT/fi-cache.tgz" .cache) && ls -la "$OUT/fi-cache.tgz"
fi
echo "== $(date -u +%T) done rc=$rc"
exit $rc
