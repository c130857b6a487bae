"""The second bad-input table (issue 12): mistakes learners and teachers make, by kind.

Kinds (tests/mistakes.py): ``memory`` (a call that would exhaust the machine is refused with
the estimate and the limit), ``silent`` (an argument that would be ignored or "fixed" is
refused, or its conversion is documented and checked), ``state`` (nothing is left behind:
context managers restore what was installed, tokenizer changes are all-or-nothing) and
``loading`` (a broken model folder or path says what was expected and what was found).

After each row the tiny pipeline is checked against a snapshot taken before it, and the next
good call must give the same image bit for bit.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from mistakes import (
    KINDS,
    Behaves,
    Converted,
    Ctx,
    Refused,
    assert_refused,
    fresh_environment,
    good_call,
    snapshot,
)
from mistakes_ground import MISTAKES as GROUND_MISTAKES
from mistakes_notebooks import MISTAKES as NOTEBOOK_MISTAKES

MISTAKES = GROUND_MISTAKES + NOTEBOOK_MISTAKES


def test_table_is_large_ids_unique_and_kinds_known():
    ids = [m.id for m in MISTAKES]
    assert len(ids) == len(set(ids)), [i for i, n in collections.Counter(ids).items() if n > 1]
    assert {m.kind for m in MISTAKES} <= set(KINDS)
    per_kind = collections.Counter(m.kind for m in MISTAKES)
    print("classroom mistakes by kind:", dict(per_kind), "total", len(MISTAKES))
    assert len(MISTAKES) >= 100, per_kind
    assert all(per_kind[k] >= 10 for k in KINDS), per_kind


@pytest.fixture(scope="module")
def reference(tiny_pipe):
    """The good call's image and the pipeline's state, before any row ran."""
    return good_call(tiny_pipe), snapshot(tiny_pipe)


@pytest.fixture
def ctx(request, tmp_path, monkeypatch):
    case = request.node.callspec.params["case"]
    fresh_environment(monkeypatch, tmp_path, case.env)
    return Ctx(tmp_path, request.getfixturevalue("tiny_pipe") if case.needs_pipe else None)


@pytest.mark.parametrize("case", [pytest.param(m, id=f"{m.kind}-{m.id}") for m in MISTAKES])
def test_classroom_mistake(case, ctx, tiny_pipe, reference):
    image_before, state_before = reference
    if isinstance(case.expect, Converted):
        case.expect.check(case.call(ctx))
    elif isinstance(case.expect, Behaves):
        case.expect.check(case.call(ctx), ctx)
    else:
        assert isinstance(case.expect, Refused)
        assert_refused(case.expect, case.call, ctx)
    # nothing left behind: the same state, and the next good call draws the same image
    assert snapshot(tiny_pipe) == state_before
    assert torch.is_grad_enabled()
    np.testing.assert_array_equal(good_call(tiny_pipe), image_before)
