"""Bad input gets a clear exception at the earliest point, naming the argument or the problem;
after it the live state (parameters, scale, every state tensor, the tuner's statistics) is
untouched and the optimizer still steps (and, where it can be compared, bitwise as if the bad
call had never happened)."""

from __future__ import annotations

import copy

import pytest
import torch

import manic
from manic.state import FORMAT_VERSION

F64 = torch.float64


# --------------------------------------------------------------------------- helpers
def make_params(seed: int = 0, shapes=((4, 3), (3,)), dtype=F64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def grads_at(params, t: int) -> None:
    """A deterministic, non-trivial gradient sequence (a quadratic pulled towards a target)."""
    g = torch.Generator().manual_seed(100 + t)
    for p in params:
        target = torch.randn(p.shape, generator=g, dtype=p.dtype)
        p.grad = (p.detach() - target) + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)


class Run:
    """One mechanized run, in either form, with an LR scheduler."""

    def __init__(self, form="dropin", seed=0, shapes=((4, 3), (3,)), base="adamw", **hyper):
        self.form = form
        self.params = make_params(seed, shapes)
        if base == "adamw":
            self.base = torch.optim.AdamW(self.params, lr=2e-2)
        else:
            self.base = torch.optim.SGD(self.params, lr=0.1, momentum=0.9)
        if form == "dropin":
            self.opt = manic.mechanize(self.base, **hyper)
            self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=3, gamma=0.8)
            self.tuner = self.opt
        else:
            self.sched = torch.optim.lr_scheduler.StepLR(self.base, step_size=3, gamma=0.8)
            self.updater = manic.Updater(self.base, self.sched)
            self.mechanic = manic.Mechanic(self.updater, **hyper)
            self.tuner = self.mechanic
        self.t = 0

    def step(self, n=1):
        for _ in range(n):
            grads_at(self.params, self.t)
            if self.form == "dropin":
                self.opt.step()
                self.sched.step()
            else:
                self.mechanic.step()
                self.updater.step()
            self.t += 1
        return self

    @property
    def scale(self):
        return self.tuner.scale

    def state_dict(self):
        if self.form == "dropin":
            return self.opt.state_dict()
        return self.mechanic.state_dict()

    def load(self, sd):
        (self.opt if self.form == "dropin" else self.mechanic).load_state_dict(sd)

    def snapshot(self):
        """Everything a user can observe, deep-copied."""
        out = {"params": [p.detach().clone() for p in self.params],
               "grads": [None if p.grad is None else p.grad.to_dense().clone() for p in self.params],
               "scale": self.scale.clone(),
               # the tuner's state as stats() reports it (the last step's readouts h, grad_norm
               # and param_norm are checked separately)
               "stats": {k: self.tuner.stats()[k].clone() for k in ("scale", "step", "skipped_steps")},
               "sched": copy.deepcopy(self.sched.state_dict()),
               "groups": copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in self.base.param_groups]),
               "state": copy.deepcopy({i: dict(self.base.state[p]) for i, p in enumerate(self.params)})}
        if self.form == "dropin":
            out["opt_sd"] = copy.deepcopy(self.opt.state_dict())
        else:
            out["updater_sd"] = copy.deepcopy(self.updater.state_dict())
            out["mechanic_sd"] = copy.deepcopy(self.mechanic.state_dict())
        return out


