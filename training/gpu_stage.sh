#!/usr/bin/env bash
# On the GPU machine: copy what .carry/ holds in this call into runs/carry/ (git-ignored and never carried, so
# it stays on the machine between calls while the machine is held). run_all.sh reads runs/carry/<part> before
# .carry/<part>, so a run started after staging does not depend on later calls carrying .carry again, and
# .carry's parts can travel in separate calls when the working tree plus all of .carry is over the 64 MiB one
# call may carry:
#   run  command="bash training/gpu_stage.sh"                          carry=[".carry/fashion-mnist"]
#   run  command="bash training/gpu_launch.sh --text-only runs/text"   carry=[".carry/minilm"]
# (gpu_launch.sh stages too). A part not in .carry/ in this call keeps its earlier staged copy.
cd "$(dirname "$0")/.."
mkdir -p runs/carry
for d in .carry/*/; do
  [ -d "$d" ] || continue
  n=$(basename "$d")
  rm -rf "runs/carry/$n.tmp"
  cp -r "$d" "runs/carry/$n.tmp" && rm -rf "runs/carry/$n" && mv "runs/carry/$n.tmp" "runs/carry/$n" \
    || { echo "gpu_stage: copying $d failed"; exit 1; }
done
for d in runs/carry/*/; do
  [ -d "$d" ] && echo "staged: $d $(du -sm "$d" | cut -f1) MiB"
done
exit 0
