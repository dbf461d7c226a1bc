"""Multi-process training (``--dist ddp|fsdp``) on the CPU with gloo: 2 processes follow the
1-process trajectory on the same global batch, ranks whose data halts at different loops stay in
lockstep, router biases agree, checkpoints resume across world sizes and export, bad input is
refused before any step.

One torchrun launch (this file run as a script, ``worker``) does every 2-process part in one
process group; the pytest process holds the 1-process references.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from mythos.train import TrainConfig, Trainer
from mythos.train import distributed as D
from mythos.train.checkpoint import latest_checkpoint, list_checkpoints

STEPS = 5
# ACT on, 6 loops of which the last 3 keep gradients, every graph iteration recomputed in backward
RUN = dict(config="tiny", task="pointer", steps=STEPS, batch_size=4, seq_len=16, warmup=1,
           decay_steps=STEPS, eval_every=0, save_every=3, n_loops=6, grad_loops=3,
           checkpoint_activations=True, bias_update_rate=0.01, keep=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(rows: list[dict]) -> list[float]:
    return [r["loss"] for r in rows if "loss" in r]


def _biases(model) -> torch.Tensor:
    from mythos.train import moe_layers

    return torch.stack([m.router_bias.detach().cpu().clone() for m in moe_layers(model)])


# -- the worker: run under torchrun ----------------------------------------------------------

def worker(out: str, resume_from: str) -> None:
    """Every 2-process scenario; rank 0 writes OUT/result.json and OUT/<strategy>.pt."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    res = {}
    for strategy in D.STRATEGIES:
        tr = Trainer(TrainConfig(**RUN, dist=strategy, out=os.path.join(out, strategy)))
        halts = []   # per step: the first loop where this rank's own rows had all halted (0: none)
        seen = {"t": 0, "first": 0}

        def probe(cum_p, thr):
            # rank 1 votes "all halted" from loop 2 on, as if its rows halted early; rank 0 votes
            # on its real rows: the agreed decision must keep both looping like one process
            seen["t"] += 1
            if tr.ctx.rank == 1 and seen["t"] >= 2:
                cum_p = torch.ones_like(cum_p)
            if not seen["first"] and bool((cum_p >= thr).all()):
                seen["first"] = seen["t"]
            return D.halt_reducer(cum_p, thr)

        tr.model.recurrent.halt_reducer = probe
        rows = []
        while tr.step < STEPS:
            seen.update(t=0, first=0)
            rows.append(tr.train_step())
            halts.append(seen["first"])
            if tr.step == 3:
                tr.save()
        tr.save()
        own = torch.tensor(halts)
        every = [torch.zeros_like(own) for _ in range(tr.ctx.world)]
        dist.all_gather(every, own)
        bias = _biases(tr.model)
        biases = [torch.zeros_like(bias) for _ in range(tr.ctx.world)]
        dist.all_gather(biases, bias)
        full = get_model_state_dict(tr.model, options=StateDictOptions(full_state_dict=True,
                                                                       cpu_offload=True))
        if tr.is_main:
            torch.save({k: v.clone() for k, v in full.items()}, os.path.join(out, f"{strategy}.pt"))
            res[strategy] = {"losses": _losses(rows), "loops_run": [r["loops_run"] for r in rows],
                             "local_halts": [e.tolist() for e in every],
                             "biases_equal": all(torch.equal(b, biases[0]) for b in biases),
                             "bias": biases[0].tolist()}
        dist.barrier()
    # a 1-process (world 1) DCP checkpoint resumed on 2 processes
    from mythos.train.trainer import resume_trainer

    tr = resume_trainer(resume_from, {"dist": "fsdp", "steps": 4})
    row = tr.train_step()
    if tr.is_main:
        res["resume_1to2"] = {"step": tr.step, "loss": row["loss"]}
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(res, f)
    D.teardown()


# -- the tests -------------------------------------------------------------------------------

