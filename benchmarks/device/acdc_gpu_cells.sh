#!/bin/bash
# One call of the device tool: the named cells of an ACDC GPU protocol side by side on the lent GPU
# (each `lowlabel bench --in-process --only CELL` in its own process), their records tarred to $OUT.
# Prepare here first (benchmarks/README.md, "A lent GPU machine in one call"): .gpu/acdc.tar (pack_acdc.py) and .gpu/whl (pydantic's
# wheels: the machine's Python lacks pydantic). Then, with the tool, carry [".gpu"] and run e.g.
#   CELLS="unimatch__ssl-labeled-3__s1 supervised__ssl-labeled-3__s1" LIMIT=535 bash benchmarks/device/acdc_gpu_cells.sh
# LIMIT (s) stops every cell in time for the tar: a stopped cell brings back its metrics, not a test score.
PROTO=${PROTO:-benchmarks/protocols/acdc-gpu-2k.yaml}
RES=${RES:-$(python3 -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$PROTO")}
LIMIT=${LIMIT:-500}
export PYTHONUNBUFFERED=1
[ -n "$SKIP_PIP" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
python3 benchmarks/device/unpack_acdc.py "${DATA_PARENT:-../shared/datasets}" .gpu/acdc.tar || exit 1
nvidia-smi -L 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
mkdir -p "$OUT/logs"
for c in $CELLS; do
  timeout "$LIMIT" python3 -c "import sys; from lowlabel.cli import main; sys.exit(main())" \
    bench "$PROTO" --in-process --only "$c" > "$OUT/logs/$c.log" 2>&1 &
done
wait
date -u
tar czf "$OUT/res.tgz" --exclude='*.pt' -C "$OUT" logs -C "$PWD" "benchmarks/results/$RES"
rm -rf "$OUT/logs"
tail -n 2 "benchmarks/results/$RES"/runs/*/metrics.jsonl | cut -c1-300
