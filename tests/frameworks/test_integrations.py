"""manic.integrations through the frameworks' own code paths: what the HF Trainer's log history,
its reporters (a report_to-like callback, TensorBoard, the console) and Lightning's CSVLogger
actually received, against the scale and lrs recorded at each step; find_mechanic inside
accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer and Trainer, an HF Trainer, a
DeepSpeed engine (ZeRO-0 and ZeRO-2, one rank), whose monitor gets the documented line; and that
importing manic imports no framework. See integrations_runs.py for the runs.

At each logged step t: ``mechanic/scale`` is the scale after step t, and ``mechanic/effective_lr``
(``/<i>`` per group) is that scale times the lr step t used (the Trainer's ``learning_rate``).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import types

import pytest
import torch

import integrations_runs as R
import manic
from manic.integrations import find_mechanic, readout

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

MECHANIC_KEYS = {"mechanic/scale", "mechanic/effective_lr", "mechanic/effective_lr/0", "mechanic/effective_lr/1"}


def _check_logged(name: str, logged: dict, truth: dict) -> None:
    """One logged line against the values recorded at its step."""
    at = truth[logged["step"]]
    assert logged["mechanic/scale"] == at["scale"], f"{name} at step {logged['step']}: {logged} vs {at}"
    for i, lr in enumerate(at["lrs"]):
        assert logged[f"mechanic/effective_lr/{i}"] == pytest.approx(at["scale"] * lr, rel=1e-6), (name, logged, at)
    assert logged["mechanic/effective_lr"] == logged["mechanic/effective_lr/0"]
    if "learning_rate" in logged:  # the Trainer's own lr: the lr of the same step
        assert logged["mechanic/effective_lr"] == pytest.approx(logged["mechanic/scale"] * logged["learning_rate"],
                                                                rel=1e-6), (name, logged)


def _check_trainer_run(name: str, r: dict) -> None:
    history, truth = r["log_history"], r["truth"]
    train_logs = [h for h in history if "loss" in h]
    assert [h["step"] for h in train_logs] == list(range(R.HF_LOG_EVERY, R.HF_STEPS + 1, R.HF_LOG_EVERY))
    assert [h["step"] for h in history if "eval_loss" in h] == [R.HF_EVAL_EVERY, R.HF_STEPS]
    assert "train_runtime" in history[-1]
    # every log: training, evaluation, the closing summary
    for h in history:
        assert MECHANIC_KEYS <= set(h), f"{name}: the log history's entry {h} lacks the mechanic values"
        _check_logged(f"{name} log history", h, truth)
    scales = [h["mechanic/scale"] for h in train_logs]
    assert len(set(scales)) == len(scales) and scales[-1] > 10 * R.S_INIT, f"{name}: vacuous, scales {scales}"
    # a callback where report_to= integrations sit received every log with the values
    assert [g["step"] for g in r["reporter"]] == [h["step"] for h in history]
    for g, h in zip(r["reporter"], history):
        assert {k: g[k] for k in MECHANIC_KEYS} == {k: h[k] for k in MECHANIC_KEYS}
    # the console (PrinterCallback, "%.4g")
    printed = [line for line in r["console"].splitlines() if "'mechanic/scale'" in line]
    assert len(printed) == len(history), r["console"]
    assert f"'mechanic/scale': '{train_logs[0]['mechanic/scale']:.4g}'" in printed[0]
    # the reporter ran before every other callback until MechanicCallback moved itself to the front
    assert r["callbacks_before"][0] == "Reporter" and r["callbacks_after"][0] == "MechanicCallback", (
        r["callbacks_before"], r["callbacks_after"])
    assert r["found_in_trainer"] and r["wrapper"] == "AcceleratedOptimizer"


# ----------------------------------------------------------------------------- HF Trainer
@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    return R.hf(str(tmp_path_factory.mktemp("hf")))


@pytest.mark.timeout(120)
def test_trainer_logs_hold_the_scale_and_effective_lr(trainer_run):
    _check_trainer_run("single process", trainer_run)


@pytest.mark.timeout(120)
def test_trainer_tensorboard_receives_them(trainer_run):
    """The real TensorBoardCallback (report_to=["tensorboard"]), read back from its event files."""
    pytest.importorskip("tensorboard")
    scalars = trainer_run["tensorboard"]
    history = trainer_run["log_history"]
    for key in ("mechanic/scale", "mechanic/effective_lr"):
        got = dict(scalars[f"train/{key}"])  # TensorBoard's train/ prefix; float32 values
        want = {h["step"]: h[key] for h in history}
        assert got.keys() == want.keys() and all(got[s] == pytest.approx(v, rel=1e-6) for s, v in want.items()), (
            key, got, want)


@pytest.mark.timeout(150)
def test_trainer_ddp_two_ranks(tmp_path):
    """2 ranks under torchrun (gloo), the callback added with trainer.add_callback: rank 0's logs and
    reporters hold the values; rank 1 reads nothing (it logs nowhere: no extra sync, no collective)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", R.__file__,
           str(tmp_path)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=140)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["truth"] == ranks[1]["truth"], "the scale differs across ranks"
    _check_trainer_run("DDP rank 0", ranks[0])
    assert ranks[0]["callbacks_before"][-1] == "MechanicCallback"  # added last, moved to the front
    assert not any(k.startswith("mechanic/") for h in ranks[1]["log_history"] for k in h)
    assert ranks[1]["reporter"] == [] and "mechanic" not in ranks[1]["console"]