def deep_equal(a, b, path="") -> str | None:
    """None if equal, else where they differ."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)):
            return path
        return None
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return f"{path} keys {sorted(map(str, a))} vs {sorted(map(str, b)) if isinstance(b, dict) else b!r}"
        for k in a:
            d = deep_equal(a[k], b[k], f"{path}/{k}")
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{path} length"
        for i, (x, y) in enumerate(zip(a, b)):
            d = deep_equal(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if (a == b or (a != a and b != b)) else f"{path}: {a!r} vs {b!r}"


def assert_untouched(before, run):
    diff = deep_equal(before, run.snapshot())
    assert diff is None, f"live state changed at {diff}"


def assert_same_run(a: Run, b: Run):
    assert torch.equal(a.scale, b.scale)
    assert all(torch.equal(p, q) for p, q in zip(a.params, b.params))


def sgd(params=None, **kw):
    return torch.optim.SGD(params if params is not None else make_params(), lr=0.1, **kw)


def seed_form(optimizer, **hyper):
    return manic.Mechanic(manic.Updater(optimizer), **hyper)


FORMS = {"mechanize": lambda opt, **h: manic.mechanize(opt, **h), "Mechanic": seed_form}


def assert_base_pristine(base):
    """A failed construction leaves no trace on the base optimizer, which can then be wrapped."""
    assert getattr(base, "_manic_engine", None) is None
    assert not any(k.startswith("mechanic_") for g in base.param_groups for k in g)
    assert not any(isinstance(k, str) and k.startswith("mechanic_") for st in base.state.values() for k in st)


# --------------------------------------------------------------------------- hyperparameters
BAD_HYPER = [
    ("eps", 0.0, ValueError, r"eps.*> 0"),
    ("eps", -1e-8, ValueError, r"eps.*> 0"),
    ("eps", float("nan"), ValueError, "eps"),
    ("s_init", 0.0, ValueError, r"s_init.*> 0"),
    ("s_init", -1e-6, ValueError, r"s_init.*> 0"),
    ("s_init", float("inf"), ValueError, "s_init"),
    ("num_betas", 0, ValueError, r"num_betas.*positive int"),
    ("num_betas", -1, ValueError, r"num_betas.*positive int"),
    ("num_betas", 2.5, ValueError, r"num_betas.*positive int"),
    ("num_betas", True, ValueError, r"num_betas.*positive int"),
    ("num_betas", "6", ValueError, r"num_betas.*positive int"),
    ("weight_decay", -0.1, ValueError, r"weight_decay.*>= 0"),
    ("weight_decay", float("nan"), ValueError, r"weight_decay.*finite"),
    ("weight_decay", float("inf"), ValueError, r"weight_decay.*finite"),
    ("weight_decay", float("-inf"), ValueError, r"weight_decay.*finite"),
    ("weight_decay", "0.01", TypeError, "weight_decay"),
    ("store_delta", 1, TypeError, "store_delta"),
    ("variant", "scale_free", ValueError, r"variant.*'invariant', 'original'"),
    ("variant", None, ValueError, "variant"),
    ("variant", 1, ValueError, "variant"),
]


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name,value,exc,pattern", BAD_HYPER,
                         ids=[f"{n}={v!r}" for n, v, _, _ in BAD_HYPER])
def test_bad_hyperparameter_rejected_at_construction(form, name, value, exc, pattern):
    base = sgd()
    with pytest.raises(exc, match=pattern):
        FORMS[form](base, **{name: value})
    assert_base_pristine(base)
    # the base can still be wrapped (with good values) and stepped
    wrapped = FORMS[form](base)
    for p in base.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    if form == "mechanize":
        wrapped.step()
    else:
        wrapped.step()
        wrapped.updater.step()


def test_bad_hyperparameter_message_names_the_value():
    with pytest.raises(ValueError, match=r"Invalid eps: -1\.0"):
        manic.mechanize(sgd(), eps=-1.0)


# --------------------------------------------------------------------------- what is wrapped
class NotAnOptimizer:
    param_groups = [{"params": []}]

    def step(self):
        pass


NOT_OPTIMIZERS = {
    "a model": lambda: torch.nn.Linear(3, 2),
    "a list of params": lambda: make_params(),
    "a generator of params": lambda: iter(make_params()),
    "a duck-typed object": lambda: NotAnOptimizer(),
    "None": lambda: None,
}


@pytest.mark.parametrize("what", list(NOT_OPTIMIZERS))
def test_mechanize_rejects_a_non_optimizer(what):
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        manic.mechanize(NOT_OPTIMIZERS[what]())


@pytest.mark.parametrize("what", list(NOT_OPTIMIZERS))
def test_updater_rejects_a_non_optimizer(what):
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        manic.Updater(NOT_OPTIMIZERS[what]())


@pytest.mark.parametrize("what", list(NOT_OPTIMIZERS) + ["an optimizer"])
def test_mechanic_rejects_anything_but_an_updater(what):
    obj = sgd() if what == "an optimizer" else NOT_OPTIMIZERS[what]()
    with pytest.raises(TypeError, match="Updater"):
        manic.Mechanic(obj)
    if what == "an optimizer":
        assert_base_pristine(obj)


def first_step(form, base):
    """Wrap ``base`` (construction takes it as it is) and take one step with gradients."""
    wrapped = FORMS[form](base)
    for g in base.param_groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p)
    before = [p.detach().clone() for g in base.param_groups for p in g["params"]]
    return wrapped, before


def assert_first_step_refused(form, base, error, match):
    """Mechanic binds at the first step: a layout it cannot work on raises there, before the
    base optimizer moves anything, and Mechanic has not started."""
    wrapped, before = first_step(form, base)
    with pytest.raises(error, match=match):
        wrapped.step()
    after = [p.detach() for g in base.param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(before, after) if a.device.type != "meta")
    assert not any(isinstance(k, str) and k.startswith("mechanic_") for st in base.state.values() for k in st)
    assert int(wrapped.stats()["step"]) == 0


@pytest.mark.parametrize("form", list(FORMS))
def test_no_parameters_under_mechanic(form):
    base = torch.optim.SGD([{"params": make_params(), "mechanic": False}], lr=0.1)
    assert_first_step_refused(form, base, ValueError, "no parameters under Mechanic.*'mechanic': False")


@pytest.mark.parametrize("form", list(FORMS))
def test_complex_parameters(form):
    c = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    base = torch.optim.SGD([{"params": make_params(dtype=torch.float32)}, {"params": [c]}], lr=0.1)
    assert_first_step_refused(form, base, TypeError, "Parameter 2 is complex")


def test_complex_parameters_in_an_opted_out_group_are_fine():
    c = torch.randn(3, dtype=torch.complex128, requires_grad=True)
    real = make_params()
    opt = manic.mechanize(torch.optim.SGD([{"params": real}, {"params": [c], "mechanic": False}], lr=0.1))
    c0 = c.detach().clone()
    for t in range(3):
        grads_at(real, t)
        c.grad = torch.ones_like(c)
        opt.step()
    torch.testing.assert_close(c.detach(), c0 - 0.3, rtol=0, atol=1e-12)  # plain SGD, untouched by Mechanic


def test_mechanize_a_mechanized_optimizer():
    run = Run()
    run.step(2)
    before = run.snapshot()
    with pytest.raises(TypeError, match="already under Mechanic"):
        manic.mechanize(run.opt)
    with pytest.raises(TypeError, match="already under Mechanic"):
        manic.Mechanic(manic.Updater(run.opt))
    assert_untouched(before, run)
    twin = Run().step(2)
    assert_same_run(run.step(3), twin.step(3))


@pytest.mark.parametrize("first,second", [("mechanize", "mechanize"), ("mechanize", "Mechanic"),
                                          ("Mechanic", "mechanize"), ("Mechanic", "Mechanic")])
def test_the_same_base_wrapped_twice(first, second):
    run = Run("dropin" if first == "mechanize" else "seed")
    run.step(2)
    before = run.snapshot()
    with pytest.raises(TypeError, match="already under Mechanic"):
        FORMS[second](run.base)
    assert_untouched(before, run)
    twin = Run("dropin" if first == "mechanize" else "seed").step(2)
    assert_same_run(run.step(3), twin.step(3))


def test_a_second_mechanic_on_the_same_updater():
    updater = manic.Updater(sgd())
    manic.Mechanic(updater)
    with pytest.raises(TypeError, match="already under Mechanic"):
        manic.Mechanic(updater)


@pytest.mark.parametrize("form", list(FORMS))
def test_lbfgs(form):
    base = torch.optim.LBFGS(make_params())
    with pytest.raises(TypeError, match="LBFGS"):
        FORMS[form](base)
    assert_base_pristine(base)


@pytest.mark.parametrize("form", list(FORMS))
def test_parameters_on_different_devices(form):
    # two devices are constructible on a CPU-only machine with the meta device
    params = [torch.randn(3, requires_grad=True), torch.empty(3, device="meta", requires_grad=True)]
    base = torch.optim.SGD(params, lr=0.1)
    assert_first_step_refused(form, base, ValueError, r"several devices.*cpu.*meta|several devices.*meta.*cpu")


# --------------------------------------------------------------------------- errors at step
@pytest.mark.parametrize("form", ["dropin", "seed"])
@pytest.mark.parametrize("at", [0, 3])
def test_sparse_gradient_raises_at_step_and_changes_nothing(form, at):
    run, twin = Run(form, base="sgd"), Run(form, base="sgd")
    run.step(at)
    twin.step(at)
    grads_at(run.params, run.t)
    run.params[0].grad = run.params[0].grad.to_sparse()
    before = run.snapshot()
    with pytest.raises(RuntimeError, match="sparse"):
        if form == "dropin":
            run.opt.step()
        else:
            run.mechanic.step()
    assert_untouched(before, run)
    # dense gradients: it steps on exactly as if the failed call had never happened
    assert_same_run(run.step(4), twin.step(4))


@pytest.mark.parametrize("store_delta", [True, False])
def test_a_failed_first_step_does_not_pin_the_reference_point(store_delta):
    """x_ref is the parameters at the first Mechanic step that happens (docs/algorithm.md: users load
    weights after building the optimizer). A first step rejected for a sparse gradient, after
    which the user loads other weights, must not leave x_ref at the old weights."""
    run, twin = Run(base="sgd", store_delta=store_delta), Run(base="sgd", store_delta=store_delta)
    grads_at(run.params, 0)
    run.params[0].grad = run.params[0].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        run.opt.step()
    pretrained = make_params(seed=42)
    for r in (run, twin):
        with torch.no_grad():
            for p, w in zip(r.params, pretrained):
                p.copy_(w)
    run.step(1)
    twin.step(1)
    for p, w in zip(run.params, pretrained):
        assert (p.detach() - w).abs().max().item() < 1e-3, "the parameters jumped back towards the old weights"
    assert_same_run(run.step(2), twin.step(2))


def test_base_step_failing_after_mechanics_step_changes_nothing():
    """The base optimizer rejects the step (Adam and a sparse gradient, in a group Mechanic does not
    manage, so Mechanic's own check passes): the error reaches the caller, and neither the
    parameters nor Mechanic's tuner have moved; the next good step continues the run exactly."""
    def build():
        torch.manual_seed(0)
        emb = torch.nn.Embedding(5, 3, sparse=True).double()
        dense = make_params()
        # the opted-out group first: Adam raises before it touches any parameter
        base = torch.optim.Adam([{"params": list(emb.parameters()), "mechanic": False}, {"params": dense}], lr=1e-2)
        return emb, dense, manic.mechanize(base)

    (emb, dense, opt), (_, dense2, opt2) = build(), build()
    for t in range(4):
        for ps, o in ((dense, opt), (dense2, opt2)):
            grads_at(ps, t)
            o.step()
    grads_at(dense, 4)
    emb(torch.tensor([1, 2])).sum().backward()  # a sparse gradient: Adam refuses it
    before_params, before_scale = [p.detach().clone() for p in dense], opt.scale.clone()
    before_sd = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before_params, dense))
    assert torch.equal(opt.scale, before_scale), "a failed step moved Mechanic's scale"
    assert deep_equal(before_sd, opt.state_dict()) is None
    emb.weight.grad = None
    for t in range(4, 7):
        for ps, o in ((dense, opt), (dense2, opt2)):
            grads_at(ps, t)
            o.step()
    assert torch.equal(opt.scale, opt2.scale)
    assert all(torch.equal(a, b) for a, b in zip(dense, dense2))


