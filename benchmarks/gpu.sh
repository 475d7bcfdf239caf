#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one command, about 10
# minutes on one H100/H200, from the repository's root:
#
#   bash benchmarks/gpu.sh [OUT_DIR]
#
# 1. benchmarks/peer.py at PaliGemma-3B-224 in bfloat16: omnismola's LoRA
#    and SMoLA steps against transformers' PaliGemma + PEFT LoRA, alternating.
# 2. benchmarks/step.py's paligemma_3b_224 suite: full fine-tuning, LoRA,
#    SMoLA 3 x 16, each in its own process, with MFU.
#
# Needs jax with CUDA, flax, optax, orbax, ml_collections, absl-py; torch,
# transformers and peft for the peer (skipped, and said so, without them).
# No TensorFlow or SeqIO: the benchmarks build random batches.
# TINY=1 runs the same two commands on the tiny shapes, in float32, on any
# machine (the test of this script); PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [[ "${TINY:-0}" == 1 ]]; then
  peer_args=(--shape=tiny --dtype=float32 --batch=2 --text_len=8
             --rounds=1 --steps=1 --warmup=1)
  suite_args=(--suite=smola_vs_lora --preset=tiny --dtype=float32 --batch=2
              --text_len=8 --steps=1 --warmup=1)
else
  peer_args=(--shape=paligemma_3b_224 --dtype=bfloat16 --batch=8
             --text_len=64 --rounds=3 --steps=3 --warmup=2)
  suite_args=(--suite=paligemma_3b_224 --dtype=bfloat16 --batch=8
              --text_len=64 --steps=10 --warmup=2)
fi
"${PYTHON:-python3}" -m benchmarks.peer "${peer_args[@]}" 2>&1 | tee "$out/peer.txt"
"${PYTHON:-python3}" -m benchmarks.step "${suite_args[@]}" 2>&1 | tee "$out/step_suite.txt"
