# sclatent: two commands do all set-up on a fresh machine:
#   make demo   - run the pipeline's test profile on the bundled data into results/
#   make test   - install everything, run pytest (package + pipeline, including a real `nextflow run`) and nf-test
SHELL       := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
ROOT        := $(abspath .)
VENV        := $(ROOT)/.venv
PY          := $(VENV)/bin/python
NXF         := $(ROOT)/.cache/nextflow/bin/nextflow
STAMP       := $(VENV)/.installed
# the exact versions the tests ran with; `make ... CONSTRAINTS=` installs against pyproject's ranges instead
CONSTRAINTS ?= python/constraints.txt
export NXF_HOME ?= $(ROOT)/.cache/nxf-home
export PATH := $(ROOT)/.cache/nextflow/bin:$(PATH)

.PHONY: all venv nextflow browser lint-python test test-python test-pipeline test-nf demo bench bench-quick bench-scale bench-heldout lint clean

all: test

# The Python environment: a venv with the package (editable) at the versions the tests ran with.
$(STAMP): python/pyproject.toml python/constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e 'python[test]' $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $@

venv: $(STAMP)

# Nextflow: a suitable one on PATH, else the version pinned in tools/nextflow/pom.xml from Maven Central.
$(NXF): tools/nextflow/pom.xml tools/nextflow/bootstrap.sh
	bash tools/nextflow/bootstrap.sh
	touch $@

# ./nextflow at the repository root: the launcher for `./nextflow run main.nf ...` (README, docs/usage.md)
nextflow: $(NXF)
	@ln -sfn .cache/nextflow/bin/nextflow nextflow
	@echo "Nextflow: ./nextflow (or put $(dir $(NXF)) on your PATH)"

# Headless Chromium renders the HTML report in the report tests. Installed from Debian's packages when this runs
# as root with apt (CI); elsewhere the render test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the report render test"; \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: chromium not installed (needs root + apt); the report render test will skip"; fi; }

lint-python: venv
	$(VENV)/bin/ruff check python
	$(VENV)/bin/ruff format --check python

# pytest, then nf-test (on PATH, else ../shared/tools/nf-test/nf-test; CI=true fails without it); the last line
# counts both suites. PYTEST_ARGS / NFTEST_ARGS pass options through, e.g. make test PYTEST_ARGS='-k report'.
test: venv nextflow browser lint-python
	SCLATENT_NEXTFLOW=$(NXF) $(PY) tests/run_suites.py --python $(PY) \
	  --pytest-args '$(PYTEST_ARGS)' --nftest-args '$(NFTEST_ARGS)'

test-python: venv
	$(PY) -m pytest python/tests -q $(PYTEST_ARGS)

test-pipeline: venv nextflow
	SCLATENT_NEXTFLOW=$(NXF) $(PY) -m pytest tests -q $(PYTEST_ARGS)

# one spec: make test-nf NFTEST_ARGS=modules/local/prepare/tests/main.nf.test
test-nf: nextflow
	NXF_OPTS="$${NXF_OPTS:--XX:+TieredCompilation -XX:TieredStopAtLevel=1}" \
	  $$(command -v nf-test || echo ../shared/tools/nf-test/nf-test) test $(NFTEST_ARGS)

demo: venv nextflow
	$(NXF) run main.nf -profile test --outdir results -ansi-log false
	@echo
	@echo "Demo finished. Outputs per dataset under results/<dataset>/:"
	@find results -maxdepth 3 -mindepth 2 -not -path '*/pipeline_info*' | sort | sed 's/^/  /'
	@echo "The sclatent report of each dataset (open it in a browser):"
	@ls results/*/report/report.html | sed 's/^/  /'

BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e 'python[bench]' -c python/constraints.txt
	touch $@

bench: $(BENCH_STAMP) nextflow
	$(PY) python/benchmarks/run_all.py --full

bench-quick: $(BENCH_STAMP) nextflow
	$(PY) python/benchmarks/run_all.py --quick

# every step at 100k, 300k and 1M synthetic cells x 20k genes (wall time, peak RSS, disk; ~2 h on 2 cores, ~40 GB of
# scratch in .cache/bench-scale), into BENCHMARKS.md's `scale` section
bench-scale: venv
	nice -n 10 $(PY) python/benchmarks/bench_scale.py --cells 100000 300000 1000000 --threads 1

# decision 0020's study of combinations never seen in training: sc_mixology and the compositional truth, seeds 0
# and 1, scVI with the labels as covariates at equal time (~2.5 h on one idle core), into BENCHMARKS.md's
# `heldout` section
bench-heldout: $(BENCH_STAMP)
	nice -n 10 $(PY) python/benchmarks/bench_heldout.py --datasets sc_mixology,compositional --seeds 0,1 --scvi \
		--workdir .cache/bench-heldout

lint: nextflow
	$(NXF) lint main.nf modules subworkflows conf nextflow.config

clean:
	rm -rf work results .nextflow .nextflow.log* .nf-test .nf-test.log nextflow