# ----------------------------------------------------------------------------- Lightning
@pytest.mark.timeout(120)
def test_lightning_csv_logger_holds_both_columns(tmp_path):
    r = R.lightning(str(tmp_path))
    with open(r["csv"]) as f:
        rows = [row for row in csv.DictReader(f) if row.get("mechanic/scale")]
    steps = [int(row["step"]) for row in rows]
    # log_every_n_steps: Lightning's steps 3, 7, 11 are its 4th, 8th and 12th optimizer steps
    assert steps == list(range(R.LIGHTNING_LOG_EVERY - 1, R.LIGHTNING_STEPS, R.LIGHTNING_LOG_EVERY)), steps
    for row in rows:
        logged = {k: float(v) for k, v in row.items() if k.startswith("mechanic/") and v}
        assert MECHANIC_KEYS <= set(logged), row
        _check_logged("Lightning CSV", {**logged, "step": int(row["step"])}, r["truth"])
    scales = [float(row["mechanic/scale"]) for row in rows]
    assert len(set(scales)) == len(scales) and scales[-1] > 10 * R.S_INIT, scales
    # find_mechanic sees through the LightningOptimizer, which passes for a Mechanized itself
    assert r["seen"] == {"wrapper": "LightningMechanized", "wrapper_passes_for_it": True, "found": True}
    assert r["found_in_trainer"] and r["found_in_module"]


# ----------------------------------------------------------------------------- accelerate
@pytest.mark.timeout(120)
def test_find_mechanic_in_accelerated_optimizer():
    import harness

    ranks = harness.run(2, R.accelerate_rank, timeout=110)
    for rank, r in enumerate(ranks):
        assert r["wrapper"] == "accelerate.optimizer.AcceleratedOptimizer", r
        assert r["found"] and r["found_in_accelerator"], (rank, r)
        assert r["readout"] == {"mechanic/scale": r["scale"], "mechanic/effective_lr": r["effective_lr"][0]}
    assert ranks[0]["scale"] == ranks[1]["scale"] > R.S_INIT


# ----------------------------------------------------------------------------- DeepSpeed
@pytest.mark.timeout(420)  # (DeepSpeed may JIT-build its shm op first)
def test_deepspeed_engine_and_monitor_line(tmp_path):
    """find_mechanic in a real DeepSpeed engine (ZeRO-0: the client optimizer itself; ZeRO-2: a ZeRO
    wrapper holding it), and docs/observability.md's write_events line, read back from csv_monitor."""
    import harness

    (r,) = harness.run(1, R.deepspeed_rank, str(tmp_path), timeout=400)
    for stage, wrapper in (("zero0", "Mechanized"), ("zero2", "DeepSpeedZeroOptimizer")):
        assert r[stage]["wrapper"] == wrapper and r[stage]["found"], (stage, r[stage])
        truth = r[stage]["truth"]
        assert len(truth) == R.DEEPSPEED_STEPS // R.DEEPSPEED_LOG_EVERY
        written = {}
        for key in ("scale", "effective_lr"):
            with open(tmp_path / stage / f"Train_Samples_mechanic_{key}.csv") as f:
                written[key] = {int(row["step"]): float(row[key]) for row in csv.DictReader(f)}
        assert written["scale"] == {x: at["scale"] for x, at in truth.items()}, (written, truth)
        assert written["effective_lr"].keys() == truth.keys() and all(
            written["effective_lr"][x] == pytest.approx(at["scale"] * at["lr"], rel=1e-6) for x, at in truth.items())
    scales = [at["scale"] for at in r["zero2"]["truth"].values()]
    assert scales[-1] > 2 * R.S_INIT


