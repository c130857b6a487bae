"""How many CPU threads torch uses, chosen so that several kernels can share one machine.

torch's own default is one thread per core it can see, in every process. In a classroom
(JupyterHub, Binder, a shared server) or with two notebooks open, each kernel then runs as
many threads as there are cores, and the processes fight over them: on a 2-core machine, two
kernels generating with the toy model at once each took 6.8x longer than one alone. torch
also ignores the CPU quota a container or JupyterHub gives a learner.

`choose_threads` decides, `apply` tells torch, and `describe` says what was chosen and why in a
sentence (notebook 00 prints it). `import sdkit` calls `apply()` once (a documented side
effect of importing the kit):

1. The usable CPUs: the CPUs this process may run on (``os.sched_getaffinity``), capped by the
   cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), rounded
   down, at least 1.
2. ``SDKIT_THREADS``: a positive whole number is used as it is (e.g. the usable CPUs, to get
   torch's old behaviour on a machine of your own); unset or ``auto`` means the kit's policy:
3. half the usable CPUs, at least 1 (1 on a 2-core machine). Two kernels at once then each
   keep their speed, and one kernel alone loses little: the kit's small models gain little
   from a second thread.

Measured 2026-12-02 on the kit's 2-core CI machine (other jobs ran on it now and then, so
each figure is good to about 20%):

- toy pipeline, 12 images of 10 steps: torch's default (2 threads) alone 1.3-1.6 s, two at
  once 5.8-7.6 s each (4-5x); the kit's 1 thread alone 1.7 s, two at once 1.6-1.9 s each.
- notebook 06 run whole (``jupyter nbconvert --execute``): 2 threads alone 21-25 s, two at
  once 116-133 s each (5-6x); 1 thread alone 19-27 s, two at once 20-24 s each (at most 1.06x).
- OpenMP's passive wait policy (``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep at
  once instead of spinning) with 2 threads: two at once 2.2-2.6 s each, no better than one
  thread, but one kernel alone 2.5-4.9 s, slower than either (the toy model's many small ops
  each wake the threads); with one thread there is nothing to wait for. So the kit leaves the
  wait policy alone; set it before starting Python to try it (``describe`` reports it).

Left out: per-socket/NUMA placement, thread pinning (``OMP_PROC_BIND``), and other libraries'
pools (numpy's BLAS threads, tokenizers' Rust threads).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .checks import fail

THREADS_ENV = "SDKIT_THREADS"
_ALLOWED = "expected a positive whole number of threads such as 1 or 4, or 'auto'"


@dataclass(frozen=True)
class ThreadChoice:
    """The threads torch gets: ``threads`` (intra-op), ``interop_threads``, the ``usable_cpus``
    the choice started from, and ``reason`` in words.

    Introduced in notebooks/00_start_here.ipynb.
    """

    threads: int
    interop_threads: int
    usable_cpus: int
    reason: str


def affinity_cpus() -> int:
    """How many CPUs this process may run on (its affinity mask; every core where there is
    no such thing, e.g. macOS and Windows).

    Introduced in notebooks/00_start_here.ipynb.
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _cgroup_paths(root: Path) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and its v1 ``cpu`` controller path, from /proc/self/cgroup."""
    v2 = v1 = None
    try:
        text = (root / "proc/self/cgroup").read_text()
    except OSError:
        return None, None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "cpu" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _quota(text_quota: str, text_period: str) -> float | None:
    """CPUs a quota/period pair allows; None when unlimited ("max", -1) or unreadable."""
    try:
        quota, period = int(text_quota), int(text_period)
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def cgroup_cpu_quota(root: Path | str = "/") -> float | None:
    """The CPU quota of this process's cgroup, in CPUs (``1.5`` = one and a half cores), or
    None where there is none. Reads cgroup v2 ``cpu.max`` ("max 100000" = no limit) or v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1 = no limit), as Docker and JupyterHub's
    spawners set them; in a container the files sit at the cgroup root. ``root`` is for tests.

    Introduced in notebooks/00_start_here.ipynb.
    """
    root = Path(root)
    cgroup = root / "sys/fs/cgroup"
    v2, v1 = _cgroup_paths(root)
    candidates = []  # (quota file, period file or None), most specific first
    for inner in ([v2.lstrip("/")] if v2 and v2 != "/" else []) + [""]:
        candidates.append((cgroup / inner / "cpu.max", None))
    for folder in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        for inner in ([v1.lstrip("/")] if v1 and v1 != "/" else []) + [""]:
            base = cgroup / folder / inner
            candidates.append((base / "cpu.cfs_quota_us", base / "cpu.cfs_period_us"))
    for quota_file, period_file in candidates:
        try:
            if period_file is None:
                fields = quota_file.read_text().split()
                if len(fields) != 2:
                    continue
                return _quota("-1" if fields[0] == "max" else fields[0], fields[1])
            return _quota(quota_file.read_text().strip(), period_file.read_text().strip())
        except OSError:
            continue
    return None


def usable_cpus(root: Path | str = "/") -> tuple[int, str]:
    """The CPUs torch may really use here, and where the figure comes from: the affinity mask,
    capped by the cgroup CPU quota (rounded down, at least 1).

    Introduced in notebooks/00_start_here.ipynb.
    """
    cpus = affinity_cpus()
    where = f"{cpus} CPU{'s' if cpus > 1 else ''} in this process's affinity mask"
    quota = cgroup_cpu_quota(root)
    if quota is not None and math.floor(quota) < cpus:
        cpus = max(1, math.floor(quota))
        where += f", capped by a cgroup CPU quota of {quota:g}"
    return cpus, where


def _parse_env(value: str) -> int | None:
    """SDKIT_THREADS' value: a positive int, or None for 'auto'/unset."""
    text = value.strip().lower()
    if text in ("", "auto"):
        return None
    if not text.isdigit() or int(text) < 1:
        fail(THREADS_ENV, value, _ALLOWED)
    return int(text)


