#!/bin/bash
# The guidance-scale study of BENCHMARKS.md ("Guidance scale"): on the VAEs of a `make bench` run, train the tiny
# prior per seed (the bench prior's steps, the default warm-up EMA), sample `--like` the evaluation cells with
# joint guidance at each scale w, and print W2 / MMD² / FD / 1-NN (2 replicates each). ~15 min on 2 cores.
#   bash python/benchmarks/bench_guidance.sh <make bench workdir, e.g. .cache/bench/full> <outdir> ["1 1.5 2 3"] ["0 1"]
set -euo pipefail
B=${1:?usage: bench_guidance.sh <make bench workdir> <outdir> [scales] [seeds]}
OUT=${2:?outdir}; mkdir -p "$OUT"
SCALES=${3:-1 1.5 2 3}
SEEDS=${4:-0 1}
S=${VENV:-.venv}/bin/sclatent
PY=${VENV:-.venv}/bin/python
for ds in sc_mixology pbmc3k; do
  if [ $ds = pbmc3k ]; then real=$B/pbmc3k/prepare/test.h5ad; else real=$B/sc_mixology/eval_cells/test_seen.h5ad; fi
  steps=$($PY -c "import json; print(json.load(open('$B/$ds/prior/config.json'))['train_config']['max_steps'])")
  for seed in $SEEDS; do
    P=$OUT/$ds/prior_s$seed
    [ -f $P/checkpoint.pt ] || $S train-prior --latents $B/$ds/encode/latents.npz --outdir $P --preset tiny --max-steps $steps --seed $seed --threads 2 --no-progress 2>>$OUT/stderr.log
    for w in $SCALES; do
      o=$OUT/$ds/gen_w${w}_s$seed; mkdir -p $o
      for r in 0 1; do
        $S sample --vae $B/$ds/vae --prior $P --like $real --out $o/rep$r.h5ad --seed $seed --replicate $r --threads 2 --guidance joint --cfg-scale $w 2>>$OUT/stderr.log
      done
      $S gather --out $o/gen.h5ad $o/rep0.h5ad $o/rep1.h5ad 2>>$OUT/stderr.log
      $S evaluate --real $real --generated $o/gen.h5ad --outdir $o/ev --no-floor 2>>$OUT/stderr.log >/dev/null
      $PY -c "
import json;m=json.load(open('$o/ev/metrics.json'));o=m['generation']['overall']
print('$ds','seed $seed','w=$w',*(k+'=%.4g'%o[k]['mean'] for k in ('w2','mmd2_rbf','fd','one_nn_accuracy')), flush=True)"
    done
  done
done
