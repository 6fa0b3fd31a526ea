"""The checks of the GPU path, written once for any device: tests/test_cuda.py runs them on CUDA (what
benchmarks/gpu_check.py runs on a GPU machine), tests/test_gpu_check.py runs them on the CPU, so that the
code of a check no GPU has run yet is itself run on every CI pass.

Each function returns what it measured; the callers assert. Nothing here assumes CUDA: the device is a
parameter, and what only CUDA has (its runtime's synchronizing calls, the sync debug mode) is counted
only where it exists.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator

import numpy as np
import torch

import manic
import reference as ref
from helpers import BASES, init_params, rel_err
from manic import kernels
from manic.options import DEFAULTS
from test_reference import SCHEDULE, _gradient_source

# The base optimizers of the reference check: tests/helpers.py's, and AdamW with fused=True (the base a
# GPU user picks; fused=True runs on CUDA and, since torch 2.4, on CPU).
REFERENCE_BASES: dict[str, tuple[Callable, Callable, float]] = {
    **BASES,
    "adamw_fused": (lambda p, lr: torch.optim.AdamW(p, lr=lr, fused=True), lambda lr: ref.AdamW(lr), 1e-2),
}


@contextlib.contextmanager
def small(threshold: int) -> Iterator[None]:
    """kernels.SMALL set for the block: 0 sends every tensor, however small, to the compiled kernels."""
    old = kernels.SMALL
    kernels.SMALL = threshold
    try:
        yield
    finally:
        kernels.SMALL = old


@contextlib.contextmanager
def compiled_graphs() -> Iterator[list[int]]:
    """A fresh Dynamo for the block (its caches reset, as in a new process) that raises at its recompile limit
    instead of running a kernel uncompiled, which would hide whether Inductor (Triton, on CUDA) ran at all.
    Yields a list that holds, after the block, how many graphs Dynamo compiled in it."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    old = torch._dynamo.config.fail_on_recompile_limit_hit
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    before = counters["stats"]["unique_graphs"]
    graphs: list[int] = []
    try:
        yield graphs
    finally:
        torch._dynamo.config.fail_on_recompile_limit_hit = old
        graphs.append(counters["stats"]["unique_graphs"] - before)


