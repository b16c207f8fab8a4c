"""The optimizers of segrepro.engine.train.build_optimizer (SGD, the plain setting; AdamW with decay and
no-decay groups, HFGD's advanced setting), its parameter groups (`train.lr_mult`, `train.decay`),
and AdamW + photometric training and PSPNet's 10x groups through the trainer, resumed to exactly
the model of an unbroken run."""

import json

import pytest
import torch
from torch import nn

from segrepro.config.params import deep_merge, load_params
from segrepro.core.errors import SegreproError
from segrepro.data.dataset import load_card
from segrepro.engine import train as trainer
from segrepro.engine.checkpoint import CHECKPOINT
from segrepro.engine.train import LOG, build_optimizer, poly_lr, train
from segrepro.models.factory import build_model

ADAMW = {"optimizer": "adamw", "lr": 4e-5, "weight_decay": 0.05, "decay": "kernels", "momentum": 0.9}


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


def test_decay_all_decays_norms_and_biases_under_adamw_too():
    optimizer = build_optimizer(Block(), dict(ADAMW, decay="all"))
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == 0.05


def test_unknown_decay_is_an_error():
    with pytest.raises(SegreproError, match="train.decay 'norms'"):
        build_optimizer(Block(), dict(ADAMW, decay="norms"))


# ----------------------------------------------------------------------------- train.decay: kernels

class ConvNet(nn.Module):
    """A conv with bias, a BN and a linear layer: what `decay: kernels` tells apart."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)


def test_kernels_decay_only_conv_and_linear_kernels_at_the_keras_l2_gradient():
    """HFGD's plain setting as resolved from params: SGD weight decay 2e-4 on the conv and linear
    kernels only. One step with a zero loss gradient moves exactly the kernels, by lr x 2e-4 x w:
    the step the authors' Keras l2(1e-4) penalty (1e-4 x sum(w^2), gradient 2e-4 x w) gives."""
    settings = load_params().resolve("hfgd", "usfpn_cae_hfgm", "paper")["train"]
    assert (settings["decay"], settings["weight_decay"]) == ("kernels", 2e-4)
    torch.manual_seed(0)
    model = ConvNet()
    for module in (model.bn,):  # non-trivial norm parameters, so that a decay would show
        nn.init.normal_(module.weight), nn.init.normal_(module.bias)
    optimizer = build_optimizer(model, dict(settings, lr=0.5))
    decayed, undecayed = group_names(model, optimizer)
    assert decayed == {"conv.weight", "fc.weight"}
    assert undecayed == {"conv.bias", "bn.weight", "bn.bias", "fc.bias"}
    assert [g["weight_decay"] for g in optimizer.param_groups] == [2e-4, 0.0]

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        if name in decayed:
            torch.testing.assert_close(p.detach(), before[name] * (1 - 0.5 * 2e-4), rtol=0, atol=1e-7)
        else:
            assert torch.equal(p.detach(), before[name]), name

    # The same step from the Keras penalty itself (no weight decay in the optimizer).
    keras = ConvNet()
    keras.load_state_dict({n: t for n, t in before.items()}, strict=False)
    plain = torch.optim.SGD(keras.parameters(), lr=0.5, momentum=0.9)
    penalty = 1e-4 * sum((p ** 2).sum() for n, p in keras.named_parameters() if n in decayed)
    plain.zero_grad()
    penalty.backward()
    for p in keras.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    plain.step()
    for name, p in keras.named_parameters():
        torch.testing.assert_close(p.detach(), dict(model.named_parameters())[name].detach(), rtol=0, atol=1e-9)


def test_kernels_of_a_real_hfgd_model(project):
    """The plain setting on the full HFGD model (tiny): every decayed parameter is a conv or linear
    kernel, every conv and linear kernel is decayed, and no norm or bias is."""
    config = load_params().resolve("hfgd", "usfpn_cae_hfgm", "tiny")
    model = build_model(config["model"], 5, 255)
    decayed, undecayed = group_names(model, build_optimizer(model, config["train"]))
    kernels = {f"{m}.weight" for m, module in model.named_modules()
               if isinstance(module, (nn.Conv2d, nn.Linear))}
    assert decayed == kernels
    norms = {f"{m}.{p}" for m, module in model.named_modules()
             if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) for p in ("weight", "bias")}
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert norms and biases and (norms | biases) <= undecayed


# ----------------------------------------------------------------------------- train.lr_mult

class TwoPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 3)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, images):
        return self.head(self.backbone(images))

    @staticmethod
    def loss(outputs, labels):
        return outputs.float().mean(), {}


def test_lr_mult_groups_keep_their_ratio_at_every_poly_step():
    model = TwoPart()
    settings = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "lr_mult": {"head": 10}}
    optimizer = build_optimizer(model, settings)
    base, new = group_names(model, optimizer)
    assert base == {"backbone.weight", "backbone.bias"} and new == {"head.weight", "head.bias"}
    assert [(g["lr"], g["lr_mult"]) for g in optimizer.param_groups] == [(0.01, 1.0), (0.1, 10.0)]
    for iteration in range(7):
        rate = poly_lr(0.01, iteration, 7, 0.9)
        trainer.train_step(model, optimizer, torch.randn(1, 3, 5, 5), None, rate)
        # semseg tool/train.py: the base groups at the poly rate, the new ones at 10x it.
        assert [g["lr"] for g in optimizer.param_groups] == [rate, rate * 10]


