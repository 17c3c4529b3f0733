#!/bin/bash
# GPU sanity run of smoke experiments (trainer=gpu: one GPU, bf16-mixed): each trains, validates and
# logs; prints the first and last value of every val/* and train/loss* metric. Not a timing.
#
#   bash benchmarks/gpu_smoke.sh smoke_splitmask smoke_retrieval smoke_vitgan
#
# On the lent device machine (no network; see /work/.library/device/README.md), the packages its image
# lacks travel as wheels in an ignored folder .whl (hydra-core, omegaconf, antlr4-python3-runtime built
# with `pip wheel`, webdataset, braceexpand, timm); with WHEELS=.whl they and this package are installed
# under /tmp first. Outputs (logs, metrics.csv copies) go to $OUT (default /tmp/gpu_smoke).
set -o pipefail
OUT=${OUT:-/tmp/gpu_smoke}; mkdir -p "$OUT"
REPO=$(pwd)
if [ -n "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/bl . || exit 1
  export PYTHONPATH=/tmp/bl:/tmp/site
fi
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
cd /tmp || exit 1
$PY -c "import torch, timm, pytorch_lightning as pl; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', pl.__version__, 'cuda', torch.cuda.is_available())"
status=0
for exp in "$@"; do
  start=$(date +%s)
  $PY -m beit_lightning experiment="$exp" trainer=${TRAINER:-gpu} logger=csv hydra.run.dir=/tmp/gpu_smoke_runs/"$exp" $EXTRA > "$OUT/$exp.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && status=1
  echo "== $exp rc=$rc $(( $(date +%s) - start )) s"
  f=$(find /tmp/gpu_smoke_runs/"$exp" -name metrics.csv | head -1)
  [ -n "$f" ] && cp "$f" "$OUT/$exp.csv" && $PY "$REPO/benchmarks/summarise_metrics.py" "$f"
  [ $rc -ne 0 ] && tail -30 "$OUT/$exp.log"
done
exit $status
