# One-command setup, serving and testing. See README.md.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SITE = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
PROTO_SRC := protos/esm/v1/esm2.proto
GEN := service/gen
DESCRIPTOR := gateway/esm2_descriptor.pb
CHECKPOINTS ?= checkpoints

.PHONY: setup protos serve demo test bench clean lint-protos

setup: $(VENV)/.installed protos

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The pinned CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $@

# Python stubs and Envoy's descriptor set, generated from protos/ (never hand-edited).
protos: $(GEN)/esm/v1/esm2_pb2.py $(DESCRIPTOR)

$(GEN)/esm/v1/esm2_pb2.py: $(PROTO_SRC) $(VENV)/.installed
	mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -Iprotos -I$(SITE) --python_out=$(GEN) --pyi_out=$(GEN) \
		--grpc_python_out=$(GEN) $(PROTO_SRC)
	# Generated code imports `esm.v1`, which would collide with fair-esm's `esm` package.
	sed -i 's/^from esm\.v1 import/from service.gen.esm.v1 import/' $(GEN)/esm/v1/esm2_pb2_grpc.py
	touch $(GEN)/__init__.py $(GEN)/esm/__init__.py $(GEN)/esm/v1/__init__.py

$(DESCRIPTOR): $(PROTO_SRC) $(VENV)/.installed
	mkdir -p $(dir $@)
	$(PY) -m grpc_tools.protoc -Iprotos -I$(SITE) --include_imports --include_source_info \
		--descriptor_set_out=$@ $(PROTO_SRC)

# Serve the real esm2-8m checkpoint (torch hub cache, --model-dir or download):
# gRPC on 50051 and, through Envoy, the JSON API on http://localhost:8080/api/v3/.
# SERVE_ARGS takes gateway flags (python -m gateway.launch --help) and server flags.
serve: setup
	$(PY) -m gateway.launch $(SERVE_ARGS)

# Try the whole service offline with a random-weight checkpoint at the 8M shape.
demo: setup
	$(PY) -m service.random_checkpoints --shape 8m --out $(CHECKPOINTS)
	$(PY) -m gateway.launch --models esm2-8m --model-dir $(CHECKPOINTS) --offline $(SERVE_ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench.run $(BENCH_ARGS)

# buf lint (default rules) on protos/; needs npm. google/api comes from googleapis-common-protos.
lint-protos: $(VENV)/.installed
	rm -rf build/buf && mkdir -p build/buf/third_party/google/api
	cp $(SITE)/google/api/annotations.proto $(SITE)/google/api/http.proto \
		$(SITE)/google/api/httpbody.proto build/buf/third_party/google/api/
	cp -r protos buf.yaml build/buf/
	cd build/buf && npx --yes @bufbuild/buf@1.75.0 lint

clean:
	rm -rf $(GEN) $(DESCRIPTOR) $(CHECKPOINTS)
