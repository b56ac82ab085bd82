#!/usr/bin/env bash
# Issue 17's U-Net levers on one GPU, each against the same run's baseline (about 15-20 minutes):
#   bash bench/issue17_levers.sh "$OUT"
# 1. kernel time by kind of the compiled SD1.5 forward at batch 32: ours, ours + fused GroupNorm+SiLU,
#    ours + FP8 linears (bench.profile_unet);
# 2. ours vs diffusers + compile + CUDA graphs at batch 2 and 32, with each lever (bench.unet_vs_diffusers;
#    the max|ours-diff| column is also the levers' error against fp16 diffusers);
# 3. the VAE decode per image: fp32 / bf16, eager / fused GroupNorm / compiled (bench.vae_decode);
# 4. attention, 3.9x its FLOP floor in run 21 (SD1.5's head dim 40): SDPA's other kernel families on both
#    sides (--sdpa-backend; a faster one is open to a diffusers user too, so it moves both columns).
# Run 21 (bench/RESULTS.md) measured 1-3; 4 is new.
set -uo pipefail
OUT=${1:?usage: bash bench/issue17_levers.sh OUT_DIR}
mkdir -p "$OUT"
run() {  # run NAME CMD...: each step's log in $OUT/NAME.log; a failing step does not stop the others
  local name=$1; shift
  echo "== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1; echo "   rc=$? ($(tail -1 "$OUT/$name.log" | cut -c1-100))"
}
run profile_base python -m bench.profile_unet --out "$OUT/profile_base"
run profile_fused_gn python -m bench.profile_unet --fused-groupnorm --out "$OUT/profile_fused_gn"
run profile_fp8 python -m bench.profile_unet --fp8 --out "$OUT/profile_fp8"
run uvd_fused_gn python -m bench.unet_vs_diffusers --which sd15 --batches 2,32 --fused-groupnorm --out "$OUT/uvd_fused_gn"
run uvd_fp8 python -m bench.unet_vs_diffusers --which sd15 --batches 2,32 --fp8 --out "$OUT/uvd_fp8"
run uvd_both python -m bench.unet_vs_diffusers --which sd15 --batches 2,32 --fused-groupnorm --fp8 --out "$OUT/uvd_both"
run vae_decode python -m bench.vae_decode --out "$OUT/vae_decode"
run uvd_sdpa_flash python -m bench.unet_vs_diffusers --which sd15 --batches 2,32 --sdpa-backend flash --out "$OUT/uvd_sdpa_flash"
run uvd_sdpa_efficient python -m bench.unet_vs_diffusers --which sd15 --batches 2,32 --sdpa-backend efficient --out "$OUT/uvd_sdpa_efficient"
