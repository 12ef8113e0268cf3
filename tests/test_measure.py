"""The `lvm-ray rules` stage: every ECG measured once with Ray Data, same numbers as measure_batch."""

from __future__ import annotations

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from lvm_ray import store
from lvm_ray.cli import app
from lvm_ray.measure import read_rules
from lvm_ray.rules import measure_batch
from lvm_ray.synth import write_cohort


def test_rules_stage_matches_measure_batch(tmp_path, ray_cluster):
    data, out = str(tmp_path / "cohort"), str(tmp_path / "rules")
    write_cohort(120, 4, data, chunk_size=40)
    result = CliRunner().invoke(app, ["rules", "--data", data, "--out", out])
    assert result.exit_code == 0, result.output
    assert "ECGs         : 120 (120 measurable)" in result.output
    table = read_rules(out).set_index("ecg_id")
    assert len(table) == 120 and table.index.is_unique
    for column in (
        "r_uv_V5",
        "s_uv_V1",
        "qrs_ms",
        "sokolow_lyon_uv",
        "lvh_any_rule",
        "rules_error",
        "cart_lvh_any_rule",
    ):
        assert column in table.columns, column
    assert table["cart_lvh_any_rule"].isna().all()  # synthetic ECGs carry no cart amplitudes
    shard = store.read_table(data).slice(0, 20)
    direct = measure_batch(store.ecg_array(shard), shard.column("sex").to_pylist())
    direct.index = shard.column("ecg_id").to_pylist()
    np.testing.assert_allclose(table.loc[direct.index, "sokolow_lyon_uv"], direct["sokolow_lyon_uv"])
    pd.testing.assert_series_equal(
        table.loc[direct.index, "lvh_any_rule"].astype("boolean"), direct["lvh_any_rule"], check_names=False
    )
    # Re-running replaces the table rather than appending to it.
    assert CliRunner().invoke(app, ["rules", "--data", data, "--out", out]).exit_code == 0
    assert len(read_rules(out)) == 120
