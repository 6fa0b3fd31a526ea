"""What of the GPU check can run without a GPU: benchmarks/gpu_check.py's argument handling, its plan (dry
run), its refusal without CUDA, its judging of pytest's report, its CSV and summary, its timeouts; the CUDA
tests skip cleanly here; and the bodies of those tests, run on the CPU (test_cuda.py's ``check_*``, the
NCCL forms over gloo through the same harness), so that the code a GPU will run first has run before."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "distributed"))  # (at collection: before any forkserver starts)

import device_scenarios  # noqa: E402
import nccl_harness  # noqa: E402
import test_cuda  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1")
no_cuda_here = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


gc = load_gpu_check()


def env(gpus: int, gb: float):
    return gc.Env(torch="2.x", cuda_build="12.4", gpus=gpus, names=["Fake GPU"] * gpus, free_bytes=int(gb * 2**30),
                  total_bytes=int(gb * 2**30), nccl=True, triton="3.x")


def check(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/gpu_check.py", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------- the CUDA tests, here
@no_cuda_here
@pytest.mark.timeout(120)
def test_cuda_tests_skip_cleanly_without_a_gpu():
    """Selected by the registered marker (--strict-markers), each skipped with its reason, exit 0."""
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/test_cuda.py", "tests/distributed/test_nccl.py",
                           "-m", "cuda", "--strict-markers", "-q", "-rs", "-p", "no:cacheprovider"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=110)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert "passed" not in out and "failed" not in out and "error" not in out.lower(), out[-3000:]
    assert "needs a CUDA GPU" in out and "python benchmarks/gpu_check.py" in out, out[-3000:]
    assert "needs 2 CUDA GPUs and NCCL (found 0 GPU(s)" in out, out[-3000:]
    skipped = int(out.strip().splitlines()[-1].split(" skipped")[0].split()[-1])
    assert skipped == 48 + 4 + 2 + 4 + 2 + 2 + 1, out[-500:]


@pytest.mark.timeout(120)
def test_checks_run_on_the_cpu():
    """test_cuda.py's checks, eager, on the CPU (the profiler's part without CUDA's runtime calls)."""
    test_cuda.check_reference("cpu", "adamw_fused", "fixed", True, "invariant")
    test_cuda.check_reference("cpu", "sgd_nesterov", "closed", False, "original")
    test_cuda.check_bf16_does_not_stall("cpu", compile=False)
    for state in ("ref+delta", "delta"):
        test_cuda.check_no_host_sync("cpu", compile=False, state=state)


@pytest.mark.timeout(600)
def test_compiled_checks_run_on_the_cpu():
    """The compile=True checks through Inductor's CPU backend (C++ where CUDA has Triton)."""
    test_cuda.check_compiled_kernels("cpu", torch.float64)
    test_cuda.check_compiled_step("cpu", "ref+delta")
    test_cuda.check_no_host_sync("cpu", compile=True, state="ref+delta")


@pytest.mark.timeout(240)
def test_nccl_forms_over_gloo():
    """test_nccl.py's forms and assertions, through the same harness, over gloo on the CPU."""
    results = nccl_harness.run(2, device_scenarios.forms, "cpu", backend="gloo", timeout=200, pg_timeout=60)
    device_scenarios.check_results(results, "cpu")


@pytest.mark.timeout(60)
@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has 2 GPUs")
def test_nccl_harness_refuses_without_the_gpus():
    with pytest.raises(RuntimeError, match="2 NCCL ranks need 2 CUDA devices, found"):
        nccl_harness.run(2, device_scenarios.forms, "cuda", backend="nccl", timeout=10)


