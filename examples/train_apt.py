"""APT vs prefix tuning vs full fine-tuning on a sequence-classification task.

Default (no downloads, about a minute on 2 CPU cores): a small BERT-style classifier built
from a config, on a task generated on the fly (is token 7 in the sequence?), trained with a plain
loop. Each method starts from the same weights. A randomly initialised, frozen backbone gives the
prefix methods little to adapt: with the default, expect full fine-tuning to win; give --model a
pretrained checkpoint for the comparison that matters.

    python examples/train_apt.py                          # the embedded default
    python examples/train_apt.py --trainer                # the same with transformers' Trainer
    python examples/train_apt.py --model bert-base-uncased --dataset nyu-mll/glue --dataset-config sst2
    python examples/train_apt.py --dataset ./saved_dataset                          # datasets' save_to_disk
    python examples/train_apt.py --train-file train.csv --eval-file dev.csv         # local files: text,label

Prints trainable-parameter counts and eval accuracy per method, and saves the APT gate probe as a
heatmap (gates.png by default).
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import zlib

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from apt_kernels.hf import apply_apt, apply_prefix_tuning, gate_report  # noqa: E402


class HashTokenizer:
    """A tokenizer for the embedded default: whitespace words hashed into a small vocabulary (crc32: the same
    ids in every process, unlike Python's salted hash)."""

    def __init__(self, vocab_size: int, max_len: int):
        self.vocab_size, self.max_len = vocab_size, max_len

    def __call__(self, texts):
        ids = [[2 + (int(w) if w.isdigit() else zlib.crc32(w.encode())) % (self.vocab_size - 2) for w in t.split()][: self.max_len]
               for t in texts]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        return {"input_ids": input_ids, "attention_mask": mask}


def generated_task(n: int, seed: int, vocab: int = 60, length=(8, 24), target: int = 7):
    """Texts of random token numbers; label 1 iff the token ``target`` occurs."""
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for i in range(n):
        L = int(torch.randint(length[0], length[1] + 1, (1,), generator=g))
        toks = torch.randint(2, vocab, (L,), generator=g)
        toks[toks == target] = target + 1
        label = i % 2
        if label:
            toks[int(torch.randint(0, L, (1,), generator=g))] = target
        texts.append(" ".join(str(int(t)) for t in toks))
        labels.append(label)
    return texts, labels


def read_local(path: str):
    """Rows of a CSV (text,label columns), a JSON array or a JSON-lines file ({"text": ..., "label": ...};
    "sentence" is read where "text" is missing). Labels are kept as written (numbers or names)."""
    with open(path, newline="") as f:
        if path.endswith((".jsonl", ".json")):
            body = f.read()
            try:
                rows = json.loads(body)  # a JSON array
            except json.JSONDecodeError:
                rows = [json.loads(line) for line in body.splitlines() if line.strip()]  # JSON lines
            if isinstance(rows, dict):  # a single JSON-lines record
                rows = [rows]
            if not isinstance(rows, list):
                raise SystemExit(f"{path}: expected a JSON array or JSON lines of {{'text': ..., 'label': ...}}")
        else:
            rows = list(csv.DictReader(f))
    try:
        return [r.get("text") or r.get("sentence") for r in rows], [r["label"] for r in rows]
    except (KeyError, AttributeError) as e:
        raise SystemExit(f"{path}: every row needs a 'text' (or 'sentence') and a 'label' field") from e


def label_ids(train, evald):
    """Labels as 0..K-1 in sorted order (1..K, names, '0'/'1' strings all work: a CSV's "1" is a JSON file's 1); K."""
    def norm(x):
        try:
            return int(x)
        except (TypeError, ValueError):
            return str(x)

    def key(x):
        return (0, x, "") if isinstance(x, int) else (1, 0, x)

    train, evald = (train[0], [norm(x) for x in train[1]]), (evald[0], [norm(x) for x in evald[1]])
    names = sorted(set(train[1]), key=key)
    ids = {name: i for i, name in enumerate(names)}
    unknown = set(evald[1]) - set(ids)
    if unknown:
        raise SystemExit(f"evaluation labels {sorted(unknown, key=key)} never occur in the training data")
    return (train[0], [ids[x] for x in train[1]]), (evald[0], [ids[x] for x in evald[1]]), len(names)


def load_data(args):
    if args.train_file:
        return read_local(args.train_file), read_local(args.eval_file or args.train_file)
    if args.dataset:
        import datasets  # only needed for --dataset

        if os.path.isdir(args.dataset) and any(os.path.exists(os.path.join(args.dataset, f))
                                               for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(args.dataset)  # written by save_to_disk
        else:  # a hub name (org/name) or a directory of data files
            ds = datasets.load_dataset(args.dataset, args.dataset_config)
        if not isinstance(ds, datasets.DatasetDict) or "train" not in ds:
            raise SystemExit(f"--dataset {args.dataset}: expected a dataset with a 'train' split")
        text_key = "sentence" if "sentence" in ds["train"].column_names else "text"
        split = next((s for s in ("validation", "test") if s in ds), "train")
        return ((ds["train"][text_key][: args.train_size], ds["train"]["label"][: args.train_size]),
                (ds[split][text_key][: args.eval_size], ds[split]["label"][: args.eval_size]))
    return generated_task(args.train_size, args.seed), generated_task(args.eval_size, args.seed + 1)


def build_model(args, num_labels: int):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

    if args.model:
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=num_labels)
        if tok.pad_token is None:  # GPT-2, Llama: no pad token; batches pad with the end-of-text token
            tok.pad_token = tok.eos_token
        if model.config.pad_token_id is None:  # decoders' classification heads find the last real token by it
            model.config.pad_token_id = tok.pad_token_id

        def tokenize(texts):
            return dict(tok(list(texts), padding=True, truncation=True, max_length=args.max_len, return_tensors="pt"))

        return model, tokenize
    torch.manual_seed(args.seed)
    cfg = BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg), HashTokenizer(64, args.max_len)


