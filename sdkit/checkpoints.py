"""Resumable training checkpoints for the recipe (notebook 12's ``sdkit.training``): weights and
optimizer moments in one safetensors file, with the step and the optimizer's param groups as
JSON metadata. Nothing is pickled. Left out: sharding, mixed-precision state, schedulers.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from . import checks, finetune


def save_checkpoint(path, modules: dict, opt, step: int):
    """Write ``modules``' weights (``{name: nn.Module}``), ``opt``'s moments and ``step`` to the
    safetensors file ``path``, atomically (a temporary file, then a rename).

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    path = checks.check_folder("path", path)
    step = checks.check_int("step", step, 0)
    if not isinstance(modules, dict) or not modules:
        checks.fail("modules", modules, "expected a non-empty dict of name -> torch module")
    tensors, meta = {}, {"step": step}
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            tensors[f"{name}/{k}"] = v.detach().contiguous()
    sd = opt.state_dict()
    for i, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt/{i}/{k}"] = torch.as_tensor(v).detach().contiguous()
    meta["param_groups"] = sd["param_groups"]
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def load_checkpoint(path, modules: dict, opt) -> dict:
    """Load a ``save_checkpoint`` file into ``modules`` and ``opt``; returns its metadata
    (``{"step": ..., "param_groups": ...}``). Nothing is unpickled.

    Introduced in notebooks/12_training_from_scratch.ipynb.
    """
    tensors, meta = finetune._read(path, "a checkpoint written by sdkit.training")
    meta = json.loads(meta["meta"])
    for name, m in modules.items():
        pre = f"{name}/"
        m.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, i, key = k.split("/", 2)
            state.setdefault(int(i), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta
