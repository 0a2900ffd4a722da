# Two targets do all the set-up on a fresh machine (see README): `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all,test]'
	# optimum-intel drags in a torchvision built for another torch; it breaks `import transformers`
	$(PY) -m pip uninstall --quiet --yes torchvision || true
	# llama.cpp's converter and llama-imatrix / llama-quantize, from the installed llama-cpp-python's sdist
	$(PY) -m engine.runtimes.llamacpp_tools install
	touch $@ $(VENV)/.demo-installed

# The demo needs one runtime (onnxruntime-genai, which brings torch + transformers for the source
# pass): the others, and the ones that compile, are for `make test`.
# --no-compile: Python compiles what the demo imports on first use, not all of torch up front.
$(VENV)/.demo-installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile -e '.[ortgenai]'
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

# models/wt2-phi3-7m (a 7.2 M-parameter Phi-3 trained on WikiText-2 valid, in the repository) to int4,
# scored against its source on data/wikitext-2 (perplexity, KL, top-1, size, decode speed), then asked
# to continue a sentence. No network.
demo: $(VENV)/.demo-installed
	$(VENV)/bin/engine apply recipes/demo-wt2-int4.yaml
	$(VENV)/bin/engine ls demo-wt2-int4
	$(VENV)/bin/engine run demo-wt2-int4 "The album was released in" --max-new-tokens 32

test: $(VENV)/.installed
	$(PY) -m pytest