def _world1(monkeypatch) -> None:
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 1-process reference, a world-1 DCP checkpoint, then the 2-process worker."""
    tmp = tmp_path_factory.mktemp("dist")
    torch.set_num_threads(1)
    ref = Trainer(TrainConfig(**RUN, out=str(tmp / "ref")))
    ref_rows, ref_bias = [], []
    while ref.step < STEPS:
        ref_rows.append(ref.train_step())
        ref_bias.append(_biases(ref.model))
        if ref.step == 3:
            ref.save()
    # world size 1 under --dist (DCP checkpoint at step 3), in this process
    mp = pytest.MonkeyPatch()
    _world1(mp)
    try:
        one = Trainer(TrainConfig(**{**RUN, "steps": 3}, dist="ddp", out=str(tmp / "one")))
        while one.step < 3:
            one.train_step()
        one.save()
    finally:
        D.teardown()
        mp.undo()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), __file__, "worker", str(tmp), str(tmp / "one")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    with open(tmp / "result.json") as f:
        res = json.load(f)
    return {"tmp": tmp, "ref": ref, "ref_rows": ref_rows, "ref_bias": ref_bias, "res": res}


@pytest.mark.parametrize("strategy", D.STRATEGIES)
def test_two_processes_follow_one(runs, strategy):
    res, ref = runs["res"][strategy], runs["ref"]
    assert len(res["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(_losses(runs["ref_rows"])),
                               rtol=1e-5, atol=1e-6)
    assert res["loops_run"] == [r["loops_run"] for r in runs["ref_rows"]]
    final = torch.load(runs["tmp"] / f"{strategy}.pt", weights_only=True)
    own = ref.model.state_dict()
    assert set(final) == set(own)
    for k in own:
        torch.testing.assert_close(final[k], own[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("strategy", D.STRATEGIES)
def test_ranks_halting_apart_stay_in_lockstep(runs, strategy):
    """Rank 1 votes to stop at loop 2 while rank 0's rows halt later: the run finished, with the
    1-process losses, loop counts and parameters (test_two_processes_follow_one, same run)."""
    halts = runs["res"][strategy]["local_halts"]
    assert halts[0] != halts[1], halts


@pytest.mark.parametrize("strategy", D.STRATEGIES)
def test_router_bias_identical_on_every_rank(runs, strategy):
    res = runs["res"][strategy]
    assert res["biases_equal"]
    bias = torch.tensor(res["bias"])
    assert bias.abs().max() > 0   # it did move
    torch.testing.assert_close(bias, runs["ref_bias"][-1])


def test_resume_across_world_sizes(runs, tmp_path):
    ref_losses = _losses(runs["ref_rows"])
    # 2 -> 1: the fsdp run's step-3 DCP checkpoint, resumed in one process
    fs = runs["tmp"] / "fsdp"
    (step, path), = [c for c in list_checkpoints(str(fs)) if c[0] == 3]
    tr = Trainer(TrainConfig(**RUN, out=str(tmp_path / "r")))
    tr.load(path)
    assert tr.step == 3
    row = tr.train_step()
    assert row["loss"] == pytest.approx(ref_losses[3], rel=1e-5)
    # 1 -> 2: the world-1 checkpoint resumed by the worker on 2 processes
    r12 = runs["res"]["resume_1to2"]
    assert r12["step"] == 4
    assert r12["loss"] == pytest.approx(ref_losses[3], rel=1e-5)


def test_export_matches_single_process_format(runs, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "m.safetensors"
    D.export_safetensors(latest_checkpoint(str(runs["tmp"] / "fsdp")), str(out))
    got = load_file(str(out))
    want = load_file(os.path.join(latest_checkpoint(str(runs["tmp"] / "ref")), "model.safetensors"))
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k


# -- bad input --------------------------------------------------------------------------------

def test_dist_without_torchrun_is_a_clear_error(monkeypatch, tmp_path, capsys):
    from mythos.train.cli import main

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(SystemExit) as e:
        main(["--dist", "fsdp", "--steps", "1", "--out", str(tmp_path / "x"), "--no-progress"])
    assert e.value.code == 2
    assert "torchrun" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_unknown_strategy(tmp_path, capsys):
    from mythos.train.cli import main

    with pytest.raises(SystemExit):
        main(["--dist", "zero3", "--out", str(tmp_path / "x")])
    assert "--dist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="dist must be one of"):
        TrainConfig(task="pointer", dist="zero3").validate()


def test_world_size_not_dividing_batch(monkeypatch):
    import torch.distributed as dist

    _world1(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="batch-size 4 .* world size 3"):
        Trainer(TrainConfig(**RUN, dist="ddp"))
    assert not dist.is_initialized()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    torch.set_num_threads(1)
    worker(sys.argv[2], sys.argv[3])
