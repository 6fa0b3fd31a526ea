"""The generalisation suite's tasks (issue 26): small, deterministic, no download.

Every task is a ``SuiteTask``: ``make_model(seed)``, ``batch(step, seed)`` (a train batch),
``loss(model, batch)`` (cross-entropy, or MSE for regression) and ``evaluate(model) -> (val loss,
val metric)`` (accuracy for classifiers and language models, R^2 for regression), all deterministic
given the seed. ``HALVES`` is the one place that says which task belongs to which half: manic's
defaults may be tuned on the DEVELOPMENT half only; the TEST half is for checking them.

Data: scikit-learn's bundled datasets (``load_*``, never ``fetch_*``), the Python standard library's
source (launch/data.py's CharData) and English prose from ``pydoc_data.topics`` (the documentation
text that ships with Python, ~465 KB).

``reparam(task, c)`` is any task with every parameter stored as ``W / c`` (the model runs with
``c * param``, through torch.nn.utils.parametrize): the same function of the same initial weights,
but an optimizer that is not invariant to the parameters' units sees them ``c`` times smaller.

    python benchmarks/suite_tasks.py      (times one training step of every task, 1 thread)
"""

from __future__ import annotations

import copy
import functools
import math
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import CharData  # type: ignore[import-not-found]  # noqa: E402
from model import GPT, GPTConfig  # type: ignore[import-not-found]  # noqa: E402

CACHE = ROOT / "runs" / "suite_cache"  # pretrained models of finetune_prose (git ignores /runs/)
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class SuiteTask:
    name: str
    make_model: Callable[[int], nn.Module]
    batch: Callable[[int, int], Batch]  # (step, seed) -> train batch
    evaluate: Callable[[nn.Module], tuple[float, float]]  # -> (val loss, val metric)
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    metric: str = "accuracy"
    lr_hint: float = 3e-3  # where AdamW's adaptive sweep starts (its result does not depend on it)
    about: str = ""


def cross_entropy(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).flatten(0, -2), y.flatten())


def mse(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x).squeeze(-1), y)


def _gen(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + salt) % (2**63))


# ---------------------------------------------------------------- tabular and image data

@functools.lru_cache(maxsize=None)
def _tabular(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X_train, y_train, X_val, y_val): a fixed 80/20 split, features standardised with the train
    statistics (and, for regression, the target too)."""
    import sklearn.datasets as ds

    X, y = getattr(ds, f"load_{name}")(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32)
    regression = name == "diabetes"
    y = torch.tensor(y, dtype=torch.float32 if regression else torch.long)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    n = int(0.8 * len(X))
    tr, va = perm[:n], perm[n:]
    mu, sd = X[tr].mean(0), X[tr].std(0).clamp_min(1e-6)
    X = (X - mu) / sd
    if regression:
        y = (y - y[tr].mean()) / y[tr].std()
    return X[tr], y[tr], X[va], y[va]


def _mlp(sizes: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def tabular_task(name: str, data: str, hidden: list[int], batch_size: int = 32, lr_hint: float = 3e-3) -> SuiteTask:
    Xtr, ytr, Xva, yva = _tabular(data)
    regression = data == "diabetes"
    n_out = 1 if regression else int(ytr.max()) + 1

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return _mlp([Xtr.shape[1], *hidden, n_out])

    def batch(step: int, seed: int) -> Batch:
        idx = torch.randint(len(Xtr), (batch_size,), generator=_gen(seed, step))
        return Xtr[idx], ytr[idx]

    @torch.no_grad()
    def evaluate(model: nn.Module) -> tuple[float, float]:
        out = model(Xva)
        if regression:
            loss = F.mse_loss(out.squeeze(-1), yva).item()
            return loss, 1 - loss / yva.var(unbiased=False).item()  # R^2
        return F.cross_entropy(out, yva).item(), (out.argmax(1) == yva).float().mean().item()

    return SuiteTask(name, make_model, batch, evaluate, mse if regression else cross_entropy,
                     "R^2" if regression else "accuracy", lr_hint, ABOUT.get(name, ""))


def digits_mlp() -> SuiteTask:
    """benchmarks/lr_sweep.py's digits task (MLP 64-128-10, batch 64), the one manic was tuned on."""
    import lr_sweep

    t = lr_sweep.digits_task(0)
    return SuiteTask("digits_mlp", t.make_model, t.batch, t.evaluate, cross_entropy, "accuracy", 1e-2,
                     ABOUT["digits_mlp"])


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c1(x.view(-1, 1, 8, 8)))
        x = F.avg_pool2d(F.relu(self.c2(x)), 2)
        return self.fc(x.flatten(1))


