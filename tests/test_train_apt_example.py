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
    assert not list(tmp_path.glob("trainer-*"))  # the Trainer's scratch directory is gone


def test_local_decoder_without_pad_token_and_json_labels(tmp_path):
    """--model a local GPT-2 checkpoint whose tokenizer has no pad token (as the real ones), data as a JSON
    array with labels 1..3 given as strings: padded with the end-of-text token, labels mapped to 0..2."""
    import json

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    words = ["[UNK]", "[EOS]"] + [str(i) for i in range(60)]
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(tmp_path / "m")
    torch.manual_seed(0)
    GPT2ForSequenceClassification(GPT2Config(vocab_size=len(words), n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                             num_labels=3)).save_pretrained(tmp_path / "m")
    ex = load_example()
    texts, labels = ex.generated_task(24, seed=1)
    rows = [{"text": t, "label": str(1 + (i % 3))} for i, t in enumerate(texts)]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    res = ex.main(["--model", str(tmp_path / "m"), "--train-file", str(tmp_path / "train.json"), "--methods",
                   "apt, prefix", "--epochs", "1", "--quiet", "--out", str(tmp_path), "--device", "cpu"])
    assert set(res) == {"apt", "prefix"}


def test_bad_methods_are_refused_before_training():
    ex = load_example()
    with pytest.raises(SystemExit, match="unknown"):
        ex.main(["--methods", "apt,prefx", "--quiet"])


def test_single_record_json_lines_and_labels_across_formats(tmp_path):
    """A one-record .jsonl file; a CSV's "0"/"1" labels and a JSON file's 0/1 are the same labels."""
    import json

    ex = load_example()
    texts, labels = ex.generated_task(16, seed=2)
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels))
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": texts[0], "label": labels[0]}) + "\n")
    res = ex.main(["--train-file", str(tmp_path / "train.csv"), "--eval-file", str(tmp_path / "one.jsonl"),
                   "--methods", "full", "--epochs", "1", "--quiet", "--out", str(tmp_path)])
    assert set(res) == {"full"}
