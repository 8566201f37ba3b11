"""examples/train_apt.py: the embedded default, the Trainer path and local data files (tiny sizes)."""

import csv
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_example():
    spec = importlib.util.spec_from_file_location("train_apt", ROOT / "examples" / "train_apt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plain_loop_default(tmp_path, capsys):
    ex = load_example()
    res = ex.main(["--epochs", "1", "--train-size", "64", "--eval-size", "32", "--quiet", "--out", str(tmp_path)])
    assert set(res) == {"apt", "prefix", "full"}
    ratio = res["apt"][1] / res["prefix"][1]
    assert 1.4 < ratio < 1.6
    assert all(0.0 <= r[2] <= 1.0 for r in res.values())
    assert (tmp_path / "gates.png").stat().st_size > 0
    assert "APT adapter / prefix-tuning adapter parameters" in capsys.readouterr().out


def test_trainer_and_local_files(tmp_path):
    pytest.importorskip("accelerate")
    ex = load_example()
    texts, labels = ex.generated_task(48, seed=3)
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels))
    res = ex.main(["--train-file", str(path), "--methods", "apt", "--epochs", "1", "--trainer", "--quiet",
                   "--out", str(tmp_path)])
    assert set(res) == {"apt"}
