# Two commands on a fresh clone with only Python present:
#   make demo   the main job: kernel check, then a perf sweep and its plot on whatever device is here
#   make test   the test suite (Triton kernels run through Triton's interpreter on CPU; with CUDA, then again on
#               the GPU with the kernels compiled)
# Each creates .venv on first use: torch==2.13.0, then the project editable with its dev extras. Which build of torch
# pip takes is the registry's: PyPI serves Linux x86_64 the CUDA build (with its nvidia-* packages) on any machine,
# a GPU or not. TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU build from PyTorch's own index (for
# torch and its dependencies only; the dev extras still come from the default index).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin

GPU_RESULTS ?= gpu-results
# torch.cuda.is_available() as an exit status, for `if` in recipes.
HAS_CUDA = $(BIN)/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"

.PHONY: test test-big test-triton-compat demo gpu-check gpu-check-quick gpu-check-dry clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

test: $(BIN)/.installed
	$(BIN)/python -m pytest tests
	if $(HAS_CUDA); then \
		BAM_TRITON_TEST_DEVICE=cuda $(BIN)/python -m pytest tests; \
	fi

# Opt-in: the kernels on tensors of more than 2**31 elements (~10 GiB of memory, ~15 minutes).
test-big: $(BIN)/.installed
	BAM_TRITON_BIG_TESTS=1 $(BIN)/python -m pytest tests/test_large_tensors.py

# Users' GPUs run whatever triton their torch pins, 3.2 and newer: the kernels' interpreter tests, the launch path
# (plans, the tuned config launched directly) and the ahead-of-time compile checks (128-bit vectors, no spills) under
# older Tritons, each in its own venv. tests/triton_compat works
# around two Triton 3.2 bugs that only show without a GPU driver; numpy < 2.3 because Triton 3.2's interpreter turns
# one-element arrays into Python ints, which newer numpy refuses.
TRITON_COMPAT ?= 3.2.0 3.3.1
test-triton-compat:
	set -e; for version in $(TRITON_COMPAT); do \
		venv=$(VENV)-triton-$$version; \
		if [ ! -f $$venv/bin/.installed ]; then \
			$(PYTHON) -m venv $$venv; \
			$$venv/bin/python -m pip install --quiet "$(TORCH)"; \
			$$venv/bin/python -m pip install --quiet "triton==$$version" "numpy<2.3" -e ".[dev]"; \
			touch $$venv/bin/.installed; \
		fi; \
		echo "== triton $$version"; \
		TRITON_INTERPRET=1 PYTHONPATH=tests/triton_compat $$venv/bin/python -m pytest -q \
			-W "ignore:Conversion of an array with ndim:DeprecationWarning" \
			tests/test_kernels_forward.py tests/test_kernel_apply_bwd.py tests/test_kernel_front.py \
			tests/test_host_overhead.py tests/test_bench.py -k "not test_bench or aot or inspect or persistence"; \
	done

# On a GPU: the full ResNet-50 grid (batch 32/64/128) in fp16. On a CPU: batch 8 (the CPU providers only; the
# Triton kernels need CUDA, and `check` has already validated them through the interpreter).
demo: $(BIN)/.installed
	$(BIN)/bam-triton check
	if $(HAS_CUDA); then \
		$(BIN)/bam-triton sweep --out results; \
	else \
		$(BIN)/bam-triton sweep --out results --batch 8; \
	fi
	$(BIN)/bam-triton plot results/sweep.csv --out results

# The whole GPU evidence in one command (bench/gpu_check.py: GPU tests, check, sweep, inspect, plots, SUMMARY.md in
# $(GPU_RESULTS)/; 8 minutes, quick 4), for a Python that already has a CUDA torch and triton: the project is installed
# into $(PYTHON) itself, no venv, nothing downloaded. The dry run checks the pipeline on CPU in .venv (CI).
gpu-check:
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PYTHON) -m bam_triton gpu-check --out $(GPU_RESULTS)

gpu-check-quick:
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PYTHON) -m bam_triton gpu-check --quick --out $(GPU_RESULTS)

gpu-check-dry: $(BIN)/.installed
	$(BIN)/bam-triton gpu-check --dry-run --out $(GPU_RESULTS)-dry

clean:
	rm -rf $(VENV) $(VENV)-triton-* build dist *.egg-info
