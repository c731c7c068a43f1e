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

# Users' GPUs run whatever triton their torch pins, 3.2 and newer: every minor version from 3.2 up to the one before the
# newest (which `make test` runs) gets its own .triton-compat/<version> (triton and numpy < 2.3 installed there with
# --target and put first on PYTHONPATH: .venv's torch serves them all). What differs between versions is their
# compiler and their runtime, so every version runs the launch path in compiled mode (tests/test_compiled_launches.py:
# Triton's autotuner, jit function, binder and cache on a stand-in driver, sm_80 and sm_90), the ahead-of-time compile
# of every config the front end's pruners keep (the register-heavy tl.dot kernels, where versions spilled differently;
# fp16 and fp32, bf16 under the oldest and the newest) and the feature and disk-cache checks. The oldest also runs the
# interpreter kernel tests and the other kernels' ahead-of-time compiles (128-bit vectors, no spills; 3.3 to 3.8 passed
# them when this list was set), which `make test` runs under the newest. numpy < 2.3: the interpreters of Triton 3.2 to
# 3.6 turn one-element arrays into Python ints, which newer numpy refuses. tests/triton_compat works around two
# Triton 3.2 bugs that only show without a GPU driver.
TRITON_COMPAT ?= 3.2.0 3.3.1 3.4.0 3.5.1 3.6.0 3.7.1 3.8.0
TRITON_COMPAT_FULL ?= 3.2.0
COMPAT_FEATURES = tests/test_gpu_readiness.py::test_check_reports_the_triton_features_that_change_what_runs
COMPAT_EVERY = tests/test_compiled_launches.py tests/test_kernel_front.py tests/test_bench.py $(COMPAT_FEATURES)
COMPAT_EVERY_K = launches_through or test_aot_tensor or test_aot_fp32 or autotune_0 or persistence or knobs or features
COMPAT_FULL = tests/test_kernels_forward.py tests/test_kernel_apply_bwd.py tests/test_kernel_front.py tests/test_cbam_kernels.py \
	tests/test_host_overhead.py tests/test_compiled_launches.py tests/test_bench.py $(COMPAT_FEATURES)
COMPAT_FULL_K = not test_bench or aot or inspect or persistence or knobs
test-triton-compat: $(BIN)/.installed
	set -e; for version in $(TRITON_COMPAT); do \
		dir=.triton-compat/$$version; \
		if [ ! -f $$dir/.installed ]; then \
			rm -rf $$dir; \
			$(BIN)/python -m pip install --quiet --no-deps --target $$dir "triton==$$version" "numpy<2.3"; \
			touch $$dir/.installed; \
		fi; \
		case " $(TRITON_COMPAT_FULL) " in \
			*" $$version "*) tests="$(COMPAT_FULL)"; k="$(COMPAT_FULL_K)"; dtypes=fp16,bf16;; \
			*) tests="$(COMPAT_EVERY)"; k="$(COMPAT_EVERY_K)"; dtypes=fp16;; \
		esac; \
		echo "== triton $$version"; \
		TRITON_INTERPRET=1 PYTHONPATH=$$dir:tests/triton_compat BAM_TRITON_AOT_DTYPES=$$dtypes \
			$(BIN)/python -m pytest -q -p no:cacheprovider \
			-W "ignore:Conversion of an array with ndim:DeprecationWarning" $$tests -k "$$k"; \
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
	rm -rf $(VENV) .triton-compat build dist *.egg-info