def seed_twins(steps: int) -> tuple[Run, Run]:
    """Two identical seed-form runs after ``steps`` steps; the first holds the next step's gradients."""
    run, twin = Run("seed"), Run("seed")
    run.step(steps)
    twin.step(steps)
    grads_at(run.params, run.t)
    return run, twin


def test_mechanic_step_twice():
    run, twin = seed_twins(3)
    run.mechanic.step()
    before = run.snapshot()
    with pytest.raises(RuntimeError, match=r"twice.*updater\.step"):
        run.mechanic.step()  # raised at the second call, not later
    assert_untouched(before, run)
    run.updater.step()  # the pair completes
    run.t += 1
    assert_same_run(run.step(3), twin.step(4))


def test_updater_step_without_mechanic_step():
    run, twin = seed_twins(3)
    before = run.snapshot()
    with pytest.raises(RuntimeError, match=r"mechanic\.step\(\)"):
        run.updater.step()
    assert_untouched(before, run)  # no base step, no scheduler step
    assert_same_run(run.step(3), twin.step(3))


@pytest.mark.parametrize("form", ["dropin", "seed"])
def test_parameters_added_to_the_base_directly_join_like_add_param_group(form):
    """Mechanic follows the base's param groups: a group added behind its back joins at the
    next step exactly as one added through the mechanized optimizer's add_param_group."""
    runs = []
    for how in ("base", "mechanized"):
        run = Run(form)
        run.step(2)
        extra = torch.linspace(-1, 1, 2, dtype=F64).requires_grad_()
        if how == "mechanized" and form == "dropin":
            run.opt.add_param_group({"params": [extra]})
        else:
            run.base.add_param_group({"params": [extra]})
        run.params.append(extra)
        run.step(4)
        assert set(run.base.state[extra]) >= {"mechanic_ref", "mechanic_delta"}
        runs.append(run)
    assert_same_run(*runs)
    assert not torch.equal(runs[0].params[-1], torch.linspace(-1, 1, 2, dtype=F64))