def choose_threads(env: str | None = None, root: Path | str = "/") -> ThreadChoice:
    """The kit's thread choice: ``SDKIT_THREADS`` if set (``env`` overrides the environment),
    else half the usable CPUs, at least 1. Raises ``SdkitInputError`` for a bad value.

    Introduced in notebooks/00_start_here.ipynb.
    """
    if env is not None and not isinstance(env, str):
        fail("env", env, "expected a str such as '2' or 'auto', or None")
    value = os.environ.get(THREADS_ENV, "") if env is None else env
    cpus, where = usable_cpus(root)
    asked = _parse_env(value)
    if asked is not None:
        return ThreadChoice(asked, asked, cpus, f"{THREADS_ENV}={value.strip()} ({where})")
    threads = max(1, cpus // 2)
    reason = (f"half of the {cpus} usable CPU{'s' if cpus > 1 else ''}, at least 1 ({where}), "
              f"so that two kernels can share the machine; {THREADS_ENV} overrides it")
    return ThreadChoice(threads, threads, cpus, reason)


_applied: dict = {}  # what apply() last did: the choice and whether inter-op could be set


def apply(choice: ThreadChoice | None = None) -> ThreadChoice:
    """Tell torch: ``torch.set_num_threads`` and, while torch still allows it (before any
    inter-op work), ``torch.set_num_interop_threads``. ``import sdkit`` calls it once.

    Introduced in notebooks/00_start_here.ipynb.
    """
    if choice is None:
        choice = choose_threads()
    if not isinstance(choice, ThreadChoice):
        fail("choice", choice, "expected a ThreadChoice from choose_threads(), or None")
    torch.set_num_threads(choice.threads)
    try:
        torch.set_num_interop_threads(choice.interop_threads)
        interop_set = True
    except RuntimeError:  # torch refuses once inter-op work has started or it was set before
        interop_set = torch.get_num_interop_threads() == choice.interop_threads
    _applied.update(choice=choice, interop_set=interop_set)
    return choice


def describe() -> str:
    """A plain sentence: how many threads torch uses, why, and what the OpenMP wait policy is.

    Introduced in notebooks/00_start_here.ipynb.
    """
    choice = _applied.get("choice") or choose_threads()
    now = torch.get_num_threads()
    text = f"torch uses {now} thread{'s' if now > 1 else ''}"
    if now == choice.threads:
        text += f": {choice.reason}."
    else:
        text += f" (sdkit chose {choice.threads}: {choice.reason}; changed since)."
    interop = torch.get_num_interop_threads()
    if not _applied.get("interop_set", True):
        text += f" Inter-op threads stay at {interop}: torch had already started using them."
    text += " " + wait_policy() + "."
    return text


def wait_policy() -> str:
    """The OpenMP wait policy in this process's environment, in words (the kit sets none).

    Introduced in notebooks/00_start_here.ipynb.
    """
    policy = os.environ.get("OMP_WAIT_POLICY", "").strip()
    if policy:
        return f"OMP_WAIT_POLICY={policy} from the environment"
    return "OpenMP's default wait policy (idle threads spin briefly, then sleep)"
