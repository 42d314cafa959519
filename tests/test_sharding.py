"""Sweeps beyond one process: the run lock as a claim (re-entrant, stale takeover), shard
order, two shard processes sharing one sweep, a dead shard's run resumed by the next, and
`--gpus N` worker processes on CPU devices."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.vtab import run
from benchmarks.vtab.shard import claim, parse_shard, shard_order
from benchmarks.vtab.tiny import make_tiny_vtab
from sds_vision.train.config import TrainError
from sds_vision.train.lock import FolderLock

ROOT = Path(__file__).resolve().parents[1]


COMMON = ["--seeds", "0", "--model", "test_vit", "--epochs", "1", "--img-size", "32",
          "--batch-size", "8", "--no-pretrained", "--num-workers", "0", "--threads", "1",
          "--expect-sizes", "8", "2", "10", "--no-report"]


def write_lock(folder: Path, pid: int, host: str | None = None, age_s: float = 0.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    lock.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid,
                                "started": time.time() - age_s}))
    if age_s:
        os.utime(lock, (time.time() - age_s, time.time() - age_s))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_shard_order_covers_the_plan_once():
    for n, count in [(1, 1), (7, 3), (19, 4), (3, 5), (76, 8)]:
        plan = list(range(n))
        orders = [shard_order(plan, i, count) for i in range(count)]
        assert all(sorted(o) == plan for o in orders)
        firsts = [o[:len(plan) * (i + 1) // count - len(plan) * i // count]
                  for i, o in enumerate(orders)]
        assert sum(firsts, []) == plan        # own blocks first: together, the plan in order
    assert shard_order(list(range(6)), 0, 3) == [0, 1, 3, 2, 5, 4]  # then others from their ends
    assert parse_shard("1/4") == (1, 4) and parse_shard(" 0 / 1 ") == (0, 1)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="expected I/N"):
            parse_shard(bad)


def test_claim_is_the_run_lock(tmp_path):
    d = tmp_path / "run"
    with claim(d) as holder:
        assert holder is None and (d / ".lock").is_file()
        with FolderLock(d):                       # fit locks the folder it was given: nested
            pass
        assert (d / ".lock").is_file()           # ... and the claim still holds it
    assert not (d / ".lock").exists()

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        write_lock(d, sleeper.pid)                # a live process on this host holds it
        with claim(d) as holder:
            assert holder["pid"] == sleeper.pid
        with pytest.raises(TrainError, match=f"in use by another run \\(pid {sleeper.pid}"):
            FolderLock(d).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with claim(d) as holder:                      # its process died: stale, taken over
        assert holder is None
        assert json.loads((d / ".lock").read_text())["pid"] == os.getpid()

    write_lock(d, 1, host="other-node")           # another node, fresh heartbeat: held
    with claim(d) as holder:
        assert holder["host"] == "other-node"
    write_lock(d, 1, host="other-node", age_s=3600)  # heartbeat an hour old: stale
    with claim(d) as holder:
        assert holder is None

    # breaking a stale lock removes only the lock that was judged stale
    write_lock(d, 1, host="other-node", age_s=3600)
    lock = FolderLock(d)
    stale = lock.holder()
    write_lock(d, 2, host="other-node")           # someone else took it meanwhile
    lock._break_stale(stale)
    assert json.loads((d / ".lock").read_text())["pid"] == 2
    assert not (d / ".lock.break").exists()


def _contend(folder, barrier, results) -> None:
    barrier.wait()  # every contender finds the same stale lock at the same moment
    lock = FolderLock(folder)
    won = lock.try_acquire()
    if won:
        time.sleep(0.2)  # hold it while the others look
    results.put(won)
    if won:
        lock.release()


def test_one_winner_when_processes_race_for_a_stale_lock(tmp_path):
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    for trial in range(4):
        d = tmp_path / f"t{trial}"
        write_lock(d, dead_pid())
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_contend, args=(d, barrier, results)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
        assert sum(results.get(timeout=5) for _ in procs) == 1


@pytest.mark.slow
def test_two_shards_share_a_sweep_and_a_dead_shard_is_resumed(tmp_path, capsys):
    data = make_tiny_vtab(tmp_path / "data", {"cifar": 4, "kitti": 4}, sizes=(8, 2, 6))
    out = tmp_path / "runs"
    argv = ["--data-root", str(data), "--tasks", "cifar", "kitti", "--methods", "lora",
            "linear", "--out", str(out), *COMMON]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = str(ROOT / "benchmarks" / "vtab" / "run.py")
    shards = [subprocess.Popen([sys.executable, script, *argv, "--shard", f"{i}/2"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, cwd=ROOT) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in shards]
    assert [p.returncode for p in shards] == [0, 0], logs
    assert "shard 1/2: starts with runs 3-4 of the plan" in logs[1]
    trained = [line.split()[1:3] for log in logs for line in log.splitlines()
               if line.startswith("[") and " top1 " in line]
    # every (task, method) trained exactly once across the two shards
    assert sorted(map(tuple, trained)) == [("cifar", "linear"), ("cifar", "lora"),
                                           ("kitti", "linear"), ("kitti", "lora")], logs
    assert not list(out.rglob(".lock*"))
    finals = {(t, m): json.loads((out / "final" / t / m / "seed0/final_metrics.json").read_text())
              for t in ("cifar", "kitti") for m in ("lora", "linear")}

    # a shard killed after its last checkpoint left a lock (dead pid) and no final metrics;
    # another run is held right now by a live process
    dead, held = out / "final/kitti/lora/seed0", out / "final/cifar/linear/seed0"
    for d in (dead, held):
        (d / "final_metrics.json").unlink()
    write_lock(dead, dead_pid())
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        write_lock(held, sleeper.pid)
        assert run.main([*argv, "--shard", "1/2"]) == 0
        log = capsys.readouterr().out
        assert "2 finished (skipped), 2 to run" in log
        assert f"cifar                linear   seed 0  skipped: run by another process (pid " \
               f"{sleeper.pid}" in log
        assert "1 run(s) left to the processes that hold them" in log
        again = json.loads((dead / "final_metrics.json").read_text())
        assert again["val_top1"] == finals[("kitti", "lora")]["val_top1"]
        assert json.loads((dead / "config.json").read_text())["resumed_from_step"] == \
            again["steps"]                        # resumed from its checkpoint, not retrained
        assert not (held / "final_metrics.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run.main([*argv, "--shard", "0/2"]) == 0  # its holder is gone: now it runs
    assert "[1/1] cifar                linear   seed 0  top1" in capsys.readouterr().out
    assert (held / "final_metrics.json").is_file() and not list(out.rglob(".lock*"))


@pytest.mark.slow
def test_gpus_n_runs_cpu_worker_processes(tmp_path, capsys):
    data = make_tiny_vtab(tmp_path / "data", {"dtd": 4, "eurosat": 4}, sizes=(8, 2, 6))
    base = ["--data-root", str(data), "--tasks", "dtd", "eurosat", "--methods", "lora", *COMMON]
    assert run.main([*base, "--out", str(tmp_path / "here")]) == 0
    capsys.readouterr()
    assert run.main([*base, "--out", str(tmp_path / "workers"), "--gpus", "2",
                     "--device", "cpu"]) == 0
    log = capsys.readouterr().out
    lines = [line for line in log.splitlines() if line.startswith("[")]
    assert len(lines) == 2 and all("top1" in x and "(worker " in x for x in lines), log
    for task in ("dtd", "eurosat"):
        here, there = (json.loads((tmp_path / o / "final" / task / "lora/seed0/final_metrics.json")
                                  .read_text()) for o in ("here", "workers"))
        assert there["val_top1"] == here["val_top1"]            # same run, another process
        assert there["train_loss"] == pytest.approx(here["train_loss"], rel=1e-6)
        config = json.loads((tmp_path / "workers/final" / task / "lora/seed0/config.json")
                            .read_text())
        assert config["device"] == "cpu" and config["threads"] == 1
    assert run.main([*base, "--out", str(tmp_path / "x"), "--device", "cuda"]) == \
        (2 if not torch.cuda.is_available() else 0)


def test_slurm_array_script_passes_its_shard(tmp_path):
    """scripts/vtab_slurm.sbatch as array task 2 of --array=1-3 (a dry run of the plan)."""
    data = make_tiny_vtab(tmp_path / "data", {"dtd": 4}, sizes=(8, 2, 6))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLURM_SUBMIT_DIR": str(ROOT),
           "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3",
           "SLURM_GPUS_ON_NODE": "1", "DATA": str(data), "OUT": str(tmp_path / "runs"),
           "MODEL": "test_vit", "EXTRA": "--tasks dtd --no-pretrained --dry-run --expect-sizes 8 2 10"}
    proc = subprocess.run(["bash", str(ROOT / "scripts/vtab_slurm.sbatch")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "plan: 6 runs (1 tasks x 2 methods x 3 seeds)" in proc.stdout
    del env["SLURM_ARRAY_TASK_COUNT"]
    proc = subprocess.run(["bash", str(ROOT / "scripts/vtab_slurm.sbatch")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "run this script as a job array" in proc.stderr