def test_lr_scheduler_of_another_optimizer():
    base, other = sgd(), sgd()
    with pytest.raises(ValueError, match="another optimizer"):
        manic.Updater(base, torch.optim.lr_scheduler.StepLR(other, step_size=1))
    # nor the scheduler of another base's mechanized optimizer
    with pytest.raises(ValueError, match="another optimizer"):
        manic.Updater(base, torch.optim.lr_scheduler.StepLR(manic.mechanize(sgd()), step_size=1))
    # the right one is accepted
    manic.Updater(base, torch.optim.lr_scheduler.StepLR(base, step_size=1))


def test_lr_scheduler_that_is_not_a_scheduler():
    with pytest.raises(TypeError, match="lr_scheduler"):
        manic.Updater(sgd(), lr_scheduler=0.1)


def test_mechanic_optimizer_cannot_be_replaced():
    run, twin = Run("seed"), Run("seed")
    run.step(2)
    twin.step(2)
    run.mechanic.optimizer = run.updater.base_optimizer  # the seed README's line: accepted
    before = run.snapshot()
    with pytest.raises(ValueError, match="cannot be replaced"):
        run.mechanic.optimizer = sgd()
    with pytest.raises(ValueError, match="cannot be replaced"):
        run.mechanic.optimizer = manic.mechanize(sgd())
    assert run.mechanic.optimizer is run.base
    assert_untouched(before, run)
    assert_same_run(run.step(3), twin.step(3))


