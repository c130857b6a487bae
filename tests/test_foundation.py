"""Checks on the kit's foundation: device choice, pinned versions, clean notebooks, config."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import sdkit
from sdkit import device as device_module
from sdkit.device import DeviceChoice, describe_device, get_device

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(
    p for p in (ROOT / "notebooks").glob("*.ipynb") if ".ipynb_checkpoints" not in p.parts
)

# requirements.txt name -> conda-forge name, where they differ
CONDA_NAMES = {"torch": "pytorch", "huggingface-hub": "huggingface_hub"}
CONDA_ONLY = {"python", "pip"}  # in environment.yml for conda's sake, not pinned packages


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("SDKIT_DEVICE", raising=False)
    monkeypatch.delenv("SDKIT_DTYPE", raising=False)
    return monkeypatch


@pytest.fixture
def no_accelerator(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    clean_env.setattr(device_module, "_mps_available", lambda: False)
    return clean_env


# ---------------------------------------------------------------- device choice


def test_default_matches_this_machine(clean_env):
    choice = get_device()
    if torch.cuda.is_available():
        expected = ("cuda", torch.float16)
    elif device_module._mps_available():
        expected = ("mps", torch.float32)
    else:
        expected = ("cpu", torch.float32)
    assert (choice.device.type, choice.dtype) == expected
    assert choice.reason


def test_default_without_accelerator_is_cpu_float32(no_accelerator):
    device, dtype = get_device()
    assert device == torch.device("cpu")
    assert dtype is torch.float32


def test_cuda_machine_defaults_to_float16(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    choice = get_device()
    assert choice.device == torch.device("cuda") and choice.dtype is torch.float16


def test_mps_machine_defaults_to_float32(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    clean_env.setattr(device_module, "_mps_available", lambda: True)
    choice = get_device()
    assert choice.device == torch.device("mps") and choice.dtype is torch.float32


def test_choice_is_frozen_and_unpacks():
    choice = get_device("cpu", "float32")
    assert isinstance(choice, DeviceChoice)
    assert tuple(choice) == (torch.device("cpu"), torch.float32)
    with pytest.raises(AttributeError):
        choice.dtype = torch.bfloat16


def test_env_vars_override_default(no_accelerator):
    no_accelerator.setenv("SDKIT_DEVICE", "cpu")
    no_accelerator.setenv("SDKIT_DTYPE", "bf16")
    choice = get_device()
    assert (choice.device, choice.dtype) == (torch.device("cpu"), torch.bfloat16)
    assert "SDKIT_DTYPE" in choice.reason


def test_arguments_beat_env_vars(no_accelerator):
    no_accelerator.setenv("SDKIT_DEVICE", "tpu")  # would be an error if consulted
    no_accelerator.setenv("SDKIT_DTYPE", "bfloat16")
    choice = get_device(device="cpu", dtype=torch.float32)
    assert (choice.device, choice.dtype) == (torch.device("cpu"), torch.float32)


def test_describe_device_names_choice_and_torch(no_accelerator):
    text = describe_device()
    assert "cpu" in text and "float32" in text
    assert torch.__version__ in text


def test_import_sdkit_is_light():
    code = (
        "import sys, sdkit\n"
        "heavy = {'diffusers', 'transformers', 'matplotlib'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT / "tests")


def test_version_is_the_packages():
    """One version: sdkit.__version__ is what pyproject.toml (and so pip) says."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sdkit.__version__ == project["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", sdkit.__version__)


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        sdkit.no_such_thing  # noqa: B018


# ---------------------------------------------------------------- pinned versions


def _requirements() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([0-9][A-Za-z0-9.]*)", line)
        assert match, f"requirements.txt line {line!r} is not pinned as name==version"
        pins[match[1].lower()] = match[2]
    return pins


def _conda_environment() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def test_torch_is_pinned_exactly():
    assert re.fullmatch(r"\d+\.\d+\.\d+", _requirements()["torch"])


def test_environment_yml_matches_requirements():
    env = _conda_environment()
    assert env["channels"][0] == "conda-forge"
    assert set(env["channels"]) <= {"conda-forge", "nodefaults"}, env["channels"]
    conda = {}
    for spec in env["dependencies"]:
        if isinstance(spec, dict):  # a `pip:` section
            for pip_spec in spec.get("pip", []):
                name, _, version = pip_spec.partition("==")
                conda[name.lower()] = version
            continue
        name, operator, version = re.fullmatch(r"([\w.\-]+)\s*(?:(==?)\s*(\S+))?", spec).groups()
        if name.lower() not in CONDA_ONLY:
            assert operator == "==", f"environment.yml: {spec!r} should pin with =="
            conda[name.lower()] = version
    expected = {CONDA_NAMES.get(name, name): version for name, version in _requirements().items()}
    assert conda == expected


# ---------------------------------------------------------------- notebooks


def test_there_are_notebooks():
    assert ROOT / "notebooks" / "00_start_here.ipynb" in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    notebook = json.loads(path.read_text())
    dirty = [
        i
        for i, cell in enumerate(notebook["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; run `make clean-notebooks`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_uses_python3_kernel(path):
    metadata = json.loads(path.read_text())["metadata"]
    assert metadata.get("kernelspec", {}).get("name") == "python3", path.name


# ---------------------------------------------------------------- configuration


def test_pytest_config_runs_notebooks_with_timeouts():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    addopts = config["addopts"].split()
    assert "--nbval-lax" in addopts
    assert any(re.fullmatch(r"--nbval-cell-timeout=\d+", opt) for opt in addopts), addopts
    assert "notebooks" in config["testpaths"] and "tests" in config["testpaths"]
    assert int(config["timeout"]) > 0
