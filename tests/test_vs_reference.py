"""The side-by-side harness (`benchmarks.vs_reference`): on the tiny organism, one MEMIT edit
and one round give the report's fields, and the reference-style variant swapped into the
pipeline computes the API's δ and weights. No timing assertion: the machine is shared."""

from __future__ import annotations

import math

from benchmarks import vs_reference

# Layers 0,1 of the tiny organism's 2 (memit.cfg edits 1,2 of the small one's 4); few steps
# and no generated templates keep it short.
TINY = vs_reference.Setup("configs/memit.cfg", "counterfact.json", 1,
                          ("--layers=0,1", "--v_num_grad_steps=4", "--context_seeds="))


def test_reference_style_edit_gives_the_api_s_delta_and_weights():
    row = vs_reference.compare("organism:tiny", "memit", TINY, rounds=1)
    assert row["method"] == "memit" and row["edits"] == 1
    assert set(row["timings"]) == {"api", "reference-style"}
    for name in ("api_s_per_edit", "reference_style_s_per_edit", "ratio"):
        assert math.isfinite(row[name]) and row[name] > 0, name
    for name in ("delta_agreement", "weight_agreement", "api_against_shipped"):
        assert row[name]["relative"] <= 1e-5, (name, row[name])
    assert row["api_against_shipped"]["max_abs_diff"] == 0.0
