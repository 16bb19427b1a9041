"""benchmarks/t_coverage.py: the times a method's loss sees, measured on its shipped config."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_t_coverage_measures_the_rows_each_method_trains_on(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import t_coverage

    small = ["algorithm.batch_size=8", "algorithm.group_size=4", "algorithm.steps_per_epoch=1",
             "algorithm.micro_batch_size=8"]
    # the three noisiest of 10 steps on the grid 1.0, 0.9, ...: every row at t >= 0.8
    t_coverage.main(["--methods", "flow_grpo", "--epochs", "1", "--out", str(tmp_path / "noisy"), "--set", *small,
                     "algorithm.timestep_fraction=0.3", "algorithm.timestep_choice=noisiest"])
    noisy = json.loads((tmp_path / "noisy" / "t_coverage.json").read_text())["methods"]["flow_grpo"]
    assert noisy["share_t_ge_0.8"] == 1.0 and noisy["mean_t"] == pytest.approx(0.9)
    assert noisy["rows"] == 8 * 3
    # DiffusionNFT draws its own t in [t_min, t_max] = [0.6, 1]
    t_coverage.main(["--methods", "nft", "--epochs", "1", "--out", str(tmp_path / "nft"), "--set", *small])
    nft = json.loads((tmp_path / "nft" / "t_coverage.json").read_text())["methods"]["nft"]
    assert nft["share_t_ge_0.6"] == 1.0 and 0.6 < nft["mean_t"] < 1.0
    assert "t>=0.8" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no shipped config"):
        t_coverage.main(["--methods", "nope", "--out", str(tmp_path)])
