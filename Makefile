# Two set-up commands, each installs what it needs into .venv:
#   make demo   runs the main job
#   make test   runs the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format install

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch is pinned and installed in the same command as everything else (CPU wheel, no CUDA download).
	$(BIN)/pip install --quiet -e '.[dev]' torch==2.13.0
	touch $(STAMP)

install: $(STAMP)

# `blip3o demo` with the model bundled in the package (out/demo/). Until a trained model is bundled
# (src/blip3o/bundled/model/), it says so and falls back to the ShapesWorld preview (out/preview/).
demo: $(STAMP)
	@if $(BIN)/python -c 'from blip3o.bundled import bundled_model_dir; bundled_model_dir()' 2>/dev/null; then \
		$(BIN)/blip3o demo --out out/demo; \
	else \
		echo "make demo: no bundled model in this install yet, so running the ShapesWorld preview instead."; \
		echo "  (with a trained model: $(BIN)/blip3o demo --model runs/x/final)"; \
		$(BIN)/blip3o world preview --out out/preview; \
	fi

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .
