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
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/engine apply recipes/demo-tiny-int4.yaml
	$(PY) -c 'import engine; m = engine.load("demo-tiny-int4"); print(repr(m.generate("Once upon a time", max_new_tokens=24)))'
	$(VENV)/bin/engine ls

test: $(VENV)/.installed
	$(PY) -m pytest
