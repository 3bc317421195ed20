# fastimp: `make test` and `make demo` set up everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastimp-installed
CSRC := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)
EXT_STAMP := build/.ext-built

.PHONY: install build test test-fast demo bench clean backends gpu-check gpu-wheels

install: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints-ci.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23" "setuptools>=64" wheel
	$(PY) -m pip install -q -c constraints-ci.txt torch torchvision triton pybind11 ninja
	FASTIMP_NO_EXT=1 $(PY) -m pip install -q -c constraints-ci.txt --no-build-isolation -e '.[all]'
	touch $@

# Builds fastimp._C in place (C++ kernels; CUDA kernels too wherever nvcc is present).
build: $(EXT_STAMP)

$(EXT_STAMP): $(STAMP) $(CSRC) setup.py
	mkdir -p build
	rm -f fastimp/_C*.so
	$(PY) setup.py -q build_ext --inplace
	@# the extension is optional for users, so setup.py only warns when it fails to build: check here
	$(PY) -c 'from fastimp import _ext; assert _ext._C is not None, _ext.error; print("fastimp._C built; CUDA kernels:", _ext.cuda_compiled())'
	touch $@

test: build
	FASTIMP_REQUIRE_EXT=1 $(PY) -m pytest -q tests

# IMP-WR on MNIST-1D rewinding to step 0 and to step 40 (one epoch), the same with Appendix F's
# adaptive pruning ratio (Fig. 10), then every analysis of the paper at levels 0 and 8 and the
# report with Figs. 2-11 (demo_out/fixed/imp_*/report/report.md); README.md gives the time.
demo: build
	$(PY) -m fastimp imp --preset mnist1d --out demo_out/fixed --rewind-step 0 40 --no-progress
	$(PY) -m fastimp imp --preset mnist1d --out demo_out/adaptive --rewind-step 40 --levels 6 \
		--no-progress pruning_fraction=adaptive
	$(PY) -m fastimp paper demo_out/fixed --quick --levels 0 8 --compare demo_out/adaptive \
		--no-progress

bench: build
	$(PY) -m benchmarks

backends: build
	$(PY) -m fastimp backends

# On a GPU machine (no network, its own python3 with torch/triton/nvcc): builds the extension for
# the local card, checks every kernel, runs the gpu tests and times everything, within 8 minutes.
# Writes $(GPU_OUT)/gpu_report.{json,md}. Carry .whl (make gpu-wheels) for mnist1d and PyHessian.
GPU_PYTHON ?= python3
GPU_OUT ?= gpu_out
gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m benchmarks.gpu_check --out $(GPU_OUT)

# Where pip works: the pure-Python wheels the GPU machine lacks, for Python 3.12, into .whl/.
gpu-wheels:
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_17_x86_64 --platform any -d .whl \
	  mnist1d==0.0.2.post1 pyhessian==0.1

clean:
	rm -rf build fastimp/_C*.so *.egg-info
