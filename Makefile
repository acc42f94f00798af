# tasprune: `make demo` and `make test` each do the whole set-up on a fresh Debian machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tasprune-installed
FMNIST := /usr/share/datasets/fashion-mnist
FMNIST_FILES := $(FMNIST)/train-images-idx3-ubyte.gz $(FMNIST)/train-labels-idx1-ubyte.gz \
                $(FMNIST)/t10k-images-idx3-ubyte.gz $(FMNIST)/t10k-labels-idx1-ubyte.gz

.PHONY: setup data demo test test-fast lint bench gpu-prep clean

setup: $(STAMP) data

# torch/torchvision are pinned here (the versions this machine serves from local disk);
# pyproject.toml itself only declares ranges.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev,export,baselines,tensorboard,timm,detection,yolo]'
	touch $(STAMP)

# Fashion-MNIST (real images) from Debian's dataset-fashion-mnist package.
data:
	@missing=0; for f in $(FMNIST_FILES); do [ -r $$f ] || missing=1; done; \
	if [ $$missing = 1 ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  else \
	    echo "error: Fashion-MNIST not found under $(FMNIST). Fix: 'sudo apt-get install dataset-fashion-mnist', or put the four idx .gz files in DATA_ROOT/FashionMNIST/raw and pass --data-root DATA_ROOT" >&2; exit 1; \
	  fi; \
	fi

demo: setup
	$(BIN)/tasprune run fmnist-r20-quick --out runs/demo

test: setup
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy src
	$(BIN)/python -m pytest -q -n 2

# The inner loop: everything but the tests marked slow (end-to-end runs, torchrun launches).
test-fast: setup
	$(BIN)/python -m pytest -q -x -m "not slow"

lint: setup
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy src

# make bench [PROTOCOL=fmnist-r20|fmnist-r20-f30|fmnist-r56|cifar10-r56-paper] [BENCH_FLAGS=--threads 1]
PROTOCOL ?= fmnist-r20
BENCH_FLAGS ?= --threads 1
bench: setup
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_search.py
	$(BIN)/tasprune bench bench/protocols/$(PROTOCOL).yaml $(BENCH_FLAGS)

# The GPU check's carried folders: wheels the device machine lacks (.whl/, CPython 3.12
# manylinux, the versions this venv runs) and Fashion-MNIST (.gl/data/); idempotent.
# bench/gpu_check.sh says how a session with a device runs the check.
gpu-prep: setup
	bash bench/gpu_check.sh --prep

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
