# vmft: build, set up and test on a Debian bookworm host (run as root).
#
#   make demo    set up this host, then run a guest under FT and show it
#   make test    set up this host, then run the test suite
#
# `setup` is idempotent: the playbook reports changed=0 and the image builder
# hits its cache when nothing changed, so repeating a target is cheap.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

PYTHON      ?= python3
VENV        := .venv
VENV_STAMP  := $(VENV)/.vmft-installed
PLAYBOOK    := ansible/site.yml
INVENTORY   := ansible/inventory/localhost.yml
PYTEST_ARGS ?= -v -rs
BENCHES     := $(sort $(wildcard bench/*.py))

export DEBIAN_FRONTEND := noninteractive
export PIP_NO_INPUT := 1

.PHONY: venv setup test demo bench clean

venv: $(VENV_STAMP)

# Re-runs only when pyproject.toml is newer than the stamp.
$(VENV_STAMP): pyproject.toml
	@if ! $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null; then \
	    echo "make: $(PYTHON) has no working venv module; installing python3-venv"; \
	    apt-get update -qq && apt-get install -y -qq python3-venv; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	touch $@

setup: venv
	@test -x /usr/bin/python3 || { apt-get update -qq && apt-get install -y -qq python3; }
	LC_ALL=C.UTF-8 ANSIBLE_CONFIG=ansible/ansible.cfg \
	    $(VENV)/bin/ansible-playbook -i $(INVENTORY) $(PLAYBOOK)
	$(MAKE) -C qemu_plugins
	$(VENV)/bin/python -m vmft_qemu.images build

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/vmft demo

bench: setup
	@test -n "$(BENCHES)" || { echo "make: no bench/*.py to run"; exit 1; }
	for b in $(BENCHES); do echo "== $$b"; $(VENV)/bin/python "$$b"; done

# Removes the virtualenv and its stamp; the guest image cache
# (/var/cache/vmft) and the packages the playbook installed stay.
clean:
	rm -rf $(VENV)
