"""mythos.train.init_weights: the open-mythos scheme leaves the constructor's weights, fan-in
draws each projection at 1/fan_in variance and the embedding at unit variance; the Trainer's
``init`` setting, ``--init`` on the command line and a user's own task object."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_kwargs

from mythos import MythosConfig, OpenMythos
from mythos.modules import MoEFFN
from mythos.train import INIT_SCHEMES, PointerTask, TrainConfig, Trainer, init_weights
from mythos.train.cli import main


def _model(seed=0, **over):
    torch.manual_seed(seed)
    kw = {**tiny_kwargs(), "dim": 96, "expert_dim": 80, "n_experts": 5, **over}
    return OpenMythos(MythosConfig(**kw))


def test_open_mythos_scheme_keeps_the_constructor_weights():
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert init_weights(m, "open-mythos") is m
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_fan_in_scales(attn):
    m = _model(attn_type=attn)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    init_weights(m, "fan-in")
    seen = set()
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".lora." not in f".{name}." and name not in ("head",
                                                                                        "recurrent.act.halt"):
            w = mod.weight
            assert abs(w.std().item() * mod.in_features ** 0.5 - 1) < 0.25, name
            seen.add(f"{name}.weight")
        elif isinstance(mod, MoEFFN):
            for p, n in ((mod.w13, "w13"), (mod.w2, "w2")):
                assert abs(p.std().item() * p.shape[1] ** 0.5 - 1) < 0.1, name
                seen.add(f"{name}.{n}")
    assert abs(m.embed.weight.std().item() - 1) < 0.1 and m.head.weight is m.embed.weight
    seen |= {"embed.weight", "head.weight"}
    for k, v in m.state_dict().items():       # everything else (norms, LoRA, LTI, halting head) kept
        if k not in seen:
            assert torch.equal(v, before[k]), k
        elif k != "head.weight":
            assert not torch.equal(v, before[k]), k
    x = torch.randint(0, m.cfg.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.isfinite(m(x, n_loops=3)).all()


def test_fan_in_draws_from_the_global_generator():
    def drawn(seed):
        m = _model()
        torch.manual_seed(seed)
        return init_weights(m, "fan-in").state_dict()

    a, b, c = drawn(3), drawn(3), drawn(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["embed.weight"], c["embed.weight"])
    assert INIT_SCHEMES == ("open-mythos", "fan-in")


def test_bad_scheme():
    with pytest.raises(ValueError, match="init"):
        init_weights(_model(), "xavier")
    with pytest.raises(ValueError, match="init"):
        TrainConfig(task="pointer", init="fanin").validate()


def test_trainer_applies_init_and_takes_a_task(tmp_path):
    cfg = MythosConfig(**tiny_kwargs())
    kw = dict(task="pointer", steps=2, batch_size=2, seq_len=12, out=str(tmp_path), eval_every=0,
              save_every=0)
    a = Trainer(TrainConfig(**kw), cfg).model
    b = Trainer(TrainConfig(**kw, init="fan-in"), cfg).model
    assert abs(a.embed.weight.std().item() - 0.02) < 0.005 and abs(b.embed.weight.std().item() - 1) < 0.2
    task = PointerTask(12, hops=1, vocab_size=cfg.vocab_size)
    tr = Trainer(TrainConfig(**kw), cfg, task=task)
    assert tr.task is task and "loss" in tr.train_step()
    with pytest.raises(ValueError, match="vocab_size"):
        Trainer(TrainConfig(**kw), cfg, task=PointerTask(301, vocab_size=10 ** 4))
    with pytest.raises(TypeError, match="task"):
        Trainer(TrainConfig(**kw), cfg, task="pointer")


def test_cli_init_flag(tmp_path, capsys):
    run = str(tmp_path / "run")
    with pytest.raises(SystemExit) as exc:
        main(["--init", "xavier", "--out", run, "--no-progress"])
    assert exc.value.code == 2 and "--init" in capsys.readouterr().err
    assert main(["--init", "fan-in", "--steps", "1", "--seq-len", "12", "--batch-size", "2",
                 "--eval-every", "0", "--out", run, "--no-progress"]) == 0