def digits_cnn() -> SuiteTask:
    t = digits_mlp()

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return _CNN()

    return SuiteTask("digits_cnn", make_model, t.batch, t.evaluate, cross_entropy, "accuracy", 3e-3,
                     ABOUT["digits_cnn"])


# ---------------------------------------------------------------- text

@functools.lru_cache(maxsize=None)
def prose_text() -> str:
    """English prose: pydoc_data's topics (Python's documentation text), in sorted key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@functools.lru_cache(maxsize=None)
def prose_bytes() -> tuple[torch.Tensor, torch.Tensor]:
    """The prose as bytes (vocabulary 256, as CharData), split 90/10 into train / val."""
    data = torch.frombuffer(bytearray(prose_text().encode()), dtype=torch.uint8)
    split = int(0.9 * len(data))
    return data[:split].clone(), data[split:].clone()


@functools.lru_cache(maxsize=None)
def stdlib_source() -> CharData:
    return CharData.load(max_bytes=1_000_000)


@functools.lru_cache(maxsize=None)
def prose_words(vocab: int = 2000) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The prose as lower-cased words and punctuation marks; the ``vocab`` most frequent are kept,
    every other becomes <unk> (id ``vocab``). Split 90/10."""
    toks = re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]", prose_text().lower())
    keep = [w for w, _ in Counter(toks).most_common(vocab)]
    ids = {w: i for i, w in enumerate(keep)}
    data = torch.tensor([ids.get(w, vocab) for w in toks], dtype=torch.long)
    split = int(0.9 * len(data))
    return data[:split], data[split:], vocab + 1


def _windows(data: torch.Tensor, batch_size: int, block: int, g: torch.Generator) -> Batch:
    starts = torch.randint(len(data) - block - 1, (batch_size,), generator=g)
    idx = starts[:, None] + torch.arange(block + 1)
    w = data[idx].long()
    return w[:, :-1], w[:, 1:]


