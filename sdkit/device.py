"""Pick the torch device and dtype that sdkit's notebooks run on.

One function does the work, `get_device`. It looks, in this order, at

1. its arguments (`device=`, `dtype=`),
2. the environment variables `SDKIT_DEVICE` and `SDKIT_DTYPE`,
3. the machine: a CUDA GPU gives (cuda, float16), Apple's MPS gives
   (mps, float32), anything else gives (cpu, float32).

It answers with a `DeviceChoice`: the device, the dtype and a sentence saying
why. Inputs it does not understand, or cannot honour on this machine, raise
`DeviceError` (a `ValueError`) naming the parameter, the value and what is
allowed. Nothing is silently "fixed": asking for CUDA on a laptop is an error,
not a quiet fall-back to the CPU.

Why float32 on MPS? float16 works for many models on recent macOS, but some
ops still give NaNs (black images) or are missing; float32 is the safe default
and `SDKIT_DTYPE=float16` opts in.

What it leaves out: multi-GPU placement, XPU/TPU/ROCm-specific handling (a ROCm
build of torch reports itself as CUDA and is treated as such), memory-based
heuristics and float64.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checks import SdkitInputError, fail

DEVICE_ENV = "SDKIT_DEVICE"
DTYPE_ENV = "SDKIT_DTYPE"

# every spelling sdkit accepts for a dtype, mapped to the torch dtype
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_DTYPE_NAMES = "'float32' (fp32), 'float16' (fp16, half), 'bfloat16' (bf16)"
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps(:0)?|cuda(:\d+)?)$")
_DEVICE_NAMES = "'auto', 'cpu', 'cuda', 'cuda:N', 'mps'"


class DeviceError(SdkitInputError):
    """A device or dtype that sdkit does not understand or cannot use here.

    Introduced in notebooks/00_start_here.ipynb.
    """


@dataclass(frozen=True)
class DeviceChoice:
    """Where tensors go and in which precision, plus why.

    Unpacks like a pair: `device, dtype = get_device()`.

    Introduced in notebooks/00_start_here.ipynb.
    """

    device: torch.device
    dtype: torch.dtype
    reason: str

    def __iter__(self):
        yield self.device
        yield self.dtype


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The device strings `get_device` would accept on this machine.

    Introduced in notebooks/00_start_here.ipynb.
    """
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        names.append("mps")
    return names


def _allowed_here() -> str:
    return ", ".join(repr(name) for name in available_devices())


def _pick(argument, env_name: str):
    """Return (value, name of where it came from); (None, None) when unset."""
    if argument is not None:
        return argument, env_name.removeprefix("SDKIT_").lower()
    value = os.environ.get(env_name, "").strip()
    if value:
        return value, env_name
    return None, None


def _resolve_device(value, source) -> tuple[torch.device, str]:
    if value is None or value == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), "a CUDA GPU is available"
        if _mps_available():
            return torch.device("mps"), "Apple MPS is available (no CUDA)"
        return torch.device("cpu"), "no CUDA GPU or Apple MPS found"

    text = str(value) if isinstance(value, torch.device) else value
    if not isinstance(text, str) or not _DEVICE_PATTERN.match(text.strip().lower()):
        fail(source, value, f"not a device sdkit knows; expected one of {_DEVICE_NAMES} "
                            f"(available on this machine: {_allowed_here()})", DeviceError)
    text = text.strip().lower()
    if text == "auto":
        return _resolve_device(None, source)
    where = f"from {source}" if source.isupper() else f"from the {source}= argument"
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            fail(source, value, "torch.cuda.is_available() is False on this machine; "
                                f"expected one of {_allowed_here()} (is this a CPU-only build "
                                f"of torch? torch.version.cuda is {torch.version.cuda!r}; see "
                                "README.md for installing a CUDA build)", DeviceError)
        index = int(text.split(":")[1]) if ":" in text else None
        if index is not None and index >= torch.cuda.device_count():
            fail(source, value, f"this machine has {torch.cuda.device_count()} CUDA "
                                f"device(s); expected one of {_allowed_here()}", DeviceError)
        return torch.device(text), where
    if text.startswith("mps"):
        if not _mps_available():
            fail(source, value, "torch.backends.mps.is_available() is False on this machine "
                                "(MPS needs Apple silicon and macOS 12.3+); expected one of "
                                f"{_allowed_here()}", DeviceError)
        return torch.device("mps"), where
    return torch.device("cpu"), where


def _resolve_dtype(value, source, device: torch.device) -> tuple[torch.dtype, str]:
    if value is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        return dtype, f"sdkit's default on {device.type}"

    if isinstance(value, torch.dtype):
        dtype = value if value in _DTYPES.values() else None
    elif isinstance(value, str):
        dtype = _DTYPES.get(value.strip().lower().removeprefix("torch."))
    else:
        dtype = None
    if dtype is None:
        fail(source, value, f"not a dtype sdkit supports; expected one of {_DTYPE_NAMES}",
             DeviceError)
    if dtype == torch.float16 and device.type == "cpu":
        fail(source, value, "float16 on the CPU is slow or unsupported for many ops; "
                            "expected 'float32' or 'bfloat16' on cpu (use a CUDA GPU for "
                            "float16)", DeviceError)
    where = f"from {source}" if source.isupper() else f"from the {source}= argument"
    return dtype, where


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def get_device(device=None, dtype=None) -> DeviceChoice:
    """Choose the device and dtype for this machine, or check the ones asked for.

    device: None (ask `SDKIT_DEVICE`, then pick automatically), 'auto', 'cpu',
        'cuda', 'cuda:N', 'mps' or a `torch.device`.
    dtype: None (ask `SDKIT_DTYPE`, then use the device's default), a string
        such as 'float32', 'float16', 'bfloat16' (or 'fp32', 'fp16', 'bf16'),
        or a `torch.dtype`.

    Arguments beat environment variables, which beat the automatic choice.
    Raises `DeviceError` (a ValueError) for anything unknown or unavailable.

    Introduced in notebooks/00_start_here.ipynb.
    """
    device_value, device_source = _pick(device, DEVICE_ENV)
    chosen_device, device_why = _resolve_device(device_value, device_source)
    dtype_value, dtype_source = _pick(dtype, DTYPE_ENV)
    chosen_dtype, dtype_why = _resolve_dtype(dtype_value, dtype_source, chosen_device)
    reason = (
        f"device {chosen_device} ({device_why}); dtype {_dtype_name(chosen_dtype)} ({dtype_why})"
    )
    return DeviceChoice(chosen_device, chosen_dtype, reason)