def _flat(tensors: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([t.detach().double().reshape(-1).cpu().numpy() for t in tensors])


def reference_errors(device: str, base: str, regime: str, variant: str, store_delta: bool = True,
                     scheduled: bool = True, **options: Any) -> dict[str, float]:
    """test_reference._compare on ``device``: manic.mechanize (float64 parameters on the device) against the
    float64 NumPy reference of docs/algorithm.md on the same gradients. Returns the worst relative errors
    over the run of the scale and of x - x_0 and Delta (``x``), and the reference's final scale."""
    make_torch, make_ref, lr = REFERENCE_BASES[base]
    hyper = {"variant": variant, **DEFAULTS[variant]}
    params = [p.detach().to(device).requires_grad_(True) for p in init_params(0)]
    x0 = _flat(params)
    opt = manic.mechanize(make_torch(params, lr), store_delta=store_delta, **hyper, **options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, SCHEDULE) if scheduled else None
    mech = ref.Mechanic(x0, make_ref(lr), store_delta=store_delta, **hyper)
    steps, grad = _gradient_source(regime, x0.size, 0, variant)
    worst_scale = worst_x = 0.0
    for t in range(steps):
        g = grad(_flat(params), t)
        i = 0
        for p in params:
            p.grad = torch.tensor(g[i:i + p.numel()].reshape(p.shape), dtype=p.dtype, device=p.device)
            i += p.numel()
        mech_g = grad(mech.x, t)
        opt.step()
        if sched:
            sched.step()
        mech.step(mech_g, lr * (SCHEDULE(t) if scheduled else 1.0))
        worst_scale = max(worst_scale, abs(opt.scale.item() - mech.scale) / mech.scale)
        worst_x = max(worst_x, rel_err(_flat(params) - x0, mech.x - x0))
        if store_delta:  # the stored direction, free of the parameters' rounding
            worst_x = max(worst_x, rel_err(_flat([opt.state[p]["mechanic_delta"] for p in params]), mech.delta))
    assert all(p.device.type == torch.device(device).type for p in params)
    return {"scale": worst_scale, "x": worst_x, "final_scale": mech.scale}


# ----------------------------------------------------------------------------- 16-bit parameters
def train_mlp(device: str, dtype: torch.dtype, steps: int = 40, lr: float = 1e-3, low: float = 0.25,
              **options: Any) -> tuple[list[float], list[float]]:
    """test_precision._train on ``device``: an MLP whose weights have magnitude ``low``-1, full-batch AdamW
    under Mechanic; returns the scale and the loss after each step."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    with torch.no_grad():
        for p in model.parameters():
            mag = torch.empty(p.shape).uniform_(low, 1.0, generator=gen)
            p.copy_(mag * torch.randint(0, 2, p.shape, generator=gen).mul(2).sub(1))
    model = model.to(device=device, dtype=dtype)
    opt = manic.mechanize(torch.optim.AdamW(model.parameters(), lr=lr), **options)
    data = torch.Generator().manual_seed(1)
    X = torch.randn(128, 8, generator=data)
    y = (X[:, :1] - 0.5 * X[:, 1:2]).sin()
    X, y = X.to(device=device, dtype=dtype), y.to(device)
    scales, losses = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X).float(), y)
        loss.backward()
        opt.step()
        scales.append(opt.scale.item())
        losses.append(loss.item())
    return scales, losses


ORIGINAL = {"variant": "original", "s_init": 1e-6, "weight_decay": 1e-2}  # optax's values


def bf16_no_stall(device: str, **options: Any) -> dict[str, list[float]]:
    """bf16 parameters, in the original form at weights of 0.25-1, where the first displacements
    (~s_init * lr) are below half an ulp: state="ref" (the recompute form) stalls at s_init; the default
    "ref+delta" and the one-buffer "delta" keep the direction exactly and grow (test_one_buffer's
    test_learns_where_the_recompute_form_stalls). And the invariant form's default start learns
    (test_precision's test_default_mode_starts_learning). ``options``: e.g. compile=True, for every run."""
    out = {}
    for name, state in (("ref", "ref"), ("ref+delta", "ref+delta"), ("delta", "delta")):
        out[name] = train_mlp(device, torch.bfloat16, state=state, **ORIGINAL, **options)[0]
    out["invariant"], out["invariant_losses"] = train_mlp(device, torch.bfloat16, steps=40, low=0.02, **options)
    return out


# ----------------------------------------------------------------------------- host syncs
# What a step must not contain: a value read to the host (.item(), bool() of a tensor: _local_scalar_dense;
# nonzero's size) and, on CUDA, the runtime's synchronizing calls (a synchronous copy, a stream, event or
# device synchronize).
SYNC_EVENTS = frozenset({"aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize",
                         "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"})


def _profile(fn: Callable[[], Any], device: str) -> dict[str, int]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
    counts: dict[str, int] = {}
    for e in prof.key_averages():
        if e.key in SYNC_EVENTS:
            counts[e.key] = counts.get(e.key, 0) + e.count
    return counts


def profiled_syncs(fn: Callable[[], Any], device: str) -> dict[str, int]:
    """The host syncs ``fn`` makes, by name, counted by torch's profiler (CUDA's runtime calls too on CUDA),
    less the profiler's own: on CUDA it synchronizes the device before it stops recording."""
    counts, own = _profile(fn, device), _profile(lambda: None, device)
    return {k: n - own.get(k, 0) for k, n in counts.items() if n - own.get(k, 0)}


def sync_debug_warnings(fn: Callable[[], Any]) -> int:
    """CUDA only: the synchronizing operations torch's sync debug mode reports while ``fn`` runs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def _sync_params(device: str, gen: torch.Generator) -> list[torch.nn.Parameter]:
    # a matrix of 2**18 elements (above kernels.SMALL: compile=True compiles it) and a vector (eager)
    return [torch.nn.Parameter(torch.randn(512, 512, generator=gen).to(device)),
            torch.nn.Parameter(torch.randn(512, generator=gen).to(device))]


def step_syncs(device: str, compile: bool, steps: int = 6, state: str = "ref+delta") -> list[dict[str, Any]]:
    """Per step: the host syncs of a manic step over fused AdamW and of fused AdamW alone (the same
    parameters and gradients), by torch's profiler, and on CUDA also by its sync debug mode. The first two
    compile=True steps compile the kernels (reading sizes and values): callers look from the third on."""
    gen = torch.Generator().manual_seed(6)
    runs = []
    for wrap in (True, False):
        params = _sync_params(device, gen)
        base = torch.optim.AdamW(params, lr=1e-2, fused=True)
        runs.append((params, manic.mechanize(base, compile=compile, state=state) if wrap else base))
    cuda = torch.device(device).type == "cuda"
    out = []
    for _ in range(steps):
        row: dict[str, Any] = {}
        for name, (params, opt) in zip(("manic", "base"), runs):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(device)
            if cuda:
                torch.cuda.synchronize()
            row[name] = profiled_syncs(opt.step, device)
        if cuda:  # the same step once more, under the sync debug mode
            for name, (params, opt) in zip(("manic", "base"), runs):
                torch.cuda.synchronize()
                row[f"{name}_debug"] = sync_debug_warnings(opt.step)
        out.append(row)
    # the profiler sees a sync when there is one
    out.append({"item": profiled_syncs(lambda: runs[0][1].scale.item(), device)})
    return out


# ----------------------------------------------------------------------------- compile=True against eager
def compiled_kernels_errors(device: str, dtype: torch.dtype) -> dict[str, float]:
    """test_compile's test_compiled_kernels_split_small_and_large_tensors on ``device``: every function of the
    compiled kernels (tensors above and below kernels.SMALL, lengths on both sides of the sums' rows) against
    the eager ones on the same inputs. Returns the worst relative difference per function."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(kernels.SMALL,), (3, 4), (2, kernels.SMALL // 2 + 1), (7,), (3 * 4096 + 1,)]

    def make() -> list[torch.Tensor]:
        return [torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]

    gs, ds, xs, refs = make(), make(), make(), make()
    one = lambda v: torch.tensor(v, dtype=dtype, device=device)  # noqa: E731
    S_old, S_new, ok = one(0.5), one(0.7), torch.tensor(True, device=device)
    fused = kernels.compiled()
    dev = torch.device(device)
    out = {}
    args = (gs[:3], ds[:3], [False, True, False], xs, ds, dtype, dev)
    a, b = fused.partial_sums(*args), kernels.EAGER.partial_sums(*args)
    # each difference in units of its sum of |products| (the scale of a dot product's rounding)
    w = lambda t: t.detach().double().cpu().reshape(-1)  # noqa: E731
    scale = torch.stack([sum((w(g) * w(d)).abs().sum() for g, d in zip(gs[:3], ds[:3])),
                         sum((w(x) * w(d)).abs().sum() for x, d in zip(xs, ds)),
                         sum(w(g).square().sum() for g in gs[:3]), sum(w(x).square().sum() for x in xs)])
    out["partial_sums"] = ((a.double().cpu() - b.double().cpu()).abs() / scale).max().item()
    for name in kernels.Kernels._fields[1:]:  # every rebase
        extra = (1e-8,) if name == "rebase_recompute" else ()
        results = []
        for k in (kernels.EAGER, fused):
            x2, r2, d2 = [t.clone() for t in xs], [t.clone() for t in refs], [t.clone() for t in ds]
            getattr(k, name)(x2, r2, d2, S_old, S_new, ok, *extra)
            results.append(x2 + d2)
        out[name] = max(((p - q).norm() / q.norm()).item() for p, q in zip(*results))
    return out


def compiled_trajectory(device: str, steps: int = 10, dtype: torch.dtype = torch.float64,
                        state: str = "ref+delta") -> dict[str, Any]:
    """An MLP (a 64x128 weight: the sums' rows form) trained with SGD + momentum under manic, eager and
    compile=True (every tensor compiled: SMALL = 0), from the same start on the same batches. Returns both
    runs' scales and parameters (on the CPU)."""
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(64, 64, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    y = X[:, :1].cos()
    runs = {}
    with small(0):
        for compiled in (False, True):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1))
            model = model.to(device=device, dtype=dtype)
            groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.05}]
            opt = manic.mechanize(torch.optim.SGD(groups, lr=0.1, momentum=0.9), compile=compiled, state=state,
                                  weight_decay=0.1)
            scales = []
            for _ in range(steps):
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(X), y).backward()
                opt.step()
                scales.append(opt.scale.item())
            runs["compiled" if compiled else "eager"] = {
                "scales": scales, "params": [p.detach().cpu().clone() for p in model.parameters()]}
    return runs