# ----------------------------------------------------------------------------- without a framework
def _stepped(form: str) -> tuple[object, list[torch.Tensor]]:
    a, b, c = (torch.ones(3, requires_grad=True) for _ in range(3))
    base = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.02},
                            {"params": [c], "lr": 0.5, "mechanic": False}], lr=0.1, momentum=0.9)
    if form == "dropin":
        opt = manic.mechanize(base)
        step = opt.step
    else:
        updater = manic.Updater(base)
        opt = manic.Mechanic(updater)
        step = lambda: (opt.step(), updater.step())  # noqa: E731
    for t in range(4):
        for p in (a, b, c):
            p.grad = torch.full((3,), 1.0 + t)
        step()
    return opt, [a, b, c]


@pytest.mark.parametrize("form", ["dropin", "seed"])
def test_readout_is_floats_per_group(form):
    opt, _ = _stepped(form)
    values = readout(opt)
    S = float(opt.scale)
    assert values == {"mechanic/scale": S, "mechanic/effective_lr": float(opt.effective_lr[0]),
                      **{f"mechanic/effective_lr/{i}": float(e) for i, e in enumerate(opt.effective_lr)}}
    assert all(type(v) is float for v in values.values())
    assert values["mechanic/effective_lr/1"] == pytest.approx(S * 0.02, rel=1e-6)
    assert values["mechanic/effective_lr/2"] == 0.5  # "mechanic": False: its own lr


def test_readout_with_one_group_has_no_per_group_keys():
    p = torch.ones(2, requires_grad=True)
    opt = manic.mechanize(torch.optim.AdamW([p], lr=1e-3))
    assert set(readout(opt)) == {"mechanic/scale", "mechanic/effective_lr"}


def test_find_mechanic_walks_wrappers_and_says_when_there_is_none():
    opt, params = _stepped("dropin")
    # shaped like DeepSpeed's engine (the real one: test_deepspeed_engine_and_monitor_line)
    engine = types.SimpleNamespace(optimizer=types.SimpleNamespace(optimizer=opt), module=torch.nn.Linear(1, 1))
    assert find_mechanic(engine) is opt
    assert find_mechanic(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)) is opt
    assert find_mechanic([torch.optim.SGD(params[:1], lr=1), opt]) is opt
    seed, _ = _stepped("seed")
    assert find_mechanic(seed) is seed
    with pytest.raises(TypeError, match=r"no Mechanic optimizer .* in AdamW"):
        find_mechanic(torch.optim.AdamW(params, lr=1e-3))
    with pytest.raises(TypeError, match="pass the manic.Mechanic built on this Updater"):
        find_mechanic(seed.updater)
    with pytest.raises(TypeError, match="no Mechanic optimizer"):
        readout(types.SimpleNamespace(optimizer=None))


@pytest.mark.timeout(60)
def test_import_manic_pulls_in_no_framework():
    code = ("import sys, manic, manic.integrations; "
            "print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning', 'accelerate', 'deepspeed') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_callbacks_refuse_an_optimizer_that_is_not_mechanic():
    from manic.integrations.lightning import MechanicMonitor
    from manic.integrations.transformers import MechanicCallback

    plain = torch.optim.AdamW([torch.ones(2, requires_grad=True)], lr=1e-3)
    # called by hand, outside a Trainer's CallbackHandler: it says it cannot move to the front
    with pytest.warns(RuntimeWarning, match="callback list"), pytest.raises(TypeError, match="no Mechanic optimizer"):
        MechanicCallback().on_train_begin(None, None, None, optimizer=plain)
    with pytest.raises(TypeError, match="no Mechanic optimizer"):
        MechanicMonitor().on_train_start(types.SimpleNamespace(optimizers=[plain]), None)