def batches(texts, labels, tokenize, batch_size, shuffle_seed=None, device="cpu"):
    order = list(range(len(texts)))
    if shuffle_seed is not None:
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    for i in range(0, len(order), batch_size):
        idx = order[i: i + batch_size]
        enc = tokenize([texts[j] for j in idx])
        enc["labels"] = torch.tensor([labels[j] for j in idx])
        yield {k: v.to(device) for k, v in enc.items()}


@torch.no_grad()
def accuracy(model, data, tokenize, batch_size, device):
    model.eval()
    right = total = 0
    for b in batches(*data, tokenize, batch_size, device=device):
        pred = model(**b).logits.argmax(-1)
        right += int((pred == b["labels"]).sum())
        total += len(pred)
    return right / max(total, 1)


def train_loop(model, train, tokenize, args, desc):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr_full if desc == "full" else args.lr)
    steps = args.epochs * ((len(train[0]) + args.batch_size - 1) // args.batch_size)
    bar = tqdm(total=steps, desc=desc, disable=args.quiet)
    for epoch in range(args.epochs):
        model.train()
        for b in batches(*train, tokenize, args.batch_size, shuffle_seed=args.seed + epoch, device=args.device):
            loss = model(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()


def train_trainer(model, train, tokenize, args, desc):
    from transformers import PrinterCallback, Trainer, TrainingArguments

    class Listed(torch.utils.data.Dataset):
        def __init__(self, texts, labels):
            self.texts, self.labels = texts, labels

        def __len__(self):
            return len(self.texts)

        def __getitem__(self, i):
            return self.texts[i], self.labels[i]

    def collate(rows):
        enc = tokenize([r[0] for r in rows])
        enc["labels"] = torch.tensor([r[1] for r in rows])
        return enc

    scratch = tempfile.mkdtemp(prefix=f"trainer-{desc}-")  # nothing is saved (save_strategy="no")
    targs = TrainingArguments(output_dir=scratch, num_train_epochs=args.epochs,
                              per_device_train_batch_size=args.batch_size,
                              learning_rate=args.lr_full if desc == "full" else args.lr, report_to=[],
                              save_strategy="no", logging_strategy="no", disable_tqdm=args.quiet,
                              use_cpu=args.device == "cpu", remove_unused_columns=False, seed=args.seed)
    trainer = Trainer(model=model, args=targs, train_dataset=Listed(*train), data_collator=collate)
    if args.quiet:  # the printer of the final metrics
        trainer.remove_callback(PrinterCallback)
    try:
        trainer.train()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def save_heatmap(report, path):
    """The gate probe as a heatmap PNG; False (and nothing written) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = report["layer_prefix"].numpy()
    fig, ax = plt.subplots(figsize=(1 + 0.4 * data.shape[1], 1 + 0.5 * data.shape[0]))
    im = ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xlabel("prefix token")
    ax.set_ylabel("layer")
    ax.set_title("APT gate (lambda * alpha), mean over tokens")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a hub model name or local directory (default: a small BERT from a config)")
    ap.add_argument("--dataset", help="a `datasets` hub name (e.g. nyu-mll/glue), a directory of data files or one "
                    "written by save_to_disk (needs the datasets package and the data)")
    ap.add_argument("--dataset-config", help="the dataset's configuration, e.g. sst2")
    ap.add_argument("--train-file", help="local CSV (text,label) or JSON-lines training file")
    ap.add_argument("--eval-file", help="local evaluation file (default: the training file)")
    ap.add_argument("--methods", default="apt,prefix,full")
    ap.add_argument("--prefix-len", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--train-size", type=int, default=1024)
    ap.add_argument("--eval-size", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=48)
    ap.add_argument("--lr", type=float, default=3e-2, help="learning rate of APT and prefix tuning")
    ap.add_argument("--lr-full", type=float, default=1e-3, help="learning rate of full fine-tuning")
    ap.add_argument("--trainer", action="store_true", help="train with transformers' Trainer instead of a plain loop")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=".", help="where gates.png goes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ("apt", "prefix", "full")]
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown or methods}; choose from apt, prefix, full")
    if args.trainer and importlib.util.find_spec("accelerate") is None:
        raise SystemExit("--trainer needs transformers' Trainer, which needs accelerate: pip install accelerate")
    os.makedirs(args.out, exist_ok=True)

    train, evald, num_labels = label_ids(*load_data(args))
    base, tokenize = build_model(args, num_labels)
    base.to(args.device)
    print(f"data: {len(train[0])} train / {len(evald[0])} eval examples, {num_labels} labels")
    results = {}
    for method in methods:
        model = copy.deepcopy(base)
        if method == "apt":
            apply_apt(model, args.prefix_len, backend=args.backend)
        elif method == "prefix":
            apply_prefix_tuning(model, args.prefix_len, backend=args.backend)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_adapter = sum(p.numel() for p in model.apt_adapter.parameters()) if method != "full" else n_train
        t0 = time.perf_counter()
        (train_trainer if args.trainer else train_loop)(model, train, tokenize, args, method)
        acc = accuracy(model, evald, tokenize, args.batch_size, args.device)
        results[method] = (n_train, n_adapter, acc, time.perf_counter() - t0)
        if method == "apt":
            b = next(batches(*evald, tokenize, args.batch_size, device=args.device))
            report = gate_report(model, {k: v for k, v in b.items() if k != "labels"})
            png = os.path.join(args.out, "gates.png")
            where = f"heatmap: {png}" if save_heatmap(report, png) else "no heatmap: pip install matplotlib"
            print("APT gate per layer:", [round(float(x), 3) for x in report["layer"]], f"({where})")
    print(f"\n{'method':8s} {'trainable':>10s} {'adapter':>9s} {'accuracy':>9s} {'time':>7s}")
    for method, (n_train, n_adapter, acc, secs) in results.items():
        print(f"{method:8s} {n_train:10d} {n_adapter:9d} {acc:9.3f} {secs:6.1f}s")
    if not (args.model or args.dataset or args.train_file):
        print("note: the embedded default's backbone is randomly initialised and frozen for APT and prefix tuning,\n"
              "so they have little to adapt; give --model a pretrained checkpoint for a real comparison.")
    if "apt" in results and "prefix" in results:
        print(f"APT adapter / prefix-tuning adapter parameters: {results['apt'][1] / results['prefix'][1]:.2f}x")
    return results


if __name__ == "__main__":
    main()