# --------------------------------------------------------------------------- loading
def _donor(form, **kw):
    return Run(form, **kw).step(4).state_dict()


def _version(form, v):
    sd = copy.deepcopy(_donor(form))
    tuner = sd["param_groups"][0] if form == "dropin" else sd["tuner"]
    if v is None:
        del tuner["mechanic_version"]
    else:
        tuner["mechanic_version"] = v
    return sd


def _version1(form):
    """A version-1 state dict (before lr_ref and variant), from an original-form run."""
    sd = copy.deepcopy(_donor(form, variant="original"))
    tuner = sd["param_groups"][0] if form == "dropin" else sd["tuner"]
    del tuner["mechanic_lr_ref"], tuner["mechanic_variant"], tuner["mechanic_per_group"]
    tuner["mechanic_version"] = 1
    return sd


def _tuner_entry(form, key, value):
    sd = copy.deepcopy(_donor(form))
    tuner = sd["param_groups"][0] if form == "dropin" else sd["tuner"]
    if value is None:
        del tuner[key]
    else:
        tuner[key] = value
    return sd


BAD_LOADS = [
    # (id, donor factory(form), message pattern)
    ("weight_decay", lambda f: _donor(f, weight_decay=0.1), r"weight_decay=0\.1"),
    ("eps", lambda f: _donor(f, eps=1e-7), r"eps"),
    ("s_init", lambda f: _donor(f, s_init=1e-5), r"s_init"),
    ("num_betas", lambda f: _donor(f, num_betas=3), r"num_betas=3"),
    ("store_delta", lambda f: _donor(f, store_delta=False), r"store_delta"),
    ("other model: shapes", lambda f: _donor(f, shapes=((3, 4), (3,))), r"shape"),
    ("other model: more params", lambda f: _donor(f, shapes=((4, 3), (3,), (2,))), r"parameter|param"),
    ("variant", lambda f: _donor(f, variant="original"), r"variant='original'"),
    ("version 1 (the original form)", _version1, r"variant='original'.*variant='invariant'"),
    ("lr_ref missing", lambda f: _tuner_entry(f, "mechanic_lr_ref", None), r"mechanic_lr_ref"),
    ("lr_ref of shape (1,)", lambda f: _tuner_entry(f, "mechanic_lr_ref", torch.ones(1)), r"mechanic_lr_ref"),
    ("version 4", lambda f: _version(f, FORMAT_VERSION + 1), r"[Vv]ersion"),  # (a future one)
    ("version 99", lambda f: _version(f, 99), r"[Vv]ersion"),
    ("version '1'", lambda f: _version(f, "1"), r"[Vv]ersion"),
    ("version missing", lambda f: _version(f, None), r"[Vv]ersion"),
]


