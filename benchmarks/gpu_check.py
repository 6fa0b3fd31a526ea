"""One command that checks manic's GPU path: its CUDA tests, then its step time and memory on CUDA.

    python benchmarks/gpu_check.py [--out DIR] [--budget SECONDS] [--sizes 8e6 1e8 1e9]
    python benchmarks/gpu_check.py --dry-run [--assume-gpus N --assume-gb G]   # the plan, nothing run

In order, each step a subprocess with a timeout, all within ``--budget`` seconds (default 480 on one GPU,
600 with two or more, which add the NCCL test):

1. the CUDA tests: ``pytest -m cuda tests/test_cuda.py tests/distributed/test_nccl.py`` (the float64
   reference on the GPU, eager and through Triton; bf16 without a stall; no host sync per step, by torch's
   profiler and its CUDA sync debug mode; compile=True against eager; with 2+ GPUs DDP and FSDP2 over NCCL
   against the single-process run, one all-reduce per step);
2. ``benchmarks/step_overhead.py --device cuda``: manic over fused and foreach AdamW against the base
   alone, eager and compile=True, at each of ``--sizes`` parameters: interleaved where every method's model
   fits in the GPU's free memory at once, one method at a time where one model fits, else not measured;
3. ``benchmarks/memory.py --device cuda``: persistent and peak bytes (torch.cuda.max_memory_allocated) of
   manic's state modes against plain AdamW.

Writes to ``--out`` (default benchmarks/results/gpu_check): ``gpu_check.csv`` (one row per test, per
measured step time, per memory row and per step of this check), ``summary.md``, and each step's log and
outputs. Exit status: 0 if everything ran and passed; 1 if anything failed, timed out or gave something
unexpected (the summary's first line says what); 2 if there is no CUDA device (nothing is run).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEST_FILES = ["tests/test_cuda.py", "tests/distributed/test_nccl.py"]
NCCL_TEST_FILE = "test_nccl.py"
BUDGET = {1: 480.0, 2: 600.0}  # seconds, by GPUs (1, 2 or more)
SIZES = [8e6, 1e8, 1e9]
BASES = ["adamw_fused", "adamw_foreach"]
METHODS = ["base", "manic", "compile"]  # step_overhead.py --methods: the base alone, manic eager, compile=True
MEMORY_METHODS = ["adamw", "manic", "manic_recompute", "manic_delta"]
MEMORY_PARAMS = 1e8
# GPU bytes per parameter (float32 parameters and gradients, AdamW's two moments, manic's two buffers and a
# step's transient, rounded up): every method of every base at once (interleaved), or the largest one alone.
INTERLEAVED_BYTES = len(BASES) * (16 + 2 * 26)
SEQUENTIAL_BYTES = 28
USABLE = 0.8  # of the free memory, for the estimates above
# each step's own limit in seconds (a step also stops where the budget ends)
TIMEOUTS = {"tests": 300.0, "tests_nccl": 420.0, "step_overhead": 150.0, "memory": 120.0}
MIN_SECONDS = 20.0  # a step with less of the budget left is not started
CSV_FIELDS = ["section", "name", "params", "base", "status", "seconds", "ms", "ratio", "persistent_extra_x",
              "peak_extra_x", "detail"]


class CheckError(Exception):
    """Something this check cannot go on from; its message says what and what to do."""


@dataclass
class Env:
    """What this machine has, as far as the check depends on it."""

    torch: str
    cuda_build: str | None  # torch.version.cuda
    gpus: int
    names: list[str] = field(default_factory=list)
    free_bytes: int = 0  # on cuda:0
    total_bytes: int = 0
    nccl: bool = False
    triton: str | None = None
    assumed: bool = False  # a --dry-run's planning assumption, not this machine

    def describe(self) -> str:
        if not self.gpus:
            return f"torch {self.torch}, no CUDA device (torch.cuda.is_available() is False; CUDA build: {self.cuda_build})"
        gpus = f"{self.gpus} x [{', '.join(self.names)}]" if self.names else f"{self.gpus} GPU(s)"
        return (f"torch {self.torch} (CUDA {self.cuda_build}), {gpus}, cuda:0 "
                f"{self.free_bytes / 2**30:.1f} of {self.total_bytes / 2**30:.1f} GiB free, "
                f"NCCL {'yes' if self.nccl else 'no'}, Triton {self.triton or 'not installed'}"
                + (" (assumed for --dry-run)" if self.assumed else ""))


PROBE_TIMEOUT = 90.0  # seconds for torch's CUDA initialisation (a broken driver can hang it)


def probe() -> Env:
    """This machine's GPUs, asked in a subprocess with a timeout: a CUDA initialisation that hangs fails the
    check instead, and this process holds no CUDA context (and no GPU memory) while the steps run."""
    try:
        done = subprocess.run([sys.executable, __file__, "--_probe"], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise CheckError(f"asking torch for the GPUs did not finish in {PROBE_TIMEOUT:g} s (a hung CUDA driver? "
                         "try nvidia-smi)") from None
    if done.returncode != 0:
        raise CheckError(f"asking torch for the GPUs failed: {done.stderr.strip()[-2000:]}")
    return Env(**json.loads(done.stdout.strip().splitlines()[-1]))


def _probe() -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    env = Env(torch=torch.__version__, cuda_build=torch.version.cuda, gpus=0)
    if torch.cuda.is_available():
        env.gpus = torch.cuda.device_count()
        env.names = [torch.cuda.get_device_name(i) for i in range(env.gpus)]
        env.free_bytes, env.total_bytes = torch.cuda.mem_get_info(0)
        env.nccl = dist.is_available() and dist.is_nccl_available()
        try:
            import triton

            env.triton = triton.__version__
        except ImportError:
            env.triton = None
    return asdict(env)


@dataclass
class Step:
    name: str
    section: str  # tests | step_overhead | memory
    cmd: list[str]
    timeout: float
    out: Path  # where its outputs go
    params: float | None = None
    note: str = ""


@dataclass
class Result:
    step: Step
    status: str  # passed | failed | timeout | out of memory | not run
    seconds: float = 0.0
    detail: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)  # CSV rows of what it measured


def size_label(n: float) -> str:
    return f"{n / 1e9:g}B" if n >= 1e9 else f"{n / 1e6:g}M"


def plan(env: Env, args: argparse.Namespace) -> tuple[list[Step], list[str]]:
    """The steps to run on ``env``, and what will not be measured there (and why)."""
    out, py = Path(args.out), sys.executable
    steps: list[Step] = []
    skipped: list[str] = []
    if not args.skip_tests:
        key = "tests_nccl" if env.gpus >= 2 else "tests"
        test_timeout = TIMEOUTS[key]
        cmd = [py, "-m", "pytest", *TEST_FILES, "-m", "cuda", "-v", "-rfEs", "-p", "no:cacheprovider",
               "--timeout", str(int(test_timeout - 20)), f"--junitxml={out / 'tests.xml'}", "-o", "junit_family=xunit1"]
        note = "CUDA tests" + (", NCCL on 2 GPUs" if env.gpus >= 2 else "; NCCL needs 2 GPUs: skipped")
        steps.append(Step("CUDA tests", "tests", cmd, test_timeout, out, note=note))
        if env.gpus < 2:
            skipped.append(f"NCCL (DDP and FSDP2 on 2 ranks): needs 2 GPUs, this machine has {env.gpus}")
    if not args.skip_bench:
        usable = USABLE * env.free_bytes
        for n in args.sizes:
            label = size_label(n)
            cmd = [py, "benchmarks/step_overhead.py", "--device", "cuda", "--params", f"{n:g}", "--bases", *BASES,
                   "--methods", *METHODS, "--repeats", str(args.repeats), "--out", str(out / f"step_overhead_{label}")]
            if n * INTERLEAVED_BYTES <= usable:
                note = f"interleaved (~{n * INTERLEAVED_BYTES / 2**30:.1f} GiB)"
            elif n * SEQUENTIAL_BYTES <= usable:
                cmd.append("--sequential")
                note = (f"one method at a time (~{n * SEQUENTIAL_BYTES / 2**30:.1f} GiB; interleaved would need "
                        f"~{n * INTERLEAVED_BYTES / 2**30:.0f} GiB)")
            else:
                skipped.append(f"step time at {label} parameters: one method's model needs ~"
                               f"{n * SEQUENTIAL_BYTES / 2**30:.1f} GiB, {usable / 2**30:.1f} GiB of cuda:0 usable")
                continue
            steps.append(Step(f"step_overhead {label}", "step_overhead", cmd, TIMEOUTS["step_overhead"],
                              out / f"step_overhead_{label}", params=n, note=note))
        mem_params = MEMORY_PARAMS if MEMORY_PARAMS * SEQUENTIAL_BYTES <= usable else 8e6
        per_method = TIMEOUTS["memory"] / (len(MEMORY_METHODS) + 1)
        cmd = [py, "benchmarks/memory.py", "--device", "cuda", "--params", f"{mem_params:g}", "--steps", "3",
               "--methods", *MEMORY_METHODS, "--timeout", f"{per_method:g}", "--out", str(out / "memory")]
        steps.append(Step(f"memory {size_label(mem_params)}", "memory", cmd, TIMEOUTS["memory"], out / "memory",
                          params=mem_params, note="max_memory_allocated, each method in a fresh process"))
    return steps, skipped


# ----------------------------------------------------------------------------- running a step
def run_step(cmd: list[str], timeout: float, log: Path) -> tuple[int | None, float]:
    """Run ``cmd`` from the repository root, stdout and stderr into ``log``, in its own process group so
    that on a timeout the whole group (pytest's ranks, memory.py's workers) is killed: SIGTERM, then
    SIGKILL 10 s later. Returns (exit code, None on a timeout; seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        except BaseException:  # Ctrl-C: leave nothing behind
            _kill_group(proc)
            raise
        finally:
            _kill_group(proc)  # (also what a finished step left running)
    return rc, time.monotonic() - start


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:  # the group's other processes
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def read_junit(path: Path) -> list[dict[str, Any]]:
    """One dict per test case of a pytest junit XML: name (node id), outcome, seconds, message."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
        name = f"{module}::{case.get('name')}"
        result, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                result = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                text = (child.get("message") or child.text or "").strip()
                message = text.splitlines()[0][:300] if text else ""
                break
        cases.append({"name": name, "outcome": result, "seconds": float(case.get("time") or 0.0), "message": message})
    return cases


def judge_tests(cases: list[dict[str, Any]], rc: int | None, env: Env) -> tuple[str, str]:
    """(status, detail) of the test step from its cases: a failure, an error, or a skip that a machine with
    ``env``'s GPUs should not have, fails it."""
    if rc is None:
        return "timeout", "pytest did not finish in time"
    if not cases:
        return "failed", f"pytest ran no test (exit {rc})"
    bad = [c for c in cases if c["outcome"] in ("failed", "error")]
    if bad:
        return "failed", f"{len(bad)} of {len(cases)} failed: " + "; ".join(c["name"] for c in bad[:5])
    wrongly_skipped = [c for c in cases if c["outcome"] == "skipped" and env.gpus >= (2 if NCCL_TEST_FILE in c["name"] else 1)]
    if wrongly_skipped:
        return "failed", (f"{len(wrongly_skipped)} skipped on a machine with {env.gpus} GPU(s): "
                          f"{wrongly_skipped[0]['name']}: {wrongly_skipped[0]['message']}")
    if rc not in (0,):
        return "failed", f"pytest exited {rc} though no test failed"
    passed = sum(c["outcome"] == "passed" for c in cases)
    return "passed", f"{passed} passed, {len(cases) - passed} skipped"


def read_step_overhead(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or set(rows[0]) != {"params", "method", "base", "ms", "ratio"}:
        raise CheckError(f"{path}: not step_overhead.py's CSV (columns {list(rows[0]) if rows else 'none'})")
    return [{"section": "step_overhead", "name": r["method"], "params": int(r["params"]), "base": r["base"],
             "status": "measured", "ms": float(r["ms"]), "ratio": float(r["ratio"])} for r in rows]


def read_memory(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        failed = bool(r["error"])
        out.append({"section": "memory", "name": r["method"], "params": int(r["param_bytes"]) // 4 if not failed else "",
                    "status": "failed" if failed else "measured", "detail": r["error"],
                    "persistent_extra_x": "" if failed else float(r["persistent_extra_x"]),
                    "peak_extra_x": "" if failed else float(r["peak_extra_x"])})
    return out


def execute(step: Step, env: Env, remaining: float) -> Result:
    """Run ``step`` within ``remaining`` seconds of the budget and judge what it produced."""
    if remaining < MIN_SECONDS:
        return Result(step, "not run", detail=f"time budget spent ({remaining:.0f} s left)")
    timeout = min(step.timeout, remaining)
    log = step.out / f"{step.section}.log"
    rc, seconds = run_step(step.cmd, timeout, log)
    result = Result(step, "passed", seconds)
    try:
        result.status, result.detail, result.rows = outcome(step, env, rc, timeout, log)
    except Exception as e:  # noqa: BLE001 - results this check cannot read fail the step, not the check
        result.status, result.detail = "failed", f"its results could not be read: {type(e).__name__}: {e}; log: {log}"
    return result


def outcome(step: Step, env: Env, rc: int | None, timeout: float, log: Path) -> tuple[str, str, list[dict]]:
    """(status, detail, CSV rows) of a step that ran and exited with ``rc`` (None: killed at ``timeout``)."""
    text = tail(log)
    if step.section == "tests":
        junit = step.out / "tests.xml"
        cases = read_junit(junit) if rc is not None and junit.exists() else []
        status, detail = judge_tests(cases, rc, env)
        if status != "passed":
            detail += f"; log: {log}" + ("" if cases else f"\n{text}")
        rows = [{"section": "tests", "name": c["name"], "status": c["outcome"], "seconds": round(c["seconds"], 2),
                 "detail": c["message"]} for c in cases]
        return status, detail, rows
    if rc is None:
        return "timeout", f"did not finish within {timeout:.0f} s; log: {log}\n{text}", []
    if rc != 0:
        oom = "out of memory" in text.lower() or "OutOfMemoryError" in text
        return ("out of memory" if oom else "failed"), f"exit {rc}; log: {log}\n{text}", []
    if step.section == "step_overhead":
        rows = read_step_overhead(step.out / "step_overhead.csv")
        want = {(b, m) for b in BASES for m in (b, f"manic({b})", f"manic({b}, compile=True)")}
        got = {(r["base"], r["name"]) for r in rows}
        if got != want:
            return "failed", f"expected the rows {sorted(want)}, got {sorted(got)}", rows
        return "passed", "", rows
    rows = read_memory(step.out / "memory.csv")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        return "failed", "; ".join(f"{r['name']}: {r['detail']}" for r in failed), rows
    return "passed", "", rows


# ----------------------------------------------------------------------------- the report
def write_csv(path: Path, results: list[Result], skipped: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for r in results:
            writer.writerow({"section": "step", "name": r.step.name, "params": "" if r.step.params is None else
                             int(r.step.params), "status": r.status, "seconds": round(r.seconds, 1),
                             "detail": r.detail.splitlines()[0] if r.detail else r.step.note})
            for row in r.rows:
                writer.writerow({k: row.get(k, "") for k in CSV_FIELDS})
        for note in skipped:
            writer.writerow({"section": "step", "name": note.split(":")[0], "status": "not measured", "detail": note})


def verdict(results: list[Result]) -> tuple[bool, list[str]]:
    """(passed, what failed): a step that failed or timed out fails the check; one not run for the budget,
    or out of memory in a step-time or memory measurement, is reported without failing it."""
    problems = [f"{r.step.name}: {r.status}" + (f" ({r.detail.splitlines()[0]})" if r.detail else "")
                for r in results if r.status in ("failed", "timeout")]
    return not problems, problems


def summary(env: Env, results: list[Result], skipped: list[str], seconds: float, budget: float, command: str) -> str:
    ok, problems = verdict(results)
    lines = [f"# manic GPU check: {'PASSED' if ok else 'FAILED'}", ""]
    if problems:
        lines += ["Failed:", "", *[f"- {p}" for p in problems], ""]
    lines += [f"{time.strftime('%Y-%m-%d %H:%M')}; {env.describe()}; {seconds:.0f} s of a {budget:.0f} s budget; "
              f"command: {command}", "", "| step | status | seconds | note |", "| --- | --- | --- | --- |"]
    for r in results:
        note = r.detail.splitlines()[0] if r.detail else r.step.note
        lines.append(f"| {r.step.name} | {r.status} | {r.seconds:.0f} | {note.replace('|', '/')} |")
    tests = [row for r in results for row in r.rows if row["section"] == "tests"]
    if tests:
        counts = {o: sum(t["status"] == o for t in tests) for o in ("passed", "failed", "error", "skipped")}
        lines += ["", "## Tests", "", ", ".join(f"{n} {o}" for o, n in counts.items() if n) + f" (of {len(tests)})."]
        for t in tests:
            if t["status"] != "passed":
                lines.append(f"- {t['status']}: `{t['name']}`: {t['detail']}")
    timing = [row for r in results for row in r.rows if row["section"] == "step_overhead"]
    if timing:
        lines += ["", "## Step time on CUDA", "",
                  "Median ms per `opt.step()`, and manic's as a multiple of its base alone "
                  "(`benchmarks/step_overhead.py`; float32, stacks of 1024x1024 layers).", "",
                  "| params | base | base alone ms | manic ms (x base) | manic compile=True ms (x base) |",
                  "| --- | --- | --- | --- | --- |"]
        for (params, base) in dict.fromkeys((t["params"], t["base"]) for t in timing):
            row = {t["name"]: t for t in timing if t["params"] == params and t["base"] == base}

            def cell(name: str) -> str:
                t = row.get(name)
                return f"{t['ms']:.2f} ({t['ratio']:.2f}x)" if t else "-"

            lines.append(f"| {params / 1e6:.1f}M | {base} | {row[base]['ms']:.2f} | {cell(f'manic({base})')} | "
                         f"{cell(f'manic({base}, compile=True)')} |")
    memory = [row for r in results for row in r.rows if row["section"] == "memory"]
    if memory:
        lines += ["", "## Memory on CUDA", "",
                  "Extra over plain AdamW, as multiples of the parameters' bytes (`benchmarks/memory.py`; peak: "
                  "`torch.cuda.max_memory_allocated` during the steps).", "",
                  "| method | persistent extra | peak extra |", "| --- | --- | --- |"]
        for m in memory:
            if m["status"] == "failed":
                lines.append(f"| {m['name']} | failed: {m['detail']} | |")
            else:
                lines.append(f"| {m['name']} | {m['persistent_extra_x']:.2f}x | {m['peak_extra_x']:.2f}x |")
    not_run = [f"{r.step.name}: {r.status} ({r.detail.splitlines()[0] if r.detail else ''})" for r in results
               if r.status in ("not run", "out of memory")]
    if skipped or not_run:
        lines += ["", "## Not measured", "", *[f"- {s}" for s in [*skipped, *not_run]]]
    return "\n".join(lines) + "\n"


def describe_plan(env: Env, steps: list[Step], skipped: list[str], budget: float) -> str:
    lines = [f"manic GPU check on: {env.describe()}", f"budget: {budget:.0f} s", "plan:"]
    for i, s in enumerate(steps, 1):
        lines.append(f"  {i}. {s.name} (timeout {s.timeout:.0f} s; {s.note}): {shlex.join(s.cmd)}")
    lines += [f"  not measured: {note}" for note in skipped]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check"),
                        help="output directory (default benchmarks/results/gpu_check)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for everything (default 480 on one GPU, 600 on two or more)")
    parser.add_argument("--sizes", type=float, nargs="+", default=SIZES,
                        help="parameter counts of the step-time models (default 8e6 1e8 1e9)")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per method (median reported)")
    parser.add_argument("--skip-tests", action="store_true", help="only the benchmarks")
    parser.add_argument("--skip-bench", action="store_true", help="only the tests")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan for this machine (or the one --assume-* describe) and run nothing")
    parser.add_argument("--assume-gpus", type=int, default=None, help="with --dry-run: plan for this many GPUs")
    parser.add_argument("--assume-gb", type=float, default=None, help="with --dry-run: GiB free on cuda:0")
    parser.add_argument("--_probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if (args.assume_gpus is not None or args.assume_gb is not None) and not args.dry_run:
        parser.error("--assume-gpus and --assume-gb only plan (--dry-run); a real check measures this machine")
    if args.budget is not None and args.budget <= 0:
        parser.error("--budget must be positive")
    if any(n <= 0 for n in args.sizes):
        parser.error("--sizes must be positive")
    return args


NO_CUDA = ("manic GPU check: {env}. This check needs an NVIDIA GPU and a CUDA build of torch "
           "(pip install torch --index-url https://download.pytorch.org/whl/cu124, or your CUDA version); "
           "nvidia-smi should list the GPU. To see the plan without one: --dry-run.")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args._probe:
        print(json.dumps(_probe()))
        return 0
    env = probe()
    if args.dry_run and (args.assume_gpus is not None or args.assume_gb is not None or not env.gpus):
        gpus = args.assume_gpus if args.assume_gpus is not None else max(env.gpus, 1)
        gb = args.assume_gb if args.assume_gb is not None else 80.0
        env = Env(torch=env.torch, cuda_build=env.cuda_build, gpus=gpus, names=[], free_bytes=int(gb * 2**30),
                  total_bytes=int(gb * 2**30), nccl=True, triton=env.triton, assumed=True)
    budget = args.budget or BUDGET[min(max(env.gpus, 1), 2)]
    if not env.gpus:
        print(NO_CUDA.format(env=env.describe()), file=sys.stderr)
        return 2
    steps, skipped = plan(env, args)
    print(describe_plan(env, steps, skipped, budget), flush=True)
    if args.dry_run:
        return 0
    if not steps:
        raise CheckError("nothing to run (--skip-tests and --skip-bench together)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])])
    start = time.monotonic()
    results: list[Result] = []
    for step in steps:
        print(f"== {step.name} ...", flush=True)
        result = execute(step, env, budget - (time.monotonic() - start))
        results.append(result)
        print(f"== {step.name}: {result.status} in {result.seconds:.0f} s"
              + (f"\n{result.detail}" if result.detail and result.status != "passed" else ""), flush=True)
        write_csv(out / "gpu_check.csv", results, skipped)  # after every step: a kill keeps what ran
    text = summary(env, results, skipped, time.monotonic() - start, budget, command)
    (out / "summary.md").write_text(text)
    print(text)
    print(f"wrote {out / 'gpu_check.csv'} and {out / 'summary.md'}")
    ok, _ = verdict(results)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckError as e:
        print(f"manic GPU check: {e}", file=sys.stderr)
        sys.exit(1)
