#!/usr/bin/env bash
# The GPU tier under both implementations on ONE GPU (issue 21), as run for tests/gpu/RESULTS.md, in two parts that
# each fit a 600 s device call (side_by_side.sh lanes; logs packed into LOG_DIR.tgz):
#   bash tests/gpu/impl_tier.sh te    LOG_DIR SECONDS   TE lanes (Transformer Engine must import) + the fused SFT and
#                                                        quickstart lanes
#   bash tests/gpu/impl_tier.sh bench LOG_DIR SECONDS   benchmarks/train_step.py --suite alone on the GPU (TE rows
#                                                        included), then the BF16 diagnosis and the fused import lane
#   bash tests/gpu/impl_tier.sh savers LOG_DIR SECONDS  the memory savers (issue 23): recompute under fused, te and
#                                                        reference; lighter optimizer states over 200 tiny steps and
#                                                        their resume (TE must import: FusedAdam); CP2 against
#                                                        CP1 under TE (on one GPU its two ranks share it); the planner's
#                                                        rows are savers-plan (their 20b-width steps take ~70 GiB:
#                                                        beside these lanes they run an 80 GB card out of memory)
#   bash tests/gpu/impl_tier.sh savers-plan LOG_DIR SECONDS  the planner against measured peaks with each saver, and
#                                                        their step-time cost (benchmarks/train_step.py rows), alone
# FP32 parity under TE needs NVIDIA_TF32_OVERRIDE=0 (TE's FP32 GEMMs run in TF32 otherwise); BF16 is unaffected.
# Environment: megatron-core / modelopt wheels and TE on PYTHONPATH, GPTOSS_NEMO_TOKENIZER_DIR (tiny_ckpt.py).
set -uo pipefail
cd "$(dirname "$0")/../.."
part=$1; logs=$2; limit=$3
P="python3 -m pytest -q -s -p no:cacheprovider"
G=tests/gpu
# packing under TE is refused below cuDNN 9.26 (the image has 9.19): the TE lanes train unpacked
TE="GPU_TESTS_IMPL=te NVIDIA_TF32_OVERRIDE=0 GPU_TESTS_OVERRIDES=data.packing=false"
FU="GPU_TESTS_IMPL=fused NVIDIA_TF32_OVERRIDE=0"
case $part in
  te)
    bash $G/side_by_side.sh "$logs" "$limit" \
      "impl-sft=$TE $P $G/test_impl_gpu.py -k 'import_and_sft or packed'" \
      "impl-qat-mxfp4=$TE $P $G/test_impl_gpu.py -k 'qat and mxfp4'" \
      "impl-qat-nvfp4=$TE $P $G/test_impl_gpu.py -k 'qat and nvfp4'" \
      "te-import=$TE $P $G/test_import_gpu.py $G/test_model_gpu.py -k 'parity_ep1 or dequantization or commands_one_gpu or builds or yarn or sliding or router'" \
      "te-sft=$TE $P $G/test_sft_gpu.py -k 'one_gpu_learns or sigkill or (bf16_parity and ep1)'" \
      "te-pipeline=GPU_TESTS_IMPL=te $P $G/test_pipeline_gpu.py" \
      "fused-pipeline=GPU_TESTS_IMPL=fused $P $G/test_pipeline_gpu.py" \
      "fused-sft=$FU $P $G/test_sft_gpu.py -k 'one_gpu_learns or sigkill or (bf16_parity and ep1)'"
    ;;
  savers)
    S=$G/test_memory_savers_gpu.py
    bash $G/side_by_side.sh "$logs" "$limit" \
      "recompute-fused=$FU $P $S -k recompute" \
      "recompute-te=$TE $P $S -k recompute" \
      "recompute-reference=GPU_TESTS_IMPL=reference $P $S -k recompute" \
      "states-200=$FU GPU_TESTS_JOBS_PER_GPU=5 $P $S -k 200_tiny" \
      "states-resume=$FU $P $S -k resume" \
      "context-parallel=$P $G/test_context_parallel_gpu.py" \
      "recompute-diag=export NVIDIA_TF32_OVERRIDE=0 NVTE_ALLOW_NONDETERMINISTIC_ALGO=0; for i in te reference; do python3 $G/recompute_diagnose.py \$i; GPTOSS_NEMO_SKIP_PATCHES=moe_topk_sorted_without_grad python3 $G/recompute_diagnose.py \$i; done"
    ;;
  savers-plan)  # alone on the GPU: the step times are the benchmark's
    bash $G/side_by_side.sh "$logs" "$limit" "plan-savers=$P $G/test_plan_gpu.py -k memory_savers"
    ;;
  bench)
    mkdir -p "$logs"
    timeout $((limit / 2)) python3 benchmarks/train_step.py --suite --seq 4096 --variants fused te qat te-qat hf-flex \
      --profile --timeout 120 > "$logs/bench.log" 2>&1
    tail -c 6000 "$logs/bench.log" | grep -v '"top"' | cut -c1-600
    bash $G/side_by_side.sh "$logs" $((limit / 2 - 10)) \
      "diag=NVIDIA_TF32_OVERRIDE=0 python3 $G/bf16_diagnose.py --layers 3 --experts 16 --seq 2048 --batch 2" \
      "fused-import=$FU $P $G/test_import_gpu.py $G/test_model_gpu.py -k 'parity_ep1 or dequantization or commands_one_gpu or modelopt or builds or yarn or sliding or router or aux'"
    ;;
esac
