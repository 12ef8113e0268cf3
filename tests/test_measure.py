"""The `lvm-ray rules` stage: every ECG measured once with Ray Data, same numbers as measure_batch."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from lvm_ray import store
from lvm_ray.cli import app
from lvm_ray.measure import read_rules
from lvm_ray.rules import measure_batch
from lvm_ray.synth import write_cohort


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_rules_stage_matches_measure_batch(tmp_path, ray_cluster):
    data, out = str(tmp_path / "cohort"), str(tmp_path / "rules")
    write_cohort(120, 4, data, chunk_size=40)
    ray_data_log = _Records()
    logging.getLogger("ray.data").addHandler(ray_data_log)
    try:
        result = CliRunner().invoke(app, ["rules", "--data", data, "--out", out])
    finally:
        logging.getLogger("ray.data").removeHandler(ray_data_log)
    assert result.exit_code == 0, result.output
    assert "ECGs         : 120 (120 measurable)" in result.output
    assert not [m for m in ray_data_log.messages if "deprecated" in m]  # a quiet console: no Ray API warnings
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
