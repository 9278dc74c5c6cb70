# Runner for the lent GPU machine, one stage per device call (each under 10 minutes).
# After the TVM bundle is staged (../shared/gpu/README.md) and test wheels are in .whl/:
#   bash scripts/gpu-check.sh tests      # the whole gpu suite, default kernels
#   bash scripts/gpu-check.sh unverified # the opt-in kernels' gpu tests (PIT_UNVERIFIED_CUDA_KERNELS)
#   bash scripts/gpu-check.sh spmm       # benchmarks/spmm.py, default then opt-in kernels, 4096^3 fp16
#   bash scripts/gpu-check.sh tuning     # benchmarks/tuning.py at 4096^3 fp16
# Logs and results are copied under $OUT when the device tool provides it.
set -uo pipefail
stage=${1:?usage: scripts/gpu-check.sh tests|unverified|spmm|tuning}
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
source scripts/gpu-env.sh
out=${OUT:-/tmp/pit-gpu-out}
mkdir -p "$out"
pytest() { python3 -P -m pytest -q -p no:cacheprovider "$@"; }
case "$stage" in
  tests) pytest -m gpu -x 2>&1 | tee "$out/gpu-tests.log" | tail -25 ;;
  unverified)
    PIT_UNVERIFIED_CUDA_KERNELS=1 pytest -m gpu tests/codegen/test_detect_cuda.py tests/codegen/test_reduce_tensor_cores.py \
      tests/test_sparse_matmul.py tests/tuning/test_tuning_gpu.py 2>&1 | tee "$out/gpu-unverified.log" | tail -25 ;;
  spmm)
    python3 -P benchmarks/spmm.py --sizes 4096 --dtypes float16 2>&1 | tee "$out/spmm-default.log" | tail -40
    PIT_UNVERIFIED_CUDA_KERNELS=1 python3 -P benchmarks/spmm.py --sizes 4096 --dtypes float16 2>&1 \
      | tee "$out/spmm-unverified.log" | tail -40 ;;
  tuning) python3 -P benchmarks/tuning.py --sizes 4096 2>&1 | tee "$out/tuning.log" | tail -40 ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
cp -r benchmarks/results "$out/" 2>/dev/null || true