# ----------------------------------------------------------------------------- gpu_check.py
@no_cuda_here
@pytest.mark.timeout(60)
def test_without_cuda_it_fails_loudly_and_writes_nothing(tmp_path):
    done = check("--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "--dry-run" in done.stderr and "nvidia-smi" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    done = check("--dry-run", "--assume-gpus", "2", "--assume-gb", "40", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "2 GPU(s)" in out and "budget: 600 s" in out and "(assumed for --dry-run)" in out
    assert "tests/test_cuda.py tests/distributed/test_nccl.py -m cuda" in out and "NCCL on 2 GPUs" in out
    assert "step_overhead.py --device cuda --params 1e+09" in out and "--sequential" in out
    assert "memory.py --device cuda --params 1e+08" in out
    assert not (tmp_path / "out").exists()


def test_arguments():
    args = gc.parse([])
    assert args.sizes == [8e6, 1e8, 1e9] and args.budget is None and not args.dry_run
    assert args.out.endswith("benchmarks/results/gpu_check")
    for bad in (["--assume-gpus", "2"], ["--budget", "0"], ["--sizes", "-1"], ["--sizes"]):
        with pytest.raises(SystemExit):
            gc.parse(bad)
    assert gc.parse(["--dry-run", "--assume-gb", "8", "--sizes", "1e6"]).sizes == [1e6]


def test_plan_fits_each_size_to_the_memory(tmp_path):
    args = gc.parse(["--out", str(tmp_path)])
    steps, skipped = gc.plan(env(1, 80), args)
    assert [s.name for s in steps] == ["CUDA tests", "step_overhead 8M", "step_overhead 100M", "step_overhead 1B",
                                       "memory 100M"]
    by_name = {s.name: s for s in steps}
    assert "--sequential" not in by_name["step_overhead 100M"].cmd and "--sequential" in by_name["step_overhead 1B"].cmd
    assert by_name["CUDA tests"].timeout == gc.TIMEOUTS["tests"]
    assert skipped == ["NCCL (DDP and FSDP2 on 2 ranks): needs 2 GPUs, this machine has 1"]
    for s in steps[1:4]:
        cmd = s.cmd
        assert cmd[cmd.index("--methods") + 1:cmd.index("--repeats")] == ["base", "manic", "compile"]
        assert cmd[cmd.index("--bases") + 1:cmd.index("--methods")] == ["adamw_fused", "adamw_foreach"]

    steps, skipped = gc.plan(env(2, 12), args)
    assert [s.name for s in steps] == ["CUDA tests", "step_overhead 8M", "step_overhead 100M", "memory 100M"]
    assert steps[0].timeout == gc.TIMEOUTS["tests_nccl"] and "--sequential" in steps[2].cmd
    assert len(skipped) == 1 and skipped[0].startswith("step time at 1B parameters: one method's model needs ~26.1 GiB")

    steps, _ = gc.plan(env(1, 2), gc.parse(["--out", str(tmp_path), "--skip-tests"]))
    assert [s.name for s in steps] == ["step_overhead 8M", "memory 8M"]
    assert gc.plan(env(1, 80), gc.parse(["--skip-tests", "--skip-bench"]))[0] == []


def junit(path: Path, cases: str) -> Path:
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')
    return path


PASS = '<testcase classname="tests.test_cuda" name="test_a" file="tests/test_cuda.py" time="1.5"/>'
FAIL = ('<testcase classname="tests.test_cuda" name="test_b[x]" file="tests/test_cuda.py" time="2">'
        '<failure message="AssertionError: step 3: manic 1, base 0">trace</failure></testcase>')
SKIP_NCCL = ('<testcase classname="tests.distributed.test_nccl" name="test_n" file="tests/distributed/test_nccl.py" '
             'time="0"><skipped message="needs 2 CUDA GPUs and NCCL (found 1 GPU(s), NCCL available)"/></testcase>')
SKIP_CUDA = ('<testcase classname="tests.test_cuda" name="test_c" file="tests/test_cuda.py" time="0">'
             '<skipped message="needs a CUDA GPU"/></testcase>')


def test_reading_and_judging_pytest_report(tmp_path):
    cases = gc.read_junit(junit(tmp_path / "a.xml", PASS + FAIL + SKIP_NCCL))
    assert [(c["name"], c["outcome"]) for c in cases] == [
        ("tests/test_cuda.py::test_a", "passed"), ("tests/test_cuda.py::test_b[x]", "failed"),
        ("tests/distributed/test_nccl.py::test_n", "skipped")]
    assert cases[1]["message"] == "AssertionError: step 3: manic 1, base 0" and cases[0]["seconds"] == 1.5
    status, detail = gc.judge_tests(cases, 1, env(1, 80))
    assert status == "failed" and "tests/test_cuda.py::test_b[x]" in detail

    ok = gc.read_junit(junit(tmp_path / "b.xml", PASS + SKIP_NCCL))
    assert gc.judge_tests(ok, 0, env(1, 80)) == ("passed", "1 passed, 1 skipped")  # NCCL needs 2 GPUs
    status, detail = gc.judge_tests(ok, 0, env(2, 80))  # ... and is not to be skipped with them
    assert status == "failed" and "skipped on a machine with 2 GPU(s)" in detail
    skipped = gc.read_junit(junit(tmp_path / "c.xml", PASS + SKIP_CUDA))
    assert gc.judge_tests(skipped, 0, env(1, 80))[0] == "failed"  # CUDA tests skipped on a CUDA machine
    assert gc.judge_tests([], None, env(1, 80))[0] == "timeout"
    assert gc.judge_tests([], 4, env(1, 80)) == ("failed", "pytest ran no test (exit 4)")


def results(tmp_path: Path) -> list:
    step = lambda name, section, params=None: gc.Step(name, section, ["x"], 10, tmp_path, params=params)  # noqa: E731
    tests = gc.Result(step("CUDA tests", "tests"), "passed", 100.0, "2 passed, 1 skipped",
                      [{"section": "tests", "name": "tests/test_cuda.py::test_a[adamw, x]", "status": "passed",
                        "seconds": 1.5, "detail": ""},
                       {"section": "tests", "name": "tests/distributed/test_nccl.py::test_n", "status": "skipped",
                        "seconds": 0, "detail": "needs 2 CUDA GPUs, and NCCL"}])
    timing = gc.Result(step("step_overhead 8M", "step_overhead", 8e6), "passed", 30.0, "", [
        {"section": "step_overhead", "name": m, "params": 8396800, "base": b, "status": "measured", "ms": ms, "ratio": ratio}
        for b in ("adamw_fused", "adamw_foreach")
        for m, ms, ratio in ((b, 1.0, 1.0), (f"manic({b})", 2.5, 2.5), (f"manic({b}, compile=True)", 1.5, 1.5))])
    memory = gc.Result(step("memory 100M", "memory", 1e8), "failed", 20.0, "manic_delta: CUDA error: boom", [
        {"section": "memory", "name": "manic", "params": 100, "status": "measured", "persistent_extra_x": 2.0,
         "peak_extra_x": 2.04},
        {"section": "memory", "name": "manic_delta", "status": "failed", "detail": "CUDA error: boom"}])
    late = gc.Result(step("step_overhead 1B", "step_overhead", 1e9), "not run", 0.0, "time budget spent (5 s left)")
    return [tests, timing, memory, late]


def test_csv_and_summary(tmp_path):
    rs = results(tmp_path)
    path = tmp_path / "gpu_check.csv"
    gc.write_csv(path, rs, ["step time at 1B parameters: one method's model needs ~26.1 GiB"])
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == gc.CSV_FIELDS and all(len(r) == len(gc.CSV_FIELDS) for r in rows)
    back = list(csv.DictReader(path.open(newline="")))
    assert "manic(adamw_fused, compile=True)" in {r["name"] for r in back}  # commas survive
    assert {r["name"]: r["status"] for r in back if r["section"] == "step"} == {
        "CUDA tests": "passed", "step_overhead 8M": "passed", "memory 100M": "failed", "step_overhead 1B": "not run",
        "step time at 1B parameters": "not measured"}
    assert next(r for r in back if r["name"] == "manic(adamw_foreach)")["ratio"] == "2.5"

    ok, problems = gc.verdict(rs)
    assert not ok and problems == ["memory 100M: failed (manic_delta: CUDA error: boom)"]
    text = gc.summary(env(1, 80), rs, ["step time at 1B parameters: too large"], 150.0, 480.0, "python x")
    assert text.startswith("# manic GPU check: FAILED\n") and "- memory 100M: failed" in text
    assert "| 8.4M | adamw_fused | 1.00 | 2.50 (2.50x) | 1.50 (1.50x) |" in text
    assert "| manic | 2.00x | 2.04x |" in text and "| manic_delta | failed: CUDA error: boom | |" in text
    assert "- skipped: `tests/distributed/test_nccl.py::test_n`: needs 2 CUDA GPUs, and NCCL" in text
    assert "## Not measured" in text and "step_overhead 1B: not run (time budget spent" in text
    assert gc.summary(env(1, 80), rs[:2], [], 1.0, 480.0, "x").startswith("# manic GPU check: PASSED")


@pytest.mark.timeout(60)
def test_a_step_past_its_timeout_is_killed_with_its_children(tmp_path):
    script = textwrap.dedent("""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print("CHILD-PID", child.pid, flush=True)
        time.sleep(120)
    """)
    start = time.monotonic()
    rc, seconds = gc.run_step([sys.executable, "-c", script], 2.0, tmp_path / "x.log")
    assert rc is None and seconds < 5 and time.monotonic() - start < 20
    child = int(next(ln for ln in (tmp_path / "x.log").read_text().splitlines() if ln.startswith("CHILD-PID")).split()[1])
    time.sleep(0.5)
    status = Path(f"/proc/{child}/stat")
    assert not status.exists() or status.read_text().rsplit(")", 1)[1].split()[0] == "Z", "the child outlived the step"


def fake(tmp_path: Path, section: str, body: str, params: float | None = None):
    script = tmp_path / f"{section}.py"
    script.write_text(textwrap.dedent(body))
    return gc.Step(f"fake {section}", section, [sys.executable, str(script)], 30, tmp_path, params=params)


@pytest.mark.timeout(60)
def test_execute_reads_each_step_and_names_failures(tmp_path):
    rows = "".join(f'{n},"{m}",{b},1.0,1.0\\n' for b in gc.BASES for n, m in
                   ((8396800, b), (8396800, f"manic({b})"), (8396800, f"manic({b}, compile=True)")))
    good = fake(tmp_path, "step_overhead", f'''
        open({str(tmp_path / 'step_overhead.csv')!r}, "w").write('params,method,base,ms,ratio\\n{rows}')
    ''', 8e6)
    r = gc.execute(good, env(1, 80), 100)
    assert r.status == "passed" and len(r.rows) == 6, r.detail
    oom = fake(tmp_path, "memory", """
        import sys
        sys.exit("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    """)
    r = gc.execute(oom, env(1, 80), 100)
    assert r.status == "out of memory" and "Tried to allocate" in r.detail and gc.verdict([r])[0]
    broken = fake(tmp_path, "memory", "print('no csv written')")
    r = gc.execute(broken, env(1, 80), 100)
    assert r.status == "failed" and "could not be read" in r.detail
    assert gc.execute(broken, env(1, 80), 5).status == "not run"
    hung = fake(tmp_path, "step_overhead", "import time; time.sleep(60)")
    hung.timeout = 1
    r = gc.execute(hung, env(1, 80), 100)
    assert r.status == "timeout" and not gc.verdict([r])[0]


@pytest.mark.timeout(60)
def test_main_runs_the_plan_and_writes_its_report(tmp_path, monkeypatch, capsys):
    """main() with a fake machine and a fake plan: every step runs, the report is written, exit 1 on a failure."""
    out = tmp_path / "out"
    monkeypatch.setattr(gc, "probe", lambda: env(1, 80))
    steps = [fake(tmp_path, "memory", "import sys; sys.exit('boom')")]
    monkeypatch.setattr(gc, "plan", lambda e, a: (steps, ["NCCL: needs 2 GPUs"]))
    assert gc.main(["--out", str(out)]) == 1
    text = (out / "summary.md").read_text()
    assert text.startswith("# manic GPU check: FAILED") and "fake memory: failed (exit 1" in text
    assert "NCCL: needs 2 GPUs" in text and (out / "gpu_check.csv").exists()
    assert "manic GPU check on: torch 2.x (CUDA 12.4), 1 x [Fake GPU]" in capsys.readouterr().out
