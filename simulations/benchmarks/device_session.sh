#!/usr/bin/env bash
# The one prepared run for a lent GPU (the `device` tool; issue 11 item 8), and its preparation here.
#
#   bash simulations/benchmarks/device_session.sh prepare   # here: wheels into .whl/, the data into shared/
#   device run: command "bash simulations/benchmarks/device_session.sh run", carry [".whl"], timeout_s 580
#
# `prepare` (on this machine, with the package registries): the wheels the GPU image lacks (monai,
# nibabel, pydicom; everything else amlp_core and the benchmarks import is there, torch included)
# into .whl/, and the hippocampus data into shared/ (which travels with the working tree). Both
# folders are listed in .git/info/exclude, so they are never committed.
#
# `run` (on the GPU machine): installs the wheels into /tmp/site, then
#   1. device_check: CUDA and bf16 autocast for every method and both pretraining decoders, and the
#      segmentation step; step times and peak memory ($OUT/device_check.json);
#   2. pretrain_gain: scratch fine-tuned at 10 % labels, supervised and with each semi-supervised method
#      (issue 27), seeds 0-2, 800 steps; then AMLP pretrained for $EPOCHS epochs (SparK's decoder) and
#      fine-tuned supervised and with each semi-supervised method ($OUT/pretrain_gain_gpu.json / .md).
#   3. privacy (issue 29; only with PRIVACY_S > 0): the privacy-utility curve at one site, every budget,
#      scratch / AMLP pretrained without DP / AMLP pretrained under DP, Poisson batches of 32, the
#      private recipes compared (PRIVACY_RECIPES: --recipe flags, by default the norms, biases and output layer
#      with SGD at 0.05, the CPU's best, and the decoder with SGD at 0.5) from AMLP with SparK's decoder, the
#      segmentation decoder started from it (PRIVACY_SET: --set flags, by default those two), resumable in
#      $OUT/privacy_gpu.json: a session lent a GPU for issue 29 runs GAIN_S=0 PRIVACY_S=380.
#   4. BUSI (issue 26; only with BUSI_S > 0): the floor (our network from scratch and MONAI's plain U-Net with
#      every label, at BUSI_SIZE, default 256 x 256, BUSI_STEPS steps, default 6000), then the methods at 10 %
#      labels, seeds 0-2, resumable in $OUT/busi_gpu.json: a session lent a GPU for issue 26 runs GAIN_S=0
#      BUSI_S=380 (prepare copies BUSI into shared/ too).
# Each stage has its own time box (CHECK_S, GAIN_S, PRIVACY_S seconds; 0 skips it) so that what finished comes back.
set -uo pipefail
cd "$(dirname "$0")/../.."
WHEELS="monai==1.6.1 nibabel==5.4.2 pydicom==3.0.2"

case "${1:-}" in
prepare)
  exclude="$(git rev-parse --git-path info/exclude)"
  for path in /.whl/ /shared/; do grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >>"$exclude"; done
  platforms=""
  for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=" --platform $p"; done
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
    -d .whl $WHEELS || exit 2
  mkdir -p shared/data
  for data in msd_hippocampus busi; do
    [ -d "shared/data/$data" ] || cp -r "../shared/data/$data" shared/data/ || exit 2
  done
  du -sh .whl shared
  ;;
run)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 2
  export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
  OUT="${OUT:-results/device}"
  mkdir -p "$OUT"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  timeout "${CHECK_S:-150}" python3 -m simulations.benchmarks.device_check --out "$OUT/device_check.json" 2>&1 \
    | tee "$OUT/device_check.log" | grep -v " INFO "
  [ "${GAIN_S:-380}" -gt 0 ] && timeout "${GAIN_S:-380}" python3 -m simulations.benchmarks.pretrain_gain --data shared/data/msd_hippocampus \
    --fractions 0.1 --finetune-steps 800 --curve-every 100 --set train.batch_size=4 --methods scratch,amlp \
    --semi none,mean_teacher,copy_paste --seeds 0,1,2 --pretrain-epochs "${EPOCHS:-300}" --variant "SparK decoder, GPU" \
    --set model.pretrain_decoder=unet --runs /tmp/gain_runs --out "$OUT/pretrain_gain_gpu.json" >"$OUT/gain.log" 2>&1
  echo "pretrain_gain exit $?"
  tail -40 "$OUT/gain.log"
  if [ "${PRIVACY_S:-0}" -gt 0 ]; then
    # shellcheck disable=SC2086
    timeout "$PRIVACY_S" python3 -m simulations.benchmarks.privacy --data shared/data/msd_hippocampus \
      --budgets none,recipe,8,3,16,1,32 --seeds 0 --seeds-at 8=0,1,2 --inits scratch,amlp,amlp_private \
      --finetune-steps 300 --curve-every 100 --pretrain-epochs "${EPOCHS:-300}" --set train.batch_size=32 \
      ${PRIVACY_RECIPES:---recipe nbo_sgd=privacy.trainable=norms_biases_output;privacy.optimizer=sgd;privacy.lr=0.05 --recipe decoder_sgd=privacy.trainable=decoder;privacy.optimizer=sgd;privacy.lr=0.5} \
      ${PRIVACY_SET:---set model.pretrain_decoder=unet --set train.init_decoder=true} --runs /tmp/privacy_runs --out "$OUT/privacy_gpu.json" >"$OUT/privacy.log" 2>&1
    echo "privacy exit $?"
    tail -30 "$OUT/privacy.log"
  fi
  if [ "${BUSI_S:-0}" -gt 0 ]; then
    size="${BUSI_SIZE:-256}"
    timeout "$BUSI_S" python3 -m simulations.benchmarks.pretrain_gain --data shared/data/busi/Dataset_BUSI_with_GT \
      --fractions 1.0,0.1 --methods scratch,unet,amlp,mae,mps_ams --semi none --seeds 0,1,2 \
      --finetune-steps "${BUSI_STEPS:-6000}" --curve-every 1000 --set "model.img_size=$size,$size" \
      --runs /tmp/busi_runs --out "$OUT/busi_gpu.json" >"$OUT/busi.log" 2>&1
    echo "busi exit $?"
    tail -30 "$OUT/busi.log"
  fi
  ;;
*)
  echo "usage: $0 prepare|run" >&2
  exit 2
  ;;
esac