def describe_device(choice: DeviceChoice | None = None) -> str:
    """A few human-readable lines: what was chosen, why, and what the machine has.

    With no argument it calls `get_device()` first.

    Introduced in notebooks/00_start_here.ipynb.
    """
    if choice is None:
        choice = get_device()
    lines = [
        f"sdkit will use {choice.device} with {_dtype_name(choice.dtype)}",
        f"  why: {choice.reason}",
        f"  torch {torch.__version__} (built for CUDA {torch.version.cuda or '-'})",
        f"  CUDA available: {torch.cuda.is_available()}; MPS available: {_mps_available()}",
    ]
    if choice.device.type == "cuda":
        index = choice.device.index if choice.device.index is not None else 0
        props = torch.cuda.get_device_properties(index)
        free, total = (n / 2**30 for n in torch.cuda.mem_get_info(index))
        lines.append(f"  GPU {index}: {props.name}, {total:.1f} GiB memory ({free:.1f} GiB free)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ memory limits

MEMORY_ENV = "SDKIT_MEMORY_LIMIT"
MEMORY_SHARE = 0.5  # of the memory available now: a classroom machine is shared
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        fail(MEMORY_ENV, text, "expected a positive size such as '8GiB', '12GB' or '500MiB'",
             DeviceError)
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _cpu_available_bytes() -> int:
    """MemAvailable from /proc/meminfo, capped by a cgroup's memory.max (containers, JupyterHub);
    elsewhere (macOS, Windows) torch's view is not available, so 8 GiB is assumed."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            cgroup_free = int(limit) - used
            available = cgroup_free if available is None else min(available, cgroup_free)
    except (OSError, ValueError):
        pass
    return available if available is not None else 8 * 2**30


def memory_limit(device=None) -> tuple[int, str]:
    """How many bytes one sdkit call may allocate on ``device`` (default: ``get_device()``'s),
    and a few words saying where the figure comes from.

    ``SDKIT_MEMORY_LIMIT`` (e.g. ``24GiB``) sets it; otherwise it is half of the memory
    available now (CUDA: free GPU memory; CPU: MemAvailable, within a container's limit), so
    a call the kit accepts leaves the machine, and its other learners, room to breathe.

    Introduced in notebooks/00_start_here.ipynb.
    """
    text = os.environ.get(MEMORY_ENV, "").strip()
    if text:
        return _parse_bytes(text), f"set by {MEMORY_ENV}"
    device = torch.device(device) if device is not None else get_device().device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device.index or 0)
        return int(free * MEMORY_SHARE), "half of the GPU memory free now"
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() * MEMORY_SHARE), "half of MPS's memory"
    return int(_cpu_available_bytes() * MEMORY_SHARE), "half of the memory available now"


def format_bytes(n: float) -> str:
    """``3.2 GiB``, ``640 MiB``: a size for a message."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def check_memory(name: str, value, need_bytes: float, what: str, device=None) -> None:
    """Refuse a call whose estimated memory, ``need_bytes``, is over ``memory_limit(device)``.

    ``name=value`` is the argument that makes the call big (``height=4096``); ``what`` says
    what the estimate counts (``"the UNet's attention at 4096x4096"``). The message gives the
    estimate, the limit, where the limit comes from and how to raise it.

    Introduced in notebooks/00_start_here.ipynb.
    """
    limit, why = memory_limit(device)
    if need_bytes > limit:
        fail(name, value, f"{what} needs about {format_bytes(need_bytes)}, over the memory "
                          f"limit of {format_bytes(limit)} ({why}); use a smaller value, or "
                          f"raise the limit on a bigger machine with {MEMORY_ENV}=... "
                          f"(e.g. {MEMORY_ENV}=32GiB)")


def _per_sample_bytes(module, call, training: bool = True) -> int:
    """Bytes one item of a batch costs in ``module`` (for ``check_memory``'s estimates), measured
    by ``call()`` (a forward pass of batch 1, run without gradients): training keeps every
    layer's output (their sum, plus each attention layer's (heads, N, M) weights twice);
    inference holds a few at a time (four times the largest). Used by the trainers of
    notebooks 10-12."""
    sizes: list[int] = []

    def hook(mod, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        if torch.is_tensor(out):
            sizes.append(out.numel() * out.element_size())
        if hasattr(mod, "heads") and hasattr(mod, "to_k") and args:  # diffusers' Attention
            ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            n = args[0].shape[-2] * args[0].shape[-1] if args[0].ndim == 4 else args[0].shape[1]
            m = n if ctx is None else ctx.shape[1]
            sizes.append(2 * mod.heads * n * m * args[0].element_size())

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in module.modules()
               if not list(m.children()) or hasattr(m, "heads")]
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return int(sum(sizes)) if training else 4 * max(sizes, default=0)
