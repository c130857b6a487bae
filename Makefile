# sdkit: everything a learner, teacher or CI machine needs, from only Python and make.
#
#   make lab              set up .venv (first time) and open JupyterLab on workspace/, your own
#                         copies of notebooks/ (git-ignored: running them leaves git status clean)
#   make workspace        only copy new notebooks into workspace/ (never overwrites your edits)
#   make reset-notebooks  fresh copies in workspace/ (yours move to workspace-old/DATE/)
#   make test             set up .venv and run every unit test and every notebook (nbval lax)
#   make test-browser     every notebook in JupyterLab through Chromium (screenshots, ~9 min)
#   make lint             ruff check
#   make clean-notebooks  strip outputs and execution counts from notebooks/*.ipynb
#   make handout          handout/: the notebooks without their reference solutions
#
# Variables: PYTHON (python3), VENV (.venv), LAB_ARGS (e.g. --port 8899),
# PYTEST_ARGS (e.g. notebooks/01_forward_noising.ipynb or -k device), WORKSPACE (workspace),
# TEST_WORKERS (2: pytest-xdist workers for make test; 0 runs in one process).
# SDKIT_THREADS (e.g. 4, or auto) sets torch's CPU threads in every kernel (sdkit/threads.py).

PYTHON ?= python3
VENV ?= .venv
LAB_ARGS ?=
PYTEST_ARGS ?=
WORKSPACE ?= workspace
TEST_WORKERS ?= 2

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Open a browser only where there is a display (macOS always has one).
ifeq ($(strip $(DISPLAY)$(WAYLAND_DISPLAY)$(filter Darwin,$(shell uname -s))),)
NO_BROWSER := --no-browser
endif
# Jupyter refuses to run as root unless told; containers and CI machines often are root.
ifeq ($(shell id -u),0)
ALLOW_ROOT := --allow-root
endif

.PHONY: setup lab test lint clean-notebooks strip handout workspace reset-notebooks

setup: $(STAMP)

# Re-installs only when requirements.txt or pyproject.toml is newer than the stamp.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-deps -e .
	touch $@

# The kit's JupyterLab settings (jupyter-config/README.md): no news pop-up, no update check.
LAB_SETTINGS := --LabApp.app_settings_dir=$(CURDIR)/jupyter-config/lab/settings \
	--LabApp.news_url=None --LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate

lab: $(STAMP) workspace
	@echo "Starting JupyterLab on $(WORKSPACE)/; open the http://127.0.0.1:... URL it prints below."
	$(BIN)/jupyter lab $(WORKSPACE)/ $(LAB_SETTINGS) $(NO_BROWSER) $(ALLOW_ROOT) $(LAB_ARGS)

# The learner's copies (README "Your own copies"): notebooks/ (and notebooks/solutions/) copied
# into $(WORKSPACE)/, which git ignores, so opening, running and autosaving never touch a tracked
# file and `git pull` never conflicts. A file not there yet is copied; a copy still as it was
# copied (checked against $(WORKSPACE)/.copied.json) follows notebooks/ after a `git pull`; a
# copy the learner changed is kept, and named, if notebooks/ has moved on. Standard library only.
define SYNC_WORKSPACE
import hashlib, json, shutil, sys
from pathlib import Path
src, dst = Path("notebooks"), Path(sys.argv[1])
record = dst / ".copied.json"
copied = json.loads(record.read_text()) if record.is_file() else {}
digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
new, updated, kept = [], [], []
for f in sorted(src.rglob("*")):
    rel = f.relative_to(src).as_posix()
    if not f.is_file() or any(part.startswith(".") or part == "__pycache__" for part in f.parts):
        continue
    target, now = dst / rel, digest(f)
    if not target.exists():
        new.append(rel)
    elif digest(target) == now:
        copied[rel] = now
        continue
    elif copied.get(rel) == digest(target):
        updated.append(rel)
    else:
        kept.append(rel)
        continue
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(f, target)
    copied[rel] = now
dst.mkdir(exist_ok=True)
record.write_text(json.dumps(copied, indent=1, sort_keys=True))
print(f"{dst}/: {len(new)} new and {len(updated)} updated file(s) from notebooks/")
for rel in kept:
    print(f"  kept your edited {dst}/{rel}; notebooks/{rel} differs (make reset-notebooks for fresh copies)")
endef
export SYNC_WORKSPACE

workspace:
	@$(PYTHON) -c "$$SYNC_WORKSPACE" $(WORKSPACE)

reset-notebooks:
	@if [ -d $(WORKSPACE) ]; then old=$(WORKSPACE)-old/$$(date +%Y%m%d-%H%M%S); \
		mkdir -p $(WORKSPACE)-old && mv $(WORKSPACE) $$old && echo "your copies moved to $$old/"; fi
	@$(PYTHON) -c "$$SYNC_WORKSPACE" $(WORKSPACE)

# Two pytest-xdist workers, a file (or notebook) each at a time: with the thread policy (each
# process, kernels included, takes half the CPUs) the pair fills the machine, one worker alone
# would leave half of it idle. TEST_WORKERS=0 runs everything in this one process.
test: $(STAMP)
	$(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

# The browser test on every notebook (make test runs conftest.py's BROWSER_DEFAULT subset);
# screenshots in test-artifacts/browser/<notebook>/.
.PHONY: test-browser
test-browser: $(STAMP)
	SDKIT_BROWSER_NOTEBOOKS=all $(BIN)/python -m pytest tests/test_browser.py -s $(PYTEST_ARGS)

# Library drift: the whole suite against the newest diffusers/transformers (and their
# companions) that the package index offers, in a separate venv, torch kept at its pin via a
# constraints file (so pip cannot swap in another torch build). Prints the versions it tested.
LATEST ?= .venv-latest
LATEST_UPGRADE ?= diffusers transformers huggingface-hub tokenizers accelerate peft safetensors

define SHOW_VERSIONS
import re, sys
from importlib.metadata import version
pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open("requirements.txt").read(), re.M))
print("test-latest: versions tested (requirements.txt pin -> installed in $(LATEST))")
for name in ["torch"] + sys.argv[1:]:
    have, pin = version(name), pins.get(name, "-")
    note = "" if have.split("+")[0] == pin else "   <- differs from the pin"
    print(f"  {name:16} {pin:>10} -> {have}{note}")
endef
export SHOW_VERSIONS

.PHONY: test-latest
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	grep -E '^torch==' requirements.txt > $(LATEST)/constraints.txt
	grep -v -i -E "^($$(echo $(LATEST_UPGRADE) | tr ' ' '|'))==" requirements.txt > $(LATEST)/base.txt
	$(LATEST)/bin/python -m pip install -U -r $(LATEST)/base.txt -c $(LATEST)/constraints.txt \
		$(LATEST_UPGRADE)
	$(LATEST)/bin/python -m pip install --no-deps -e .
	$(LATEST)/bin/python -c "$$SHOW_VERSIONS" $(LATEST_UPGRADE)
	$(LATEST)/bin/python -m pytest $(PYTEST_ARGS); status=$$?; \
		$(LATEST)/bin/python -c "$$SHOW_VERSIONS" $(LATEST_UPGRADE); exit $$status

lint: $(STAMP)
	$(BIN)/ruff check .

# Outputs, execution counts, per-cell timings and the machine's language_info go;
# cell tags (e.g. for nbval) and the kernelspec stay.
define STRIP_NOTEBOOKS
import sys, nbformat
for path in sys.argv[1:]:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, path)
    print("stripped", path)
endef
export STRIP_NOTEBOOKS

clean-notebooks: $(STAMP)
	$(BIN)/python -c "$$STRIP_NOTEBOOKS" notebooks/*.ipynb

strip: clean-notebooks

# The kit for a class without the reference solutions (README: "Exercises and solutions"):
# every committed file but notebooks/solutions/, in handout/sdkit-kit/ (run `make lab` there).
handout:
	rm -rf handout
	mkdir -p handout/sdkit-kit
	git archive HEAD | tar -x -C handout/sdkit-kit --exclude=notebooks/solutions
	@echo "handout/sdkit-kit: the kit without notebooks/solutions ($$(ls handout/sdkit-kit/notebooks | wc -l) notebooks)"
