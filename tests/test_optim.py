"""The optimizers of segrepro.train.build_optimizer (SGD, the plain setting; AdamW with decay and
no-decay groups, HFGD's advanced setting), and AdamW + photometric training through the trainer,
resumed to exactly the model of an unbroken run."""

import json

import pytest
import torch
from torch import nn

from segrepro import train as trainer
from segrepro.config import deep_merge, load_params
from segrepro.data import load_card
from segrepro.errors import SegreproError
from segrepro.models import build_model
from segrepro.train import CHECKPOINT, LOG, build_optimizer, train

ADAMW = {"optimizer": "adamw", "lr": 4e-5, "weight_decay": 0.05, "momentum": 0.9}


class Block(nn.Module):
    """Parameters named as in transformer backbones, beside a conv, a BN and an LN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.norm = nn.LayerNorm(4)
        self.linear = nn.Linear(4, 4, bias=False)
        self.attn = nn.Module()
        self.attn.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))


def group_names(model: nn.Module, optimizer) -> list[set[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [{name_of[id(p)] for p in group["params"]} for group in optimizer.param_groups]


def test_adamw_groups_by_hand():
    model = Block()
    optimizer = build_optimizer(model, ADAMW)
    assert type(optimizer) is torch.optim.AdamW
    decay, no_decay = group_names(model, optimizer)
    assert decay == {"conv.weight", "linear.weight"}
    assert no_decay == {"conv.bias", "bn.weight", "bn.bias", "norm.weight", "norm.bias",
                        "attn.relative_position_bias_table", "pos_embed", "absolute_pos_embed",
                        "cls_token"}
    first, second = optimizer.param_groups
    assert (first["weight_decay"], second["weight_decay"]) == (0.05, 0.0)
    for group in optimizer.param_groups:
        assert group["lr"] == 4e-5 and group["betas"] == (0.9, 0.999)
        assert group["eps"] == 1e-8 and not group["amsgrad"]


def test_adamw_groups_of_a_real_model_partition_its_parameters(project):
    config = load_params().resolve("pspnet", "psp50", "tiny")
    card = load_card(config["dataset"]["root"])
    model = build_model(config["model"], card["num_classes"], card["ignore_index"])
    optimizer = build_optimizer(model, ADAMW)
    decay, no_decay = group_names(model, optimizer)
    shapes = dict((n, p.shape) for n, p in model.named_parameters())
    assert not decay & no_decay and decay | no_decay == set(shapes)
    assert decay == {n for n, shape in shapes.items() if len(shape) > 1}
    assert any(n.endswith("bias") for n in no_decay) and any(len(shapes[n]) == 4 for n in decay)
    # Batch norms exist and are not decayed.
    bn = {f"{m}.weight" for m, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)}
    assert bn and bn <= no_decay


def test_sgd_is_the_default_and_unchanged():
    model = Block()
    for settings in ({"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4},
                     {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}):
        optimizer = build_optimizer(model, settings)
        assert type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 1
        group = optimizer.param_groups[0]
        assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]
        assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.9, 1e-4)
        assert not group["nesterov"] and group["dampening"] == 0


def test_unknown_optimizer_is_an_error():
    with pytest.raises(SegreproError, match="train.optimizer 'adam'"):
        build_optimizer(Block(), dict(ADAMW, optimizer="adam"))


def test_poly_lr_reaches_both_adamw_groups():
    model = Block()
    optimizer = build_optimizer(model, ADAMW)
    loss_of = lambda outputs, labels: (outputs.float().mean(), {})  # noqa: E731
    model.loss = loss_of
    model.forward = lambda images: model.conv(images)
    trainer.train_step(model, optimizer, torch.ones(1, 3, 5, 5), None, 1.25e-5)
    assert [g["lr"] for g in optimizer.param_groups] == [1.25e-5, 1.25e-5]


# ----------------------------------------------------------------------------- through the trainer

def adamw_config(**train_override) -> dict:
    settings = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "photometric": True,
                "iterations": 8, "checkpoint_every": 4, "log_every": 2, **train_override}
    return deep_merge(load_params().resolve("pspnet", "psp50", "tiny"), {"train": settings})


class Killed(Exception):
    pass


def test_adamw_photometric_run_resumes_to_the_model_of_an_unbroken_run(project, monkeypatch, capsys):
    config = adamw_config()
    reference_dir = project / "results" / "unbroken"
    summary = train(config, reference_dir / "model.pt", device="cpu")
    assert summary["resumed_from"] == 0
    log = [json.loads(line) for line in (reference_dir / LOG).read_text().splitlines()]
    log = [record for record in log if "loss" in record]  # not the training curve's val_miou
    assert [r["iteration"] for r in log] == [2, 4, 6, 8]

    # Killed in the step of iteration 6, after the checkpoint of iteration 4.
    run_dir = project / "results" / "resumed"
    step, calls = trainer.train_step, []

    def dying_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise Killed
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", dying_step)
    with pytest.raises(Killed):
        train(config, run_dir / "model.pt", device="cpu")
    monkeypatch.setattr(trainer, "train_step", step)
    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert checkpoint["iteration"] == 4
    groups = checkpoint["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all("exp_avg_sq" in s for s in checkpoint["optimizer"]["state"].values())

    assert train(config, run_dir / "model.pt", device="cpu")["resumed_from"] == 4
    assert "from iteration 4" in capsys.readouterr().err
    ours = torch.load(run_dir / "model.pt", weights_only=True)["model"]
    theirs = torch.load(reference_dir / "model.pt", weights_only=True)["model"]
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"tensors differ after resuming: {different[:5]}"
    assert (run_dir / LOG).read_text() == (reference_dir / LOG).read_text()

    # The options matter: SGD without photometric distortion ends elsewhere.
    sgd_dir = project / "results" / "sgd"
    train(adamw_config(optimizer="sgd", photometric=False, lr=0.01), sgd_dir / "model.pt", device="cpu")
    sgd = torch.load(sgd_dir / "model.pt", weights_only=True)["model"]
    assert any(not torch.equal(sgd[k], theirs[k]) for k in theirs if theirs[k].is_floating_point())


def test_adamw_learns(project):
    config = adamw_config(iterations=60, log_every=10, checkpoint_every=1000, lr=3e-3)
    run_dir = project / "results" / "learn"
    train(config, run_dir / "model.pt", device="cpu")
    losses = [record["loss"] for record in map(json.loads, (run_dir / LOG).read_text().splitlines()) if "loss" in record]
    assert len(losses) == 6
    assert losses[-1] < 0.85 * losses[0], losses