def test_unknown_lr_mult_module_is_an_error():
    with pytest.raises(SegreproError, match=r"train.lr_mult: unknown module 'neck' \(the model's: backbone, head\)"):
        build_optimizer(TwoPart(), {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "lr_mult": {"neck": 2}})


def test_pspnets_new_layers_learn_at_10x(project):
    """PSPNet's default (semseg's modules_new): pyramid pooling, classifier and auxiliary branch in
    the 10x groups, the backbone at the base rate; with decay kernels too, four groups."""
    config = load_params().resolve("pspnet", "psp50", "tiny")
    card = load_card(config["dataset"]["root"])
    model = build_model(config["model"], card["num_classes"], card["ignore_index"])
    optimizer = build_optimizer(model, config["train"])
    base, new = group_names(model, optimizer)
    assert base == {n for n, _ in model.named_parameters() if n.startswith("backbone.")}
    assert {n.split(".")[0] for n in new} == {"context", "head", "aux_head"}
    assert [g["lr_mult"] for g in optimizer.param_groups] == [1.0, 10.0]
    groups = build_optimizer(model, dict(config["train"], decay="kernels")).param_groups
    assert [(g["lr_mult"], g["weight_decay"]) for g in groups] == [(1.0, 1e-4), (1.0, 0.0), (10.0, 1e-4), (10.0, 0.0)]


# ----------------------------------------------------------------------------- through the trainer

def adamw_config(**train_override) -> dict:
    settings = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "decay": "kernels", "photometric": True,
                "iterations": 8, "checkpoint_every": 4, "log_every": 2, **train_override}
    return deep_merge(load_params().resolve("pspnet", "psp50", "tiny"), {"train": settings})


class Killed(Exception):
    pass


def killed_in_the_seventh_step(monkeypatch, config, run_dir, step) -> dict:
    """Train with `step` as the trainer's step until the seventh call raises Killed; the trainer's
    own step is put back and the checkpoint left behind returned."""
    original, calls = trainer.train_step, []

    def dying_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise Killed
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", dying_step)
    with pytest.raises(Killed):
        train(config, run_dir / "model.pt", device="cpu")
    monkeypatch.setattr(trainer, "train_step", original)
    return torch.load(run_dir / CHECKPOINT, weights_only=True)


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
    checkpoint = killed_in_the_seventh_step(monkeypatch, config, run_dir, trainer.train_step)
    assert checkpoint["iteration"] == 4
    groups = checkpoint["optimizer"]["param_groups"]
    # Decayed and undecayed groups, at the base rate and at PSPNet's 10x (its lr_mult).
    assert [(g["lr_mult"], g["weight_decay"]) for g in groups] == [(1.0, 0.05), (1.0, 0.0), (10.0, 0.05), (10.0, 0.0)]
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
    losses = [record["loss"] for record in map(json.loads, (run_dir / LOG).read_text().splitlines())
              if "loss" in record]
    assert len(losses) == 6
    assert losses[-1] < 0.85 * losses[0], losses


def test_lr_mult_run_resumes_to_the_model_of_an_unbroken_run(project, monkeypatch):
    """PSPNet's 10x groups with kernels-only decay (four groups): the checkpoint keeps each group's
    multiplier, the resumed run keeps the ratio and ends with exactly the unbroken run's model."""
    config = deep_merge(load_params().resolve("pspnet", "psp50", "tiny"),
                        {"train": {"iterations": 8, "checkpoint_every": 4, "log_every": 2, "decay": "kernels"}})
    reference_dir = project / "results" / "unbroken"
    train(config, reference_dir / "model.pt", device="cpu")

    run_dir = project / "results" / "resumed"
    step, rates = trainer.train_step, []

    def recording_step(model, optimizer, *args, **kwargs):
        result = step(model, optimizer, *args, **kwargs)
        rates.append([g["lr"] for g in optimizer.param_groups])
        return result

    checkpoint = killed_in_the_seventh_step(monkeypatch, config, run_dir, recording_step)
    assert checkpoint["iteration"] == 4
    groups = checkpoint["optimizer"]["param_groups"]
    assert [g["lr_mult"] for g in groups] == [1.0, 1.0, 10.0, 10.0]
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0, 1e-4, 0.0]
    assert [g["lr"] for g in groups] == [poly_lr(0.01, 3, 8, 0.9) * m for m in (1, 1, 10, 10)]

    monkeypatch.setattr(trainer, "train_step", recording_step)
    rates.clear()
    assert train(config, run_dir / "model.pt", device="cpu")["resumed_from"] == 4
    # The resumed steps (iterations 4..7) set every group at poly rate x its multiplier.
    assert rates == [[poly_lr(0.01, iteration, 8, 0.9) * m for m in (1, 1, 10, 10)] for iteration in range(4, 8)]
    ours = torch.load(run_dir / "model.pt", weights_only=True)["model"]
    theirs = torch.load(reference_dir / "model.pt", weights_only=True)["model"]
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"tensors differ after resuming: {different[:5]}"

    # The multiplier matters: every layer at the base rate ends elsewhere.
    flat_dir = project / "results" / "flat"
    train(deep_merge(config, {"train": {"lr_mult": {"context": 1, "head": 1, "aux_head": 1}}}),
          flat_dir / "model.pt", device="cpu")
    flat = torch.load(flat_dir / "model.pt", weights_only=True)["model"]
    assert any(not torch.equal(flat[k], theirs[k])
               for k in theirs if k.startswith("head.") and theirs[k].is_floating_point())
