# Runner for the lent GPU machine, one stage per device call (each under 10 minutes).
# After the TVM bundle is staged (../shared/gpu/README.md) and test wheels are in .whl/:
#   bash scripts/gpu-check.sh tests      # the whole gpu suite, default kernels
#   bash scripts/gpu-check.sh kernels    # the gpu tests of detection, the tensor-core tiles, sparse_matmul, attention's dense products and SparseMoE
#   bash scripts/gpu-check.sh spmm       # benchmarks/spmm.py: fp16, every case at 4096^3, some at 8192^3
#   bash scripts/gpu-check.sh tuning     # benchmarks/tuning.py --quick at 4096^3 fp16
#   bash scripts/gpu-check.sh sweep      # scripts/gpu_tile_sweep.py: the reduce tile's knobs at 8192^3
#   bash scripts/gpu-check.sh warpgroup  # the gpu tests of the Hopper warpgroup tile and of the paths beside it
#   bash scripts/gpu-check.sh hopper     # the warpgroup tile's gpu tests, then spmm at 8192^3 for the cases it changed
#   bash scripts/gpu-check.sh tables     # the fallback's and the 32-row tile's gpu tests, then spmm for the tables of benchmarks/RESULTS.md
#   bash scripts/gpu-check.sh auto       # benchmarks/tuning.py at 8192^3 (32x1, 64x64), then benchmarks/models.py
#   bash scripts/gpu-check.sh host       # the compile test, models.py with the host's cProfile table
#   bash scripts/gpu-check.sh compare    # host time per call and the OPT FFN: a baseline tree carried in .baseline/, then this one
#   bash scripts/gpu-check.sh pending    # what no GPU has run: every tuner setting of 64x32, 128x8, 2-row chunks (since split k); the fallback's tests (since its probe turns); the strips' 16-bit adds; B read K-major (READS_B_AS_STORED); spmm of 1x32 and 1x64
#   bash scripts/gpu-check.sh tables14   # the 4096^3 spmm table and benchmarks/models.py, unrun since session 13
#   bash scripts/gpu-check.sh strips     # row pieces of k chunks on their warpgroup kernel: gpu tests (16-bit adds too), every setting, spmm of 1x32 and 1x64
# Logs and results are copied under $OUT when the device tool provides it.
set -uo pipefail
stage=${1:?usage: scripts/gpu-check.sh tests|kernels|spmm|tuning|sweep|warpgroup|hopper|tables|auto|host|compare|strips|pending|tables14}
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
source scripts/gpu-env.sh
out=${OUT:-/tmp/pit-gpu-out}
mkdir -p "$out"
touch /tmp/pit-gpu-stage-start
case "$stage" in
  compare)  # .baseline/ holds pit_compiler, ir, schedules and codegen of the commit to compare with
    rm -rf /tmp/pit-old && mkdir -p /tmp/pit-old/pit_compiler && cp -r .baseline/pit_compiler/. /tmp/pit-old/pit_compiler/
    for s in ir schedules codegen; do cp -r ".baseline/$s" "/tmp/pit-old/pit_compiler/$s"; done
    new=$PYTHONPATH old=/tmp/pit-old:${PYTHONPATH#/tmp/pit-src:}
    for tree in old new old new; do  # alternated: the machines' host time drifts between runs
      PYTHONPATH=${!tree} timeout 100 python3 -P scripts/host_breakdown.py --size "${HOST_SIZE:-4096}" --linear --no-steps \
        --repeat 200 2>&1 | tee -a "$out/host-$tree.log" | grep "host issue"
    done
    for tree in old new old new; do
      PYTHONPATH=${!tree} timeout 100 python3 -P benchmarks/models.py --cases opt 2>&1 | tee -a "$out/models-opt-$tree.log" | grep -E "eager|pit "
    done ;;
  tests) timeout 540 python3 -P -m pytest -q -p no:cacheprovider -m gpu --maxfail=15 --durations=8 2>&1 | tee "$out/gpu-tests.log" | tail -25 ;;
  kernels)
    timeout 540 python3 -P -m pytest -q -p no:cacheprovider -m gpu tests/codegen/test_detect_cuda.py \
      tests/codegen/test_reduce_tensor_cores.py tests/test_sparse_matmul.py tests/tuning/test_tuning_gpu.py \
      "tests/nn/test_attention.py::test_dense_products_where_pit_has_no_tensor_core_kernel" tests/nn/test_moe.py 2>&1 | tee "$out/gpu-kernels.log" | tail -25 ;;
  spmm)  # all cases at 4096^3, then the fast micro-tiles at 8192^3 merged into the same table
    timeout 200 python3 -P benchmarks/spmm.py --sizes 4096 --dtypes float16 2>&1 | tee "$out/spmm.log" | tail -40
    timeout 200 python3 -P benchmarks/spmm.py --sizes 8192 --dtypes float16 --micro-tiles row,32x1,32x32,64x64 \
      --sparsities 0,0.9,0.99 --merge 2>&1 | tee -a "$out/spmm.log" | tail -40 ;;
  tuning)  # 32x1 and 32x32 at 4096^3 (--quick); the tile database comes back under $OUT
    timeout "${TUNING_TIMEOUT:-540}" python3 -P benchmarks/tuning.py --sizes "${TUNING_SIZES:-4096}" --quick --db "$out/tiles.json" 2>&1 \
      | tee "$out/tuning.log" | tail -40 ;;
  warpgroup)
    timeout 540 python3 -P -m pytest -q -p no:cacheprovider -m gpu --maxfail=20 --durations=5 tests/codegen/test_warpgroup.py \
      tests/codegen/test_reduce_tensor_cores.py tests/test_sparse_matmul.py 2>&1 | tee "$out/gpu-warpgroup.log" | tail -40 ;;
  hopper)
    timeout 200 python3 -P -m pytest -q -p no:cacheprovider -m gpu tests/codegen/test_warpgroup.py 2>&1 | tee "$out/gpu-hopper.log" | tail -8
    timeout 330 python3 -P benchmarks/spmm.py --sizes 8192 --dtypes float16,bfloat16 --micro-tiles row,32x1,32x32,64x64 \
      --sparsities 0,0.5,0.9,0.99 --merge 2>&1 | tee "$out/spmm.log" | grep -E " (pit|pit_kernel|cublas|triton_bsr|torch_rowgather|pit_detect) " ;;
  tables)  # each spmm run writes its records (merged) before the next starts
    timeout 60 python3 -P -m pytest -q -p no:cacheprovider -m gpu tests/runtime/test_recent_counts.py tests/test_sparse_matmul.py \
      -k "fallback or wait" 2>&1 | tee "$out/gpu-tables.log" | tail -3
    cases=(--micro-tiles row,32x1,32x32,64x64 --sparsities 0,0.5,0.9,0.99 --merge)
    timeout 150 python3 -P benchmarks/spmm.py --sizes 8192 --dtypes float16 "${cases[@]}" 2>&1 | tee "$out/spmm.log" | grep -c checked=True
    timeout 150 python3 -P benchmarks/spmm.py --sizes 8192 --dtypes bfloat16 "${cases[@]}" 2>&1 | tee -a "$out/spmm.log" | grep -c checked=True
    timeout 80 python3 -P benchmarks/spmm.py --sizes 4096 --dtypes float16 "${cases[@]}" 2>&1 | tee -a "$out/spmm.log" | grep -c checked=True
    grep -E "checked=False|Error" "$out/spmm.log" | head ;;
  auto)  # the README's tuning summary, then the models table (each writes its JSON when it ends)
    timeout 330 python3 -P benchmarks/tuning.py --sizes 8192 --micro-tiles 32x1,64x64 --sparsities 0.5,0.95 \
      --patterns 32x1,64x64 --seeds 1 --trials 32 --repeat 5 --db "$out/tiles.json" 2>&1 | tee "$out/tuning.log" | tail -32
    timeout "${MODELS_TIMEOUT:-200}" python3 -P benchmarks/models.py 2>&1 | tee "$out/models.log" | grep -E "eager|pit " ;;
  host)  # the compile test, then where the host time of PIT's models goes (cProfile) beside their GPU kernels
    timeout 100 python3 -P -m pytest -q -p no:cacheprovider -m gpu "tests/nn/test_attention.py::test_torch_compile_traces_attention_in_one_graph" \
      2>&1 | tee "$out/gpu-host.log" | tail -3
    timeout "${MODELS_TIMEOUT:-200}" python3 -P benchmarks/models.py --cases "${MODELS:-opt,bert,longformer}" --profile --host-profile 2>&1 \
      | tee "$out/models.log" | grep -E "eager|pit " ;;
  pending)  # what no GPU ran after sessions 13-15: every tuner setting of 64x32, 128x8, 2-row chunks and of the strips
    # (16-bit adds among them); B stored (n, k) read K-major (the tests turn READS_B_AS_STORED on); the fallback's gpu
    # tests after its probe turns; then spmm of the strips under their fitted crossover (float16 and bfloat16)
    t=tests/codegen/test_warpgroup.py::test_every_setting_the_tuner_tries_is_correct
    timeout 300 python3 -P -m pytest -q -p no:cacheprovider -m gpu --maxfail=10 "$t[64-(64, 32)]" "$t[128-(128, 8)]" "$t[64-(2, None)]" \
      "$t[64-(1, 32)]" "$t[64-(2, 24)]" tests/codegen/test_warpgroup.py::test_strips_add_in_16_bits_where_set \
      tests/codegen/test_warpgroup.py::test_a_linear_weight_is_read_k_major_on_warpgroups \
      tests/codegen/test_warpgroup.py::test_every_setting_reads_a_linear_weight_k_major \
      tests/test_sparse_matmul.py tests/runtime/test_recent_counts.py \
      -k "every_setting or 16_bits or k_major or fallback or wait or ahead or recent" \
      2>&1 | tee "$out/gpu-pending.log" | tail -4
    timeout 200 python3 -P benchmarks/spmm.py --sizes 4096,8192 --dtypes float16,bfloat16 --micro-tiles 1x32,1x64 \
      --sparsities 0,0.5,0.9,0.95,0.99 --merge 2>&1 | tee "$out/spmm-strips.log" | grep -E " (pit|cublas) " ;;
  tables14)  # the 4096^3 table and the models, which session 13 left unrun
    timeout 90 python3 -P benchmarks/spmm.py --sizes 4096 --dtypes float16 --micro-tiles row,32x1,32x32,64x64 --sparsities 0,0.5,0.9,0.99 \
      --merge 2>&1 | tee "$out/spmm.log" | grep -E " (pit|cublas) "
    timeout "${MODELS_TIMEOUT:-180}" python3 -P benchmarks/models.py 2>&1 | tee "$out/models.log" | grep -E "eager|pit " ;;
  strips)  # row pieces of k chunks (1x32, 1x64, ...) on their own warpgroup kernel: gpu tests, every setting, spmm
    t=tests/codegen/test_warpgroup.py
    python3 -P -m pytest -q -p no:cacheprovider -m gpu --collect-only "$t" 2>/dev/null \
      | grep -E "\((1|2), (8|16|24|32|64)\)|graph_capture" > /tmp/strip-tests
    echo "$(wc -l < /tmp/strip-tests) strip tests"
    tr '\n' '\0' < /tmp/strip-tests | timeout 170 xargs -0 python3 -P -m pytest -q -p no:cacheprovider -m gpu --maxfail=10 \
      2>&1 | tee "$out/gpu-strips.log" | tail -6
    for c in ${STRIP_SWEEPS:-1x32:0.99 1x32:0.9 1x64:0.95}; do
      timeout 65 python3 -P scripts/gpu_tile_sweep.py --cases $c --json "$out/sweep-${c/:/-}.json" 2>&1 \
        | tee -a "$out/sweep-strips.log" | sort -t: -k3 -n | head -5
    done
    timeout 140 python3 -P benchmarks/spmm.py --sizes 4096,8192 --dtypes float16 --micro-tiles 1x32,1x64 \
      --sparsities "${STRIP_SPARSITIES:-0,0.5,0.9,0.95,0.99}" \
      --merge 2>&1 | tee "$out/spmm-strips.log" | grep -E " (pit|pit_kernel|cublas|cusparse_csr) " ;;
  sweep)
    timeout 540 python3 -P scripts/gpu_tile_sweep.py --json "$out/sweep.json" 2>&1 | tee "$out/sweep.log" | tail -80 ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
# The results this stage wrote (the device tool brings back a limited number of files).
find benchmarks/results -type f -newer /tmp/pit-gpu-stage-start -exec cp {} "$out/" \;
