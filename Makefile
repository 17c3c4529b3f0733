# Two commands on a fresh machine:  make demo  (install, train a tokenizer, pre-train with it)
#                                   make test  (install + run the test suite)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo demo-v2 test lint bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

DEMO_DIR ?= outputs/demo
# benchmarks/gpu_pretrain.py: cuda for the real sizes (BEiT-B, batch 128); on cpu a tiny smoke run
BENCH_DEVICE ?= cpu

# The full BEiT path on the embedded generated data, on CPU: a dVAE tokenizer (~3 min), then
# masked image modeling against its tokens (~20 s).
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/beit-lightning experiment=smoke_tokenizer hydra.run.dir=$(DEMO_DIR)/tokenizer
	$(BIN)/beit-lightning experiment=smoke tokenizer=dvae tokenizer.checkpoint=$(DEMO_DIR)/tokenizer/tokenizer.pt \
		tokenizer.vocab_size=512 tokenizer.image_size=64 hydra.run.dir=$(DEMO_DIR)/pretrain

DEMO_V2_DIR ?= outputs/demo_v2

# BEiT v2 the same way: a micro VQ-KD distilled from a seeded micro teacher (no download), then
# pre-training with the patch-aggregation head against its codes.
demo-v2: $(STAMP)
	rm -rf $(DEMO_V2_DIR)
	$(BIN)/beit-lightning experiment=smoke_tokenizer_vqkd hydra.run.dir=$(DEMO_V2_DIR)/tokenizer
	$(BIN)/beit-lightning experiment=smoke_beitv2 tokenizer=vqkd tokenizer.checkpoint=$(DEMO_V2_DIR)/tokenizer/tokenizer.pt \
		tokenizer.vocab_size=64 tokenizer.image_size=64 hydra.run.dir=$(DEMO_V2_DIR)/pretrain

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/masking.py
	$(BIN)/python benchmarks/data_throughput.py
	$(BIN)/python benchmarks/pretrain_step.py
	mkdir -p outputs
	$(BIN)/python benchmarks/gpu_pretrain.py --device $(BENCH_DEVICE) $(if $(filter cpu,$(BENCH_DEVICE)),--tiny) \
		--out outputs/gpu_pretrain.md

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
