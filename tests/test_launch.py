"""The launcher under real torchrun (2 CPU processes, gloo) and on one process: end to end, a killed
worker and bitwise resume, resharded resume, clean stops (SIGTERM to run_local.sh, kill -9 of the
torchrun agent), the directory lock, resume messages, retention, --help, plot.py."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "4", "--block-size", "32", "--batch-size", "8",
        "--data-bytes", "300000", "--s-init", "1e-4", "--log-every", "5", "--eval-every", "20", "--eval-batches", "2"]
# As a user runs it: the environment's python and torchrun first on PATH, warnings shown.
USER_ENV = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
USER_ENV.pop("PYTHONWARNINGS", None)
ENV = dict(USER_ENV, PYTHONWARNINGS="ignore")
SINGLE_PROCESS_WARNING = "assuming the intent is to"  # DCP's, silenced by the launcher


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            str(ROOT / "launch" / "train.py"), *TINY, *args]


def single(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "train.py"), *TINY, *args]


def run(cmd: list[str], timeout: int = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def merged(cmd: list[str]) -> str:
    """A run's stdout and stderr in one pipe, in the order a terminal shows them; it must succeed."""
    done = subprocess.run(cmd, cwd=ROOT, env=USER_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    return done.stdout


def start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    """A background run, stdout and stderr merged in order into ``log`` (no pipe to fill up)."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def last_step(out: Path) -> int:
    """The newest step in a live run's metrics.csv (-1 while there is none)."""
    try:
        return max(int(r["step"]) for r in rows(out))
    except (OSError, ValueError, TypeError):
        return -1


def final(out: Path) -> dict:
    return torch.load(out / "final.pt", weights_only=True)


def same_final(a: Path, b: Path) -> None:
    fa, fb = final(a), final(b)
    assert fa["scale"] == fb["scale"]
    assert fa["model"].keys() == fb["model"].keys()
    assert all(torch.equal(fa["model"][k], fb["model"][k]) for k in fa["model"])


def wait_for(predicate, timeout: float = 120.0) -> float:
    """Seconds until ``predicate()`` held."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)
    return time.monotonic() - t0


def _stat(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def children(pid: int) -> list[int]:
    return sorted(int(p.name) for p in Path("/proc").iterdir()
                  if p.name.isdigit() and (_stat(int(p.name))[1:2] or [None])[0] == str(pid))


def descendants(pid: int) -> list[int]:
    out = []
    for c in children(pid):
        out += [c, *descendants(c)]
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def torchrun_agent(pid: int) -> int | None:
    """The torchrun process among ``pid``'s descendants, once it has started its two workers."""
    for d in descendants(pid):
        if any(Path(a).name == "torchrun" for a in cmdline(d)[:2]) and len(children(d)) == 2:
            return d
    return None


def local_rank(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(e for e in environ if e.startswith(b"LOCAL_RANK=")).split(b"=")[1])


def lines(text: str) -> list[str]:
    return re.split(r"[\r\n]", text)


def closing_line(text: str, prefix: str) -> str:
    """The one line starting with ``prefix``: on a line of its own (not on the end of the
    progress bar), and with no progress bar drawn after it."""
    found = [ln for ln in text.split("\n") if ln.startswith(prefix)]
    assert len(found) == 1, text[-3000:]
    assert "train:" not in text[text.index(found[0]):], text[-3000:]
    return found[0]


STOPPED = re.compile(r"stopped by signal at step (\d+)( \(the torchrun agent died\))?(?:, val loss [\d.]+)?, "
                     r"checkpoint at (\S+), resume with: (.+)")


@pytest.mark.timeout(60)
def test_help_without_distributed():
    done = run([sys.executable, "launch/train.py", "--help"], timeout=60)
    assert done.returncode == 0 and "--parallel" in done.stdout and "--resume" in done.stdout
    assert "--keep-last" in done.stdout and "docs/launcher.md" in done.stdout
    options = re.split(r"\n  (?=-)", done.stdout.split("options:")[1])
    assert len(options) > 30
    twice = [o.split()[0] for o in options if o.count("(default") > 1]
    assert not twice, twice  # e.g. "(default: OUT_DIR/checkpoints) (default: None)"
    wrapped = subprocess.run([str(ROOT / "launch" / "run_local.sh"), "--help"], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=60)
    assert wrapped.returncode == 0 and wrapped.stdout == done.stdout


@pytest.mark.timeout(60)
def test_docs_list_every_option():
    sys.path.insert(0, str(ROOT / "launch"))
    from config import build_parser

    doc = (ROOT / "docs" / "launcher.md").read_text()
    options = [a.option_strings[0] for a in build_parser()._actions if a.option_strings[0] != "-h"]
    assert [o for o in options if f"| `{o}`" not in doc] == []


@pytest.mark.timeout(600)
def test_end_to_end_kill_and_resume(tmp_path):
    """Uninterrupted run; a run whose worker is killed with -9 after a checkpoint; --resume of
    it: the final parameters and scale equal the uninterrupted run's bitwise."""
    steps = ["--steps", "120", "--ckpt-every", "40", "--keep-last", "0"]
    full = tmp_path / "full"
    done = run(torchrun(2, *steps, "--out-dir", str(full)))
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = rows(full)
    assert (full / "metrics.png").stat().st_size > 0 and (full / "checkpoints" / "step_00000040" / "COMPLETE").exists()
    assert float(metrics[-1]["train_loss"]) < 0.8 * float(metrics[0]["train_loss"])  # it learns
    assert float(metrics[-1]["scale"]) > 1e-3 and metrics[-1]["val_loss"]
    # the effective lr is S * lr on every row (both written with 6 significant digits)
    assert list(metrics[0]) == ["step", "train_loss", "val_loss", "lr", "scale", "effective_lr", "step_time"]
    assert all(float(r["effective_lr"]) == pytest.approx(float(r["scale"]) * float(r["lr"]), rel=2e-5)
               for r in metrics)
    f = final(full)
    assert f["steps"] == 120 and f["val_loss"] == pytest.approx(float(metrics[-1]["val_loss"]), abs=1e-5)
    assert f["model_config"]["n_layer"] == 2 and f["config"]["steps"] == 120
    sys.path.insert(0, str(ROOT / "launch"))
    from model import GPT, GPTConfig  # final.pt rebuilds the model as docs/launcher.md says

    GPT(GPTConfig(**f["model_config"])).load_state_dict(f["model"])

    killed = tmp_path / "killed"
    proc = subprocess.Popen(torchrun(2, *steps, "--out-dir", str(killed)), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (killed / "checkpoints" / "step_00000040" / "COMPLETE").exists())
        os.kill(next(w for w in children(proc.pid) if local_rank(w) == 1), signal.SIGKILL)
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert rc != 0  # torchrun reports the dead worker
    assert not (killed / "final.pt").exists()
    resumed = run(torchrun(2, *steps, "--out-dir", str(killed), "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_final(full, killed)

    # resuming the step-40 checkpoint on one process (DCP reshards 2 -> 1) works too
    one = tmp_path / "one"
    shutil.copytree(full / "checkpoints" / "step_00000040", one / "checkpoints" / "step_00000040")
    done = run(single(*steps, "--out-dir", str(one), "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert abs(float(rows(one)[-1]["val_loss"]) - float(metrics[-1]["val_loss"])) < 0.5


@pytest.mark.timeout(240)
def test_signal_stop_lock_and_agent_death(tmp_path):
    """run_local.sh: a second run into the held directory is refused naming the holder; SIGTERM
    stops with one line and a checkpoint, the workers and the script exit 128 + SIGTERM (stopped, not
    finished); a run without --resume is then refused; the printed resume
    command resumes; kill -9 of its torchrun agent stops the workers within seconds with a
    checkpoint; the directory is then free."""
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    endless = [*TINY, "--steps", "100000", "--ckpt-every", "0"]
    procs: list[subprocess.Popen] = []
    workers: list[int] = []
    try:
        a = start([str(ROOT / "launch" / "run_local.sh"), *endless], tmp_path / "a.log",
                  dict(USER_ENV, OUT_DIR=str(out), NPROC="2"))
        procs.append(a)
        wait_for(lambda: (out / ".lock").exists() and (out / ".lock").read_text().endswith("\n"))
        holder = json.loads((out / ".lock").read_text())
        agent = torchrun_agent(a.pid)
        workers += children(agent)
        assert holder["pid"] in workers and "run_local.sh" in holder["command"]

        # A second run (plain torchrun, 2 ranks) into the held directory: one line, holder named.
        b = run(torchrun(2, "--steps", "50", "--out-dir", str(out), "--resume"), env=USER_ENV)
        wait_for(lambda: last_step(out) >= 5)
        said = b.stdout + b.stderr
        assert b.returncode != 0
        assert said.count("refusing to start") == 1, said
        assert f"{out.resolve()} is in use by pid {holder['pid']} on host {socket.gethostname()}" in said
        assert "run_local.sh" in said and "manic launcher: fsdp2" not in said  # it did not start
        assert said.count("Traceback") <= 1  # torchrun's own failure report; none from the workers
        assert json.loads((out / ".lock").read_text()) == holder

        # SIGTERM to the wrapper: one line, a complete checkpoint, exit 128 + 15 (the workers' status too,
        # which torchrun reports in its one traceback; none from the workers).
        a.send_signal(signal.SIGTERM)
        assert a.wait(timeout=120) == 128 + signal.SIGTERM
        said = (tmp_path / "a.log").read_text()
        assert said.count("Traceback") == 1 and "ChildFailedError" in said, said[-3000:]
        assert stopped_by_sigterm(said), said[-3000:]
        assert "Error" not in said.split("Traceback")[0], said[-3000:]
        stop = STOPPED.fullmatch(closing_line(said, "stopped by signal"))
        n = int(stop[1])
        assert stop[3] == str(ckpts / f"step_{n:08d}") and (ckpts / f"step_{n:08d}" / "COMPLETE").exists()
        assert stop[2] is None and stop[4].endswith(" --resume") and "run_local.sh" in stop[4]
        # Without --resume, an unfinished run's directory is refused (here: the check before torchrun).
        refused = run([sys.executable, "launch/rundir.py", "--out-dir", str(out)])
        assert refused.returncode == 1 and refused.stderr.strip() == (
            f"manic launcher: refusing to start: {ckpts} holds the checkpoints of an unfinished run (latest: step "
            f"{n}); add --resume to continue it, or remove them / choose another --out-dir")

        # The printed command resumes; kill -9 of its torchrun agent stops the workers with a checkpoint.
        r = start(["bash", "-c", stop[4]], tmp_path / "r.log", USER_ENV)
        procs.append(r)
        wait_for(lambda: last_step(out) > n)
        agent = torchrun_agent(r.pid)
        workers += children(agent)
        os.kill(agent, signal.SIGKILL)
        gone = wait_for(lambda: not any(alive(w) for w in children(agent) + workers), timeout=30)
        assert gone < 10, f"workers outlived their torchrun agent by {gone:.1f} s"
        assert r.wait(timeout=30) == 128 + signal.SIGKILL  # run_local.sh passes on torchrun's fate
        said = (tmp_path / "r.log").read_text()
        assert f"resuming from {ckpts / f'step_{n:08d}'} (step {n})" in said
        stop = STOPPED.fullmatch(closing_line(said, "stopped by signal"))
        m = int(stop[1])
        assert m > n and stop[2] and (ckpts / f"step_{m:08d}" / "COMPLETE").exists()

        # No stale lock: the directory is free at once (the check run_local.sh makes before torchrun).
        free = run([sys.executable, "launch/rundir.py", "--out-dir", str(out), "--resume"])
        assert free.returncode == 0 and not free.stderr, free.stderr
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for w in workers:
            if alive(w):
                os.kill(w, signal.SIGKILL)


def stopped_by_sigterm(log: str) -> bool:
    """torchrun's report: the first failure it saw is a worker's exit 128 + SIGTERM, and every worker it
    names exited so (or was ended by the SIGTERM torchrun sends the rest, once the Python that handles it
    has shut down: -15)."""
    codes = re.findall(r"exitcode\s*: (-?\d+)", log)
    root = log.split("Root Cause")[-1]
    return f"exitcode  : {128 + signal.SIGTERM} " in root and set(codes) <= {str(128 + signal.SIGTERM),
                                                                          str(-signal.SIGTERM)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_processes(marker: str) -> list[int]:
    """Live processes whose command line holds ``marker`` (a test's own output directory)."""
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and int(p.name) != os.getpid() and alive(int(p.name))
            and any(marker in a for a in cmdline(int(p.name)))]


def node(port: int, run_id: str, *args: str) -> list[str]:
    """One "node" of a two-node job on this machine: a torchrun agent with 2 workers, c10d rendezvous."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
            "--max-restarts", "0", str(ROOT / "launch" / "train.py"), *TINY, "--parallel", "hsdp", *args]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.timeout(150)
def test_two_nodes_one_agent_killed(tmp_path):
    """Two torchrun agents on this machine ("nodes", c10d rendezvous on 127.0.0.1), HSDP over 4 ranks,
    collective timeout 10 s. kill -9 of the agent that does not host the rendezvous: its workers get
    SIGTERM (parent death), the ranks agree on it and save one checkpoint, and every worker exits
    128 + SIGTERM, so the other agent ends too instead of waiting in torchrun's exit barrier for the
    dead one (as it did when the workers exited 0). Nothing of the job is left within the collective
    timeout plus 5 s; --resume continues from the checkpoint to the end."""
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    args = ["--steps", "30", "--ckpt-every", "0", "--timeout", "10", "--out-dir", str(out)]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    port = free_port()
    agents = [start(node(port, tmp_path.name, *args), logs[0], ENV)]
    try:
        wait_for(lambda: listening(port) or agents[0].poll() is not None, timeout=60)  # node 0 hosts the store
        agents.append(start(node(port, tmp_path.name, *args), logs[1], ENV))
        wait_for(lambda: last_step(out) >= 5, timeout=90)
        assert len(job_processes(str(out))) == 2 + 4  # two agents, four workers
        os.kill(agents[1].pid, signal.SIGKILL)
        gone = wait_for(lambda: not job_processes(str(out)), timeout=30)
        assert gone < 10 + 5, f"the job outlived the agent's kill by {gone:.1f} s"
        assert agents[0].wait(timeout=5) != 0  # torchrun reports the workers' exit
        said = logs[0].read_text() + logs[1].read_text()
        assert stopped_by_sigterm(logs[0].read_text()), logs[0].read_text()[-3000:]
        stop = STOPPED.fullmatch(closing_line(said, "stopped by signal"))
        n = int(stop[1])
        assert (ckpts / f"step_{n:08d}" / "COMPLETE").exists() and 5 <= n < 30
        assert not (out / "final.pt").exists()

        # --resume continues from that checkpoint (here on one process, which DCP reshards to: the same
        # two nodes would resume as well, test_end_to_end_kill_and_resume shows that bitwise on 2 ranks)
        resumed = run(single(*args, "--resume"), timeout=90)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resuming from {ckpts / f'step_{n:08d}'} (step {n})" in resumed.stdout, resumed.stdout[-3000:]
        assert final(out)["steps"] == 30 and last_step(out) == 30
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
        for pid in job_processes(str(out)):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(120)
def test_one_process_stopped_by_ctrl_c_exits_130(tmp_path):
    """Without torchrun: SIGINT saves a checkpoint, prints the line and exits 128 + SIGINT."""
    out = tmp_path / "run"
    proc = start(single("--steps", "100000", "--ckpt-every", "0", "--out-dir", str(out)), tmp_path / "log", ENV)
    try:
        wait_for(lambda: last_step(out) >= 5, timeout=90)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 128 + signal.SIGINT
    finally:
        proc.kill()
    stop = STOPPED.fullmatch(closing_line((tmp_path / "log").read_text(), "stopped by signal"))
    assert (out / "checkpoints" / f"step_{int(stop[1]):08d}" / "COMPLETE").exists()


def test_device_choice(monkeypatch):
    """One GPU per process: cuda:LOCAL_RANK, or a refusal that names the fix when a node starts more
    processes than it has GPUs (every local rank refuses at once; the message once, from local rank 0)."""
    sys.path.insert(0, str(ROOT / "launch"))
    import parallel

    choose = parallel.choose_device
    assert choose("auto", 1, 2, cuda_available=False, gpus=0) == torch.device("cpu")
    assert choose("cpu", 1, 2, cuda_available=True, gpus=2) == torch.device("cpu")
    assert choose("auto", 1, 2, cuda_available=True, gpus=2) == torch.device("cuda", 1)
    assert choose("cuda", 3, 4, cuda_available=True, gpus=8) == torch.device("cuda", 3)
    for device, local_rank in (("auto", 0), ("auto", 1), ("cuda", 0)):
        with pytest.raises(SystemExit) as info:
            choose(device, local_rank, 2, cuda_available=True, gpus=1)
        text = str(info.value)
        assert "2 processes on this node but 1 CUDA device(s)" in text
        assert "--nproc-per-node 1" in text and "--device cpu" in text
    with pytest.raises(SystemExit, match="--device cuda, but .* finds no CUDA device; .* --device cpu"):
        choose("cuda", 0, 1, cuda_available=False, gpus=0)
    with pytest.raises(SystemExit, match="--device must be auto, cpu or cuda"):
        choose("gpu", 0, 1, cuda_available=True, gpus=1)

    # setup() on a one-GPU machine under torchrun --nproc-per-node 2 (torch's answers faked on the CPU):
    # it refuses before it touches a device or the process group
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail(f"set_device({d})"))
    for local_rank, code in (("0", "2 processes on this node but 1 CUDA device(s)"), ("1", 1)):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", local_rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(SystemExit) as info:
            parallel.setup("auto", 10)
        assert info.value.code == code if code == 1 else code in str(info.value.code)


@pytest.mark.timeout(180)
def test_resume_messages_retention_and_finished_run(tmp_path):
    """One process: --resume into an empty directory says so; --keep-last keeps the newest complete
    checkpoints and the one resumed from, and drops a checkpoint cut short; a finished run is left
    as it is by --resume and started over without it; DCP's single-process warning is not shown;
    the progress display closes before the closing line."""
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    cut_short = ckpts / "step_00000001"
    cut_short.mkdir(parents=True)
    (cut_short / "__0_0.distcp").write_bytes(b"killed while writing")
    every = ["--out-dir", str(out), "--ckpt-every", "3"]

    def names() -> list[str]:
        return sorted(p.name for p in ckpts.glob("step_*"))

    first = merged(single(*every, "--steps", "12", "--keep-last", "2", "--resume"))
    assert f"no complete checkpoint in {ckpts}: starting from step 0" in first
    assert names() == ["step_00000009", "step_00000012"]
    assert SINGLE_PROCESS_WARNING not in first
    assert re.search(r"val=\d", first)  # the latest validation loss, in the bar
    assert re.fullmatch(r"done: step 12, train loss [\d.]+, val loss [\d.]+, scale [\d.e-]+; wrote .*final\.pt",
                        closing_line(first, "done:"))

    second = merged(single(*every, "--steps", "21", "--keep-last", "1", "--resume"))
    assert f"resuming from {ckpts / 'step_00000012'} (step 12)" in second
    assert names() == ["step_00000012", "step_00000021"]  # the newest, and the one resumed from
    assert SINGLE_PROCESS_WARNING not in second

    files = [*sorted((ckpts / "step_00000021").iterdir()), out / "final.pt", out / "metrics.csv"]
    before = [(p, p.stat().st_mtime_ns) for p in files]
    third = merged(single(*every, "--steps", "21", "--resume"))
    assert f"already finished: {ckpts / 'step_00000021'} is at step 21" in third
    assert [(p, p.stat().st_mtime_ns) for p in files] == before and names() == ["step_00000012", "step_00000021"]

    # Without --resume, a finished run is started over (an unfinished one is refused: the test above).
    again = merged(single(*every, "--steps", "3"))
    assert (f"starting over: removed the finished earlier run's checkpoints (up to step 21) from {ckpts}"
            in again) and names() == ["step_00000003"] and len(rows(out)) == 1


@pytest.mark.timeout(120)
def test_without_mechanic_the_effective_lr_is_the_lr(tmp_path):
    out = tmp_path / "run"
    done = run(single("--out-dir", str(out), "--steps", "10", "--ckpt-every", "0", "--no-mechanic"), timeout=110)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = rows(out)
    assert [r["step"] for r in metrics] == ["5", "10"]
    assert all(r["scale"] == "" and r["effective_lr"] == r["lr"] for r in metrics), metrics
    assert (out / "metrics.png").stat().st_size > 0


@pytest.mark.timeout(120)
def test_runs_without_the_optional_packages(tmp_path):
    """Without tqdm and matplotlib (each made unimportable) the launcher trains, writes metrics.csv and
    final.pt, says how to get the figure, and exits 0."""
    blocked = tmp_path / "blocked"
    (blocked / "matplotlib").mkdir(parents=True)
    for module in (blocked / "tqdm.py", blocked / "matplotlib" / "__init__.py"):
        module.write_text("raise ImportError('blocked by the test')\n")
    out = tmp_path / "run"
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(blocked), ENV.get("PYTHONPATH", "")]))
    done = run(single("--out-dir", str(out), "--steps", "10", "--ckpt-every", "0"), timeout=110, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in rows(out)] == ["5", "10"] and (out / "final.pt").exists()
    assert not (out / "metrics.png").exists()
    assert "pip install matplotlib" in done.stdout, done.stdout[-2000:]


@pytest.mark.timeout(60)
def test_plot_regenerates_png(tmp_path):
    """From the CSV the launcher writes, and from one written before it had an effective_lr column."""
    for name, header, extra in (("run", "step,train_loss,val_loss,lr,scale,effective_lr,step_time", ("1e-8,", "1e-6,")),
                                ("old", "step,train_loss,val_loss,lr,scale,step_time", ("", ""))):
        out = tmp_path / name
        out.mkdir()
        (out / "metrics.csv").write_text(f"{header}\n5,3.0,,0.001,1e-5,{extra[0]}0.1\n"
                                         f"10,2.5,2.6,0.001,1e-3,{extra[1]}0.1\n")
        done = run([sys.executable, "launch/plot.py", str(out)], timeout=50)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (out / "metrics.png").stat().st_size > 0
