#!/bin/bash
# The EMA study of BENCHMARKS.md ("EMA of the prior's weights"): on the VAEs of a `make bench` run, retrain the tiny
# prior per seed with the warm-up EMA and the plain one, sample `--like` the evaluation cells with the EMA and
# the raw weights, and print W2 / MMD² / FD / 1-NN. Each prior gets the bench prior's steps. ~20 min on 2 cores.
set -euo pipefail
B=${1:?usage: bench_prior_ema.sh <make bench workdir, e.g. .cache/bench/full> <outdir>}
OUT=${2:?outdir}; mkdir -p "$OUT"
S=${VENV:-.venv}/bin/sclatent
PY=${VENV:-.venv}/bin/python
for ds in sc_mixology pbmc3k; do
  if [ $ds = pbmc3k ]; then real=$B/pbmc3k/prepare/test.h5ad; else real=$B/sc_mixology/eval_cells/test_seen.h5ad; fi
  steps=$($PY -c "import json; print(json.load(open('$B/$ds/prior/config.json'))['train_config']['max_steps'])")
  for seed in 0 1; do
    for ew in warm plain; do
      P=$OUT/$ds/prior_${ew}_s$seed
      if [ $ew = warm ]; then flag=--ema-warmup; else flag=--no-ema-warmup; fi
      [ -f $P/checkpoint.pt ] || $S train-prior --latents $B/$ds/encode/latents.npz --outdir $P --preset tiny --max-steps $steps --seed $seed --threads 2 --no-progress $flag 2>>$OUT/stderr.log
      for w in ema model; do
        o=$OUT/$ds/gen_${ew}_${w}_s$seed; mkdir -p $o
        for r in 0 1; do
          $S sample --vae $B/$ds/vae --prior $P --like $real --out $o/rep$r.h5ad --seed $seed --replicate $r --threads 2 --weights $w 2>>$OUT/stderr.log
        done
        $S gather --out $o/gen.h5ad $o/rep0.h5ad $o/rep1.h5ad 2>>$OUT/stderr.log
        $S evaluate --real $real --generated $o/gen.h5ad --outdir $o/ev --no-floor 2>>$OUT/stderr.log >/dev/null
        $PY -c "
import json;m=json.load(open('$o/ev/metrics.json'));o=m['generation']['overall']
print('$ds','seed $seed','ema-$ew','weights-$w',*(k+'=%.4g'%o[k]['mean'] for k in ('w2','mmd2_rbf','fd','one_nn_accuracy')), flush=True)"
      done
    done
  done
done
