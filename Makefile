# `make train` and `make test` do all set-up on a fresh machine: a virtualenv in .venv, torch
# (the local CPU wheel, torch==2.13.0, unless a torch is already installed), this package with
# its dev extras, and, for the multi-host tests, OpenSSH and iproute2 from Debian when root
# (and Slurm with munge for the Slurm tests, Prometheus for the metrics test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: train test test-gpu sysdeps clean

$(VENV)/.ready: setup.cfg pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

sysdeps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v sshd >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			openssh-server openssh-client iproute2 >/dev/null) \
		|| echo "sysdeps: could not install openssh-server; the multi-host tests will be skipped"; \
	fi
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ ! -x /usr/sbin/slurmd ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			slurmctld slurmd slurm-client munge >/dev/null) \
		|| echo "sysdeps: could not install Slurm; the Slurm tests will be skipped"; \
	fi
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v prometheus >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			prometheus >/dev/null) \
		|| echo "sysdeps: could not install Prometheus; the test with a real Prometheus will be skipped"; \
	fi

train: $(VENV)/.ready
	$(VENV)/bin/ps-launch -n 2 -s 2 --mode sync --server-device cpu -- $(PY) examples/train_digits.py

test: $(VENV)/.ready sysdeps
	$(PY) -m pytest -q -p no:cacheprovider -ra

test-gpu: $(VENV)/.ready
	$(PY) -m pytest -q -p no:cacheprovider -ra -m "gpu or multigpu"

clean:
	rm -rf $(VENV) build *.egg-info
