#!/usr/bin/env bash
# The GPU run book (issue 21): on a machine with one CUDA GPU, from the repository root,
#   bash benchmarks/gpu.sh [OUT]          (default OUT: gpu-runbook-<date>)
# checks bf16 autocast, torch.compile, fused AdamW and GPU-side augmentation, then measures every registered
# pretraining method at 96³ with nnU-Net widths (step time, samples/s, data wait, peak memory, MFU) next to the
# bare compiled DynUNet / PlainConvUNet step, and the PDCR/UAFS fine-tuning overhead, in <= 8 minutes of wall
# time. Writes OUT/gpu_runbook.json and OUT/gpu_runbook.md (paste the table into benchmarks/RESULTS.md).
# Extra arguments after OUT go to `volcontrast bench gpu` (e.g. --methods pcl,simclr --budget-s 300).
# On a CPU-only machine: `volcontrast bench gpu --smoke --out OUT` runs the same code at tiny sizes.
set -euo pipefail
out="${1:-gpu-runbook-$(date +%Y%m%d-%H%M%S)}"
shift || true
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
mkdir -p "$out"
timeout 600 volcontrast bench gpu --out "$out" "$@" 2>&1 | tee "$out/log.txt"
echo "wrote $out/gpu_runbook.json and $out/gpu_runbook.md"
