"""Console progress lines (a log, not a terminal): one per ~10%, with a rate a person can read."""

from __future__ import annotations

import pytest

from lvm_ray import progress


@pytest.mark.parametrize(
    ("batch", "seconds_each", "pace"),
    [(100, 1 / 296, "296 ECGs/s"), (1, 0.4, "2.5 ECGs/s"), (1, 3.93, "3.9 s/ECG")],
    ids=["fast", "slow", "seconds-each"],
)
def test_progress_lines_say_the_rate_in_words_that_fit_it(monkeypatch, capsys, batch, seconds_each, pace):
    clock = iter([100.0] + [100.0 + seconds_each * batch * step for step in (1, 2, 3)])
    monkeypatch.setattr(progress, "_now", lambda: next(clock))
    with progress.Progress(3 * batch, "explain") as bar:
        for _ in range(3):
            bar.update(batch)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3  # one per third here: every update crosses a tenth
    assert lines[-1] == f"explain: {3 * batch}/{3 * batch} ECGs (100%, {pace}, ETA 0 s)", lines