@pytest.mark.parametrize("form", ["dropin", "seed"])
@pytest.mark.parametrize("what,make,pattern", BAD_LOADS, ids=[b[0] for b in BAD_LOADS])
def test_bad_state_dict_is_rejected_and_nothing_changes(form, what, make, pattern):
    bad = copy.deepcopy(make(form))
    run, twin = Run(form), Run(form)
    run.step(3)
    twin.step(3)
    before = run.snapshot()
    with pytest.raises(ValueError, match=pattern):
        run.load(bad)
    assert_untouched(before, run)
    assert_same_run(run.step(3), twin.step(3))


@pytest.mark.parametrize("form", ["dropin", "seed"])
def test_a_rejected_load_keeps_the_last_step_statistics(form):
    """stats() after a rejected load reports the same as before it (h, grad_norm, param_norm of
    the last step included)."""
    run = Run(form).step(3)
    before = {k: v.clone() for k, v in run.tuner.stats().items()}
    assert {"h", "grad_norm", "param_norm"} <= before.keys()
    with pytest.raises(ValueError, match="num_betas"):
        run.load(copy.deepcopy(_donor(form, num_betas=2)))
    after = run.tuner.stats()
    assert deep_equal(before, after) is None, f"stats changed: {sorted(before)} -> {sorted(after)}"


def test_a_rejected_load_between_mechanic_step_and_updater_step_keeps_the_prepared_step():
    run, twin = seed_twins(2)
    run.mechanic.step()
    with pytest.raises(ValueError, match="store_delta"):
        run.mechanic.load_state_dict(copy.deepcopy(_donor("seed", store_delta=False)))
    run.updater.step()  # the prepared step is still there: no "without Mechanic's step" error
    run.t += 1
    assert_same_run(run.step(2), twin.step(3))


