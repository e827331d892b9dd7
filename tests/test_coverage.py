"""The coverage table of docs/transformers-coverage.md is generated, not hand-kept: this test builds
every MoE family of the installed transformers from a tiny config, runs the functional checks of
:func:`moebalance.integrations.transformers.coverage.check_family` (bias on every router found,
the probe's bit-identical output and steering check, loads = tokens x K, one update per optimizer
step) and compares the result with the stored table.

If transformers was upgraded, regenerate it:
``python -m moebalance.integrations.transformers.coverage --write docs/transformers-coverage.md``.
"""

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from moebalance.integrations.transformers import coverage  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "transformers-coverage.md"


@pytest.mark.slow
def test_coverage_table_is_current():
    rows = [coverage.check_family(m) for m in coverage.moe_model_types()]
    assert coverage.table(rows) == DOC.read_text(), (
        "docs/transformers-coverage.md is out of date: python -m moebalance.integrations.transformers.coverage "
        "--write docs/transformers-coverage.md"
    )
    works = [r for r in rows if r.status == "works"]
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe"} <= {r.model_type for r in works}
    # every family whose router carries its own bias trains that slot, never an added one
    own = {"deepseek_v3", "glm4_moe", "ernie4_5_moe", "minimax_m2", "afmoe"}
    assert all(r.slot.startswith("own") for r in works if r.model_type in own)


def test_one_family_row():
    row = coverage.check_family("glm4_moe")
    assert (row.status, row.router_class, row.routers) == ("works", "Glm4MoeTopkRouter", 2)
    assert row.slot == "own `0.mlp.gate.e_score_correction_bias`"
    assert coverage.check_family("llama").status == "refused"
