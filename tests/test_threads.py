"""sdkit.threads: the CPUs a process may really use, the thread policy, SDKIT_THREADS, and
that `import sdkit` applies it. The cgroup files are fakes under tmp_path (``root=``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdkit import threads
from sdkit.checks import SdkitInputError

ROOT = Path(__file__).resolve().parents[1]


def fake_root(tmp_path: Path, cgroup: str, files: dict[str, str]) -> Path:
    """A fake / with /proc/self/cgroup and files under /sys/fs/cgroup."""
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        path = tmp_path / "sys/fs/cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.fixture
def cpus(monkeypatch):
    """Pretend the affinity mask holds n CPUs."""
    def set_cpus(n):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
    return set_cpus


# ------------------------------------------------------------------------------ the quota


@pytest.mark.parametrize("cgroup, files, quota", [
    ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),  # v2 at the container's root
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),  # v2, no limit
    ("0::/user.slice/jupyter-ada\n",  # v2, the process's own cgroup beats the root's file
     {"cpu.max": "max 100000\n", "user.slice/jupyter-ada/cpu.max": "200000 100000\n"}, 2.0),
    ("4:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "50000\n",  # v1 (Docker --cpus=.5)
                           "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 0.5),
    ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "garbage\n", "cpu/cpu.cfs_period_us": "1\n"}, None),
    ("", {}, None),  # no cgroup files at all (macOS, Windows)
])
def test_cgroup_quota_is_read(tmp_path, cgroup, files, quota):
    assert threads.cgroup_cpu_quota(fake_root(tmp_path, cgroup, files)) == quota


def test_a_machine_without_proc_has_no_quota(tmp_path):
    assert threads.cgroup_cpu_quota(tmp_path) is None


@pytest.mark.parametrize("affinity, cpu_max, usable", [
    (8, "max 100000", 8),  # no quota: the affinity mask
    (8, "200000 100000", 2),  # JupyterHub's cpu_limit=2 on an 8-core node
    (8, "150000 100000", 1),  # 1.5 CPUs: rounded down
    (8, "20000 100000", 1),  # 0.2 CPUs: still one thread
    (2, "400000 100000", 2),  # a quota above the mask does not add CPUs
])
def test_usable_cpus_is_the_mask_capped_by_the_quota(tmp_path, cpus, affinity, cpu_max, usable):
    cpus(affinity)
    root = fake_root(tmp_path, "0::/\n", {"cpu.max": cpu_max})
    found, where = threads.usable_cpus(root)
    assert found == usable
    assert ("quota" in where) == (usable < affinity)


# ------------------------------------------------------------------------------ the policy


@pytest.mark.parametrize("affinity, expected", [(1, 1), (2, 1), (3, 1), (4, 2), (16, 8)])
def test_auto_is_half_the_usable_cpus(tmp_path, cpus, affinity, expected):
    cpus(affinity)
    for env in ("", "auto", " AUTO "):
        choice = threads.choose_threads(env, root=tmp_path)
        assert (choice.threads, choice.interop_threads, choice.usable_cpus) == (
            expected, expected, affinity)
        assert "half" in choice.reason and "SDKIT_THREADS overrides" in choice.reason


def test_the_quota_feeds_the_policy(tmp_path, cpus):
    cpus(64)  # a big node, a learner's pod limited to 4 CPUs
    root = fake_root(tmp_path, "0::/\n", {"cpu.max": "400000 100000"})
    assert threads.choose_threads("auto", root=root).threads == 2


def test_the_env_override_wins(tmp_path, cpus, monkeypatch):
    cpus(2)
    monkeypatch.setenv("SDKIT_THREADS", "3")
    choice = threads.choose_threads(root=tmp_path)
    assert (choice.threads, choice.interop_threads) == (3, 3)
    assert choice.reason.startswith("SDKIT_THREADS=3")
    monkeypatch.setenv("SDKIT_THREADS", "auto")
    assert threads.choose_threads(root=tmp_path).threads == 1


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5", "2 threads", "max"])
def test_a_bad_sdkit_threads_is_refused_in_the_kit_format(tmp_path, monkeypatch, bad):
    monkeypatch.setenv("SDKIT_THREADS", bad)
    with pytest.raises(SdkitInputError) as err:
        threads.choose_threads(root=tmp_path)
    assert str(err.value) == (f"SDKIT_THREADS={bad!r} is not allowed: expected a positive whole "
                              "number of threads such as 1 or 4, or 'auto'")


@pytest.mark.parametrize("call", [lambda: threads.choose_threads(2),
                                  lambda: threads.apply("2")])
def test_bad_arguments_are_refused(call):
    with pytest.raises(SdkitInputError, match="is not allowed"):
        call()


def test_apply_sets_torch_and_describe_says_so(tmp_path, cpus):
    before = torch.get_num_threads()
    try:
        cpus(4)
        choice = threads.apply(threads.choose_threads("3", root=tmp_path))
        assert torch.get_num_threads() == 3
        text = threads.describe()
        assert text.startswith("torch uses 3 threads: SDKIT_THREADS=3") and "OpenMP" in text
        torch.set_num_threads(1)  # changed behind the kit's back: describe tells
        assert "sdkit chose 3" in threads.describe()
        assert choice.threads == 3
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------ import sdkit


def _fresh(env_threads: str | None, code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SDKIT_THREADS"}
    if env_threads is not None:
        env["SDKIT_THREADS"] = env_threads
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_import_sdkit_applies_the_policy_in_a_fresh_process():
    code = ("import torch, sdkit\nfrom sdkit import threads\n"
            "print(torch.get_num_threads(), torch.get_num_interop_threads(),"
            " threads.choose_threads().threads)")
    out = _fresh(None, code)
    assert out.returncode == 0, out.stderr
    now, interop, policy = map(int, out.stdout.split())
    expected = max(1, threads.usable_cpus()[0] // 2)
    assert now == interop == policy == expected
    out = _fresh("2", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "2", "2"]


def test_import_sdkit_refuses_a_bad_sdkit_threads():
    out = _fresh("none", "import sdkit")
    assert out.returncode != 0
    assert "SDKIT_THREADS='none' is not allowed" in out.stderr