@pytest.mark.parametrize("store_delta", [True, False])
def test_mechanized_state_dict_from_the_other_mode_names_store_delta(store_delta):
    run = Run(store_delta=store_delta).step(2)
    other = Run(store_delta=not store_delta).step(2)
    before = run.snapshot()
    with pytest.raises(ValueError, match=f"store_delta={not store_delta}"):
        run.load(copy.deepcopy(other.state_dict()))
    assert_untouched(before, run)
    run.step(1)


def test_bad_load_before_the_first_step_changes_nothing():
    run, twin = Run(), Run()
    before = run.snapshot()
    with pytest.raises(ValueError, match="num_betas"):
        run.load(copy.deepcopy(_donor("dropin", num_betas=2)))
    assert_untouched(before, run)
    assert_same_run(run.step(4), twin.step(4))


# --------------------------------------------------------------------------- the table of rejected inputs
def _params(n=2, dtype=torch.float64):
    torch.manual_seed(0)
    return [torch.randn(4, 3, dtype=dtype, requires_grad=True) for _ in range(n)]


def _sgd(params=None, **kw):
    return torch.optim.SGD(params if params is not None else _params(), lr=0.1, **kw)


CONSTRUCTION = [
    # (description, factory, exception, message fragment)
    ("eps = 0", lambda: manic.mechanize(_sgd(), eps=0.0), ValueError, "eps"),
    ("eps < 0", lambda: manic.mechanize(_sgd(), eps=-1e-8), ValueError, "eps"),
    ("s_init = 0", lambda: manic.mechanize(_sgd(), s_init=0.0), ValueError, "s_init"),
    ("num_betas = 0", lambda: manic.mechanize(_sgd(), num_betas=0), ValueError, "num_betas"),
    ("num_betas = 2.5", lambda: manic.mechanize(_sgd(), num_betas=2.5), ValueError, "num_betas"),
    ("num_betas = True", lambda: manic.mechanize(_sgd(), num_betas=True), ValueError, "num_betas"),
    ("weight_decay < 0", lambda: manic.mechanize(_sgd(), weight_decay=-0.1), ValueError, "weight_decay"),
    ("weight_decay nan", lambda: manic.mechanize(_sgd(), weight_decay=float("nan")), ValueError, "weight_decay"),
    ("weight_decay inf", lambda: manic.mechanize(_sgd(), weight_decay=float("inf")), ValueError, "weight_decay"),
    ("eps a string", lambda: manic.mechanize(_sgd(), eps="1e-8"), TypeError, "eps"),
    ("store_delta not bool", lambda: manic.mechanize(_sgd(), store_delta=1), TypeError, "store_delta"),
    ("compile not bool", lambda: manic.mechanize(_sgd(), compile="yes"), TypeError, "compile"),
    ("a model, not an optimizer", lambda: manic.mechanize(torch.nn.Linear(2, 2)), TypeError, "Optimizer"),
    ("a list of params", lambda: manic.mechanize(_params()), TypeError, "Optimizer"),
    ("Updater of a model", lambda: manic.Updater(torch.nn.Linear(2, 2)), TypeError, "Optimizer"),
    ("Mechanic of an optimizer", lambda: manic.Mechanic(_sgd()), TypeError, "Updater"),
    ("mechanize a Mechanized", lambda: manic.mechanize(manic.mechanize(_sgd())), TypeError, "already"),
    ("LBFGS", lambda: manic.mechanize(torch.optim.LBFGS(_params())), TypeError, "LBFGS"),
    ("an invalid reducer", lambda: manic.mechanize(_sgd(), reducer=object()), TypeError, "reducer"),
    ("reducer and process_group", lambda: manic.mechanize(_sgd(), reducer=manic.NoReduce(), process_group=1),
     ValueError, "one of"),
    ("process_group and device_mesh", lambda: manic.mechanize(_sgd(), process_group=1, device_mesh=2),
     ValueError, "not both"),
    ("an unknown keyword", lambda: manic.mechanize(_sgd(), betas=3), TypeError, "unexpected keyword.*betas"),
    ("an unknown keyword (seed form)", lambda: manic.Mechanic(manic.Updater(_sgd()), s_int=1e-3), TypeError,
     "Mechanic.*unexpected keyword.*s_int"),
    ("options and keywords", lambda: manic.Mechanized(_sgd(), manic.Options(), eps=1e-6), TypeError, "not both"),
]


