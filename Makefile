# Two commands matter: `make test` and `make demo`. Both create .venv on first use.
# zarr >= 3.2 needs Python >= 3.12; we look for a working python3.12 (pyenv shims that
# exist but point at no installed version are skipped).
PYTHON ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12 python3.13 python3; do \
	"$$p" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1 && { echo "$$p"; break; }; done)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo install bench clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python >= 3.12 not found; set PYTHON=/path/to/python3.12"; exit 1; }
	@echo "creating $(VENV) with $(PYTHON)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# the whole path on this machine: images -> pipeline encode (embedded Ray) -> train run ->
# train sample -> train plot -> the figure of real images beside samples of each class.
# pipeline.demo writes the overrides that fit its cache.
demo: $(STAMP)
	$(BIN)/python -m pipeline.demo
	$(BIN)/train run configs/demo.yaml preview.every=200 $$(cat demo_out/train-overrides)
	$(BIN)/train sample demo_out/run --num 64 --cfg 1.65 --out demo_out/samples \
	    $$(cat demo_out/sample-args)
	$(BIN)/train plot demo_out/run --out demo_out/metrics.png
	$(BIN)/python -m pipeline.demo --figure
	@printf '\nmake demo done. Real vs generated, per class: %s\nloss plot: %s\n' \
	        'demo_out/figure.png' 'demo_out/metrics.png; grids during training: demo_out/run/samples/'

bench: $(STAMP)
	$(BIN)/python benchmarks/loader.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
