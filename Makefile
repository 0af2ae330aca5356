# One-command setup, serving and testing. See README.md.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SITE = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
PROTO_SRC := protos/esm/v1/esm2.proto
GEN := esm2_wire/gen
DESCRIPTOR := gateway/esm2_descriptor.pb
CHECKPOINTS ?= checkpoints

.PHONY: settings-doc setup protos docs-assets docs serve demo fleet deploy-config test test-unit bench clean lint-protos

setup: $(VENV)/.installed protos docs-assets

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The pinned CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[server,dev,bench,plot,otel,docs]'
	touch $@

# Python stubs and Envoy's descriptor set, generated from protos/ (never hand-edited). The package
# build runs the same generator (setup.py), so wheels and editable installs carry them too.
protos: $(GEN)/esm/v1/esm2_pb2.py $(DESCRIPTOR)

$(GEN)/esm/v1/esm2_pb2.py $(DESCRIPTOR) &: $(PROTO_SRC) protos/generate.py $(VENV)/.installed
	$(PY) protos/generate.py > /dev/null

# Swagger UI for the docs page (GET /api/v3/docs): npm's swagger-ui-dist, pinned and hash-checked
# (service/api/docs_page.py); the package build does the same for wheels.
docs-assets: $(VENV)/.installed
	$(PY) -m service.api.docs_page --vendor

# Serve the real esm2-8m checkpoint (torch hub cache, --model-dir or download):
# gRPC on 50051 and, through Envoy, the JSON API on http://localhost:8080/api/v3/.
# SERVE_ARGS takes gateway flags (python -m gateway.launch --help) and server flags.
serve: setup
	$(PY) -m gateway.launch $(SERVE_ARGS)

# Try the whole service offline with a random-weight checkpoint at the 8M shape. Its file is named
# so that no one takes it for the real checkpoint: $(DEMO_CHECKPOINT).
DEMO_CHECKPOINT = $(CHECKPOINTS)/esm2-8m-shape-RANDOM-WEIGHTS.pt
DEMO_SERVE = --models esm2-8m --checkpoint esm2-8m=$(DEMO_CHECKPOINT) --offline
demo: setup
	$(PY) -m service.models.random_checkpoints --shape 8m --out $(CHECKPOINTS)
	$(PY) -m gateway.launch $(DEMO_SERVE) $(SERVE_ARGS)

# A fleet on one host, offline: REPLICAS random-weight 8M-shape servers behind one Envoy.
REPLICAS ?= 3
fleet: setup
	$(PY) -m service.models.random_checkpoints --shape 8m --out $(CHECKPOINTS)
	$(PY) -m gateway.launch --replicas $(REPLICAS) $(DEMO_SERVE) $(SERVE_ARGS)

# Envoy's ConfigMap of each Kubernetes overlay, rendered by gateway/envoy_config.py (tests check they match).
K8S_ENVOY = --configmap esm2-envoy --http-port 8080 --descriptor /etc/esm2/esm2_descriptor.pb \
	--admin-socket /tmp/envoy-admin.sock --stats-port 9901
deploy-config: protos
	$(PY) -m gateway.envoy_config $(K8S_ENVOY) --pool esm2-8m=esm2-8m.esm2.svc.cluster.local:50051 \
		> deploy/k8s/overlays/cpu/envoy-config.yaml
	$(PY) -m gateway.envoy_config $(K8S_ENVOY) --pool esm2-650m=esm2-650m.esm2.svc.cluster.local:50051 \
		> deploy/k8s/overlays/gpu/envoy-config.yaml

# The whole suite in TEST_WORKERS pytest-xdist worker processes (README "Tests"): most tests wait
# on servers, Envoys and subprocesses, so more workers than cores pays. TEST_WORKERS=0: serial.
TEST_WORKERS ?= 4
test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The fast layer alone: no server, no model, seconds.
test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

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
	rm -rf $(GEN) $(DESCRIPTOR) $(CHECKPOINTS) site

# The documentation site (mkdocs.yml): docs/ built with MkDocs and the Material theme into site/
# (ignored). --strict fails on any warning, a broken internal link or anchor included; the banner
# about Material's successor is not one. tests/test_docs_site.py runs the same build.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# The settings tables of docs/configuration.md, rewritten from the declarations (service/config.py,
# gateway/launch.py); tests/unit/test_settings.py keeps them equal.
settings-doc: setup
	$(PY) -m service.config --write-doc docs/configuration.md