@pytest.mark.parametrize("what,factory,exc,fragment", CONSTRUCTION, ids=[c[0] for c in CONSTRUCTION])
def test_rejected_at_construction(what, factory, exc, fragment):
    with pytest.raises(exc, match=fragment):
        factory()


def test_scheduler_attached_to_another_optimizer():
    other = _sgd()
    with pytest.raises(ValueError, match="another optimizer"):
        manic.Updater(_sgd(), torch.optim.lr_scheduler.StepLR(other, 1))


def test_sparse_gradient_at_step():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = manic.mechanize(torch.optim.SGD(emb.parameters(), lr=0.1))
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_mechanic_step_twice_and_updater_step_alone():
    params = _params()
    updater = manic.Updater(_sgd(params))
    mechanic = manic.Mechanic(updater)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="mechanic.step"):
        updater.step()
    mechanic.step()
    with pytest.raises(RuntimeError, match="twice"):
        mechanic.step()
    updater.step()  # the pair still works afterwards
    mechanic.step()
    updater.step()


def _trained(store_delta=True, weight_decay=1e-2, shape=(4, 3)):
    torch.manual_seed(0)
    params = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    opt = manic.mechanize(torch.optim.AdamW(params, lr=1e-2), store_delta=store_delta, weight_decay=weight_decay)
    for t in range(5):
        for p in params:
            p.grad = torch.full_like(p, 0.1 * (t + 1))
        opt.step()
    return params, opt


def _snapshot(params, opt):
    return copy.deepcopy(([p.detach() for p in params], opt.state_dict()))


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _bad_version(sd):
    sd["param_groups"][0]["mechanic_version"] = 99
    return sd


def _bad_tuner(sd):
    sd["param_groups"][0]["mechanic_s"] = "garbage"
    return sd


LOADS = [
    ("other hyperparameters", lambda: _trained(weight_decay=0.5)[1].state_dict(), "weight_decay"),
    ("other store_delta mode", lambda: _trained(store_delta=False)[1].state_dict(), "store_delta"),
    ("another model", lambda: _trained(shape=(3, 4))[1].state_dict(), "shape"),
    ("unsupported format version", lambda: _bad_version(_trained()[1].state_dict()), "version"),
    ("corrupted tuner entry", lambda: _bad_tuner(_trained()[1].state_dict()), "mechanic_s"),
]


@pytest.mark.parametrize("what,make,fragment", LOADS, ids=[c[0] for c in LOADS])
def test_bad_load_raises_and_leaves_state_untouched(what, make, fragment):
    params, opt = _trained()
    before = _snapshot(params, opt)
    with pytest.raises(ValueError, match=fragment):
        opt.load_state_dict(copy.deepcopy(make()))
    assert _same(before, _snapshot(params, opt))
    for p in params:  # and it still steps
        p.grad = torch.ones_like(p)
    opt.step()


def test_bad_seed_load_raises_and_leaves_state_untouched():
    params = _params()
    updater = manic.Updater(torch.optim.AdamW(params, lr=1e-2))
    mechanic = manic.Mechanic(updater)
    for p in params:
        p.grad = torch.ones_like(p)
    mechanic.step()
    updater.step()
    before = copy.deepcopy(mechanic.state_dict())
    other = manic.Mechanic(manic.Updater(torch.optim.AdamW(_params(), lr=1e-2)), num_betas=3)
    with pytest.raises(ValueError, match="num_betas"):
        mechanic.load_state_dict(other.state_dict())
    assert _same(before, mechanic.state_dict())


def test_truncated_checkpoint_file(tmp_path):
    params, opt = _trained()
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    before = _snapshot(params, opt)
    with pytest.raises(Exception):  # torch.load's own error; nothing reaches the optimizer
        opt.load_state_dict(torch.load(path, weights_only=True))
    assert _same(before, _snapshot(params, opt))