def lm_task(name: str, train: torch.Tensor, val: torch.Tensor, cfg: GPTConfig, batch_size: int,
            make_model: Callable[[int], nn.Module] | None = None, lr_hint: float = 3e-3, about: str = "",
            val_batches: int = 8) -> SuiteTask:
    def fresh(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return GPT(cfg)

    def batch(step: int, seed: int) -> Batch:
        return _windows(train, batch_size, cfg.block_size, _gen(seed, step))

    held = [_windows(val, batch_size, cfg.block_size, _gen(10**6, i)) for i in range(val_batches)]

    @torch.no_grad()
    def evaluate(model: nn.Module) -> tuple[float, float]:
        losses, hits = [], []
        for x, y in held:
            logits = model(x).flatten(0, 1)
            losses.append(F.cross_entropy(logits, y.flatten()).item())
            hits.append((logits.argmax(1) == y.flatten()).float().mean().item())
        return sum(losses) / len(losses), sum(hits) / len(hits)  # accuracy: next token, top-1

    return SuiteTask(name, make_model or fresh, batch, evaluate, cross_entropy, "accuracy", lr_hint, about)


CODE_CFG, CODE_BATCH = GPTConfig(vocab_size=256, n_layer=1, n_head=4, n_embd=32, block_size=32), 16
PROSE_CFG, PROSE_BATCH = GPTConfig(vocab_size=256, n_layer=2, n_head=4, n_embd=48, block_size=32), 8
WORD_VOCAB = 2000
WORD_CFG, WORD_BATCH = GPTConfig(vocab_size=WORD_VOCAB + 1, n_layer=1, n_head=4, n_embd=32, block_size=16), 8
PRETRAIN_STEPS, PRETRAIN_LR = 600, 3e-3


def _desc(cfg: GPTConfig, batch_size: int) -> str:
    return (f"GPT {cfg.n_layer} layer(s), width {cfg.n_embd}, {cfg.n_head} heads, context {cfg.block_size}, "
            f"batch {batch_size}, vocabulary {cfg.vocab_size}")


def charlm_code() -> SuiteTask:
    """run_length.py's charlm: launch/'s GPT on the stdlib source (1 layer, width 32, context 32, batch 16)."""
    data = stdlib_source()
    return lm_task("charlm_code", data.train, data.val, CODE_CFG, CODE_BATCH, lr_hint=1e-2, about=ABOUT["charlm_code"])


def charlm_prose() -> SuiteTask:
    """Byte-level GPT on English prose: close in kind to the held-out task (2 layers, width 96), sized to
    the budget."""
    train, val = prose_bytes()
    return lm_task("charlm_prose", train, val, PROSE_CFG, PROSE_BATCH, lr_hint=3e-3, about=ABOUT["charlm_prose"])


def wordlm_prose() -> SuiteTask:
    train, val, vocab = prose_words(WORD_VOCAB)
    assert vocab == WORD_CFG.vocab_size
    return lm_task("wordlm_prose", train, val, WORD_CFG, WORD_BATCH, lr_hint=3e-3, about=ABOUT["wordlm_prose"])


def pretrained(seed: int) -> nn.Module:
    """PROSE_CFG's GPT pretrained on the stdlib source: PRETRAIN_STEPS of AdamW (lr PRETRAIN_LR,
    weight decay 0.01, warmup 10% + cosine, batch PROSE_BATCH). Cached per seed in memory and under CACHE."""
    return copy.deepcopy(_pretrained(seed))


@functools.lru_cache(maxsize=None)
def _pretrained(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = GPT(PROSE_CFG)
    c = PROSE_CFG  # every setting of the pretraining is in the name: a changed setting never reads a stale model
    path = CACHE / (f"finetune_pretrain_L{c.n_layer}_d{c.n_embd}_h{c.n_head}_ctx{c.block_size}_b{PROSE_BATCH}_"
                    f"T{PRETRAIN_STEPS}_lr{PRETRAIN_LR:g}_seed{seed}.pt")
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model
    data = stdlib_source()
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: warmup_cosine(t, PRETRAIN_STEPS))
    for step in range(PRETRAIN_STEPS):
        loss = cross_entropy(model, _windows(data.train, PROSE_BATCH, PROSE_CFG.block_size, _gen(seed + 7919, step)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{id(model)}")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model


def finetune_prose() -> SuiteTask:
    train, val = prose_bytes()
    return lm_task("finetune_prose", train, val, PROSE_CFG, PROSE_BATCH, make_model=pretrained, lr_hint=1e-3,
                   about=ABOUT["finetune_prose"])


# ---------------------------------------------------------------- reparametrisation

class _Times(nn.Module):
    """The parametrisation W = c * param, stored as param = W / c."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return p * self.c

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w / self.c


def reparametrize(model: nn.Module, c: float) -> nn.Module:
    """Store every parameter of ``model`` as ``W / c``; the model computes with ``c * param``."""
    for module in list(model.modules()):
        for name, _ in list(module.named_parameters(recurse=False)):
            parametrize.register_parametrization(module, name, _Times(c), unsafe=False)
    return model


def reparam(task: SuiteTask, c: float) -> SuiteTask:
    def make_model(seed: int) -> nn.Module:
        return reparametrize(task.make_model(seed), c)

    name = f"{task.name}_c{c:g}"
    return replace(task, name=name, make_model=make_model, lr_hint=task.lr_hint / c, about=ABOUT.get(
        name, f"{task.name} with every weight stored as W/{c:g} (the model runs with {c:g} * param)"))


def warmup_cosine(t: int, steps: int, warmup: float = 0.1) -> float:
    """The schedule's factor at step ``t`` (0-based) of ``steps``: linear warmup over ``warmup * steps``
    steps, then cosine to 0."""
    w = max(1, round(warmup * steps))
    if t < w:
        return (t + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (t - w) / max(1, steps - w)))


# ---------------------------------------------------------------- the suite

ABOUT = {  # what each task is, without loading its data
    "digits_mlp": "lr_sweep.py's digits MLP 64-128-10, batch 64 (a tuning task of manic's defaults)",
    "charlm_code": "run_length.py's charlm on the stdlib source (a tuning task of manic's defaults): "
                   + _desc(CODE_CFG, CODE_BATCH),
    "diabetes_reg": "MLP 10-64-64-1 regression on sklearn load_diabetes (features and target standardised), MSE, "
                    "metric R^2, batch 32",
    "digits_cnn": "CNN on the 8x8 digits as 1x8x8 images: conv3x3(8)-relu-conv3x3(16)-relu-avgpool2-linear, batch 64",
    "digits_mlp_c10": "digits_mlp with every weight stored as W/10 (the model runs with 10 * param)",
    "charlm_prose": "byte-level GPT on pydoc_data prose: " + _desc(PROSE_CFG, PROSE_BATCH),
    "wordlm_prose": f"word-level GPT on pydoc_data prose (the {WORD_VOCAB} most frequent lower-cased words and marks, "
                    "others <unk>): " + _desc(WORD_CFG, WORD_BATCH),
    "finetune_prose": f"charlm_prose's model pretrained {PRETRAIN_STEPS} steps on the stdlib source (AdamW lr "
                      f"{PRETRAIN_LR:g}, wd 0.01, warmup + cosine; cached per seed), then fine-tuned on the prose",
    "breast_cancer_mlp": "MLP 30-64-2 classification on sklearn load_breast_cancer (standardised), batch 32",
    "charlm_prose_c0.1": "charlm_prose with every weight stored as W/0.1 (the model runs with 0.1 * param)",
}
TASKS: dict[str, Callable[[], SuiteTask]] = {
    "digits_mlp": digits_mlp,
    "charlm_code": charlm_code,
    "diabetes_reg": lambda: tabular_task("diabetes_reg", "diabetes", [64, 64], lr_hint=3e-3),
    "digits_cnn": digits_cnn,
    "digits_mlp_c10": lambda: reparam(digits_mlp(), 10.0),
    "charlm_prose": charlm_prose,
    "wordlm_prose": wordlm_prose,
    "finetune_prose": finetune_prose,
    "breast_cancer_mlp": lambda: tabular_task("breast_cancer_mlp", "breast_cancer", [64], lr_hint=1e-3),
    "charlm_prose_c0.1": lambda: reparam(charlm_prose(), 0.1),
}
HALVES: dict[str, list[str]] = {
    "dev": ["digits_mlp", "charlm_code", "diabetes_reg", "digits_cnn", "digits_mlp_c10"],
    "test": ["charlm_prose", "wordlm_prose", "finetune_prose", "breast_cancer_mlp", "charlm_prose_c0.1"],
}
HALF = {name: half for half, names in HALVES.items() for name in names}
assert set(HALF) == set(TASKS) == set(ABOUT), "every task is in exactly one half"


@functools.lru_cache(maxsize=None)
def get(name: str) -> SuiteTask:
    return TASKS[name]()


def time_step(name: str, blocks: int = 6, per: int = 15) -> float:
    """Milliseconds of CPU time per AdamW training step (1 thread), batch building included: the
    fastest of ``blocks`` blocks of ``per`` steps after one warm-up block (CPU time, not wall time, so
    that other processes on the machine inflate it less)."""
    task = get(name)
    model = task.make_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    best, step = math.inf, 0
    for b in range(blocks + 1):
        t0 = time.process_time()
        for _ in range(per):
            loss = task.loss(model, task.batch(step, 0))
            step += 1
            opt.zero_grad()
            loss.backward()
            opt.step()
        if b:
            best = min(best, (time.process_time() - t0) / per)
    return 1000 * best


if __name__ == "__main__":
    torch.set_num_threads(1)
    for half, names in HALVES.items():
        for name in names:
            t = get(name)
            n = sum(p.numel() for p in t.make_model(0).parameters())
            print(f"{half:4s} {name:20s} {time_step(name):6.2f} ms/step  {n:7d} params  val0 "
                  f"{t.evaluate(t.make_model(0))[0]:.3f}  {t.about}", flush=True)
