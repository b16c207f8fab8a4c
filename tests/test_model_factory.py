"""Models built from typed arguments (segrepro.models.<family>.config), and the one factory that
reads the resolved `model:` section into them (segrepro.models.factory)."""

import dataclasses
from pathlib import Path

import pytest
import torch

from segrepro.config.params import deep_merge, load_params
from segrepro.core.errors import SegreproError
from segrepro.models.factory import build_model, model_arguments
from segrepro.models.hfgd.config import EncoderConfig, HfgdBackboneConfig, HfgmConfig, UpsamplerConfig
from segrepro.models.hfgd.hfgd import HFGD
from segrepro.models.pspnet.config import AuxiliaryLossConfig, PSPNetBackboneConfig, PyramidHeadConfig
from segrepro.models.pspnet.pspnet import PSPNet
from segrepro.models.saf.config import DecoderConfig, SafFeaturesConfig, SafHeadConfig
from segrepro.models.saf.specialize_fuse import SpecializeFuse

NUM_CLASSES = 5
TINY_RESNET = {"channels": [4, 8, 16, 32], "stem_width": 4, "layers": [1, 1, 1, 1]}


@pytest.fixture(scope="module")
def params():
    return load_params(Path(__file__).resolve().parents[1])


def as_config(value):
    """A typed argument as the YAML would spell it: tuples as lists, dataclasses as mappings."""
    if dataclasses.is_dataclass(value):
        return {field.name: as_config(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [as_config(v) for v in value]
    return value


def test_every_experiment_reads_every_key_of_its_config(params):
    """For every experiment of every paper (tiny scale), each key of the resolved `model:` section
    arrives unchanged in the typed arguments (nothing dropped, renamed or defaulted over), and
    building from those arguments directly gives the factory's model, parameter for parameter."""
    for paper, registry in params.papers.items():
        for experiment in registry["experiments"]:
            config = params.resolve(paper, experiment, "tiny")["model"]
            family, arguments = model_arguments(config)
            assert family == config["family"]
            for key, value in config.items():
                if key == "family":
                    continue
                # PSPNet's `aux` mapping and SaF's `backbone` keep their YAML names as arguments
                typed = arguments["features" if (family, key) == ("saf", "backbone") else key]
                typed = as_config(typed)
                if isinstance(value, dict):
                    for name, item in value.items():
                        expected = {} if item is None and name == "kwargs" else item
                        assert typed[name] == expected, (paper, experiment, key, name)
                else:
                    assert typed == value, (paper, experiment, key)
            if experiment == next(iter(registry["experiments"])):
                cls = {"pspnet": PSPNet, "saf": SpecializeFuse, "hfgd": HFGD}[family]
                torch.manual_seed(0)
                direct = cls(NUM_CLASSES, **arguments).state_dict()
                torch.manual_seed(0)
                built = build_model(config, NUM_CLASSES).state_dict()
                assert list(direct) == list(built)
                assert all(torch.equal(direct[k], built[k]) for k in direct), (paper, experiment)


def test_pspnet_bins_give_the_stated_pooled_grids():
    """Sec. 3.2: bins (1, 2, 3, 6) pool layer4 to 1x1, 2x2, 3x3 and 6x6; with reduction each level
    has C / 4 channels, so the pyramid's output is C + 4 x C / 4 = 2C wide (32 -> 64)."""
    model = PSPNet(
        NUM_CLASSES,
        backbone=PSPNetBackboneConfig("resnet18", kwargs=TINY_RESNET),
        head=PyramidHeadConfig(bins=(1, 2, 3, 6), channels=8),
        aux=AuxiliaryLossConfig(weight=0.4, channels=4),
    ).eval()
    pooled = []
    for reduce in model.context.reduce:
        reduce.register_forward_hook(lambda module, inputs, output: pooled.append(tuple(output.shape[-2:])))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 65, 65))["out"]
    assert pooled == [(1, 1), (2, 2), (3, 3), (6, 6)]
    assert model.context.out_channels == 64 and model.head.block[0].in_channels == 64
    assert out.shape == (1, NUM_CLASSES, 65, 65)
    assert model.aux_weight == 0.4 and model.aux_head is not None
    # alpha = 0 drops the auxiliary branch (Table 2's "no aux" row)
    assert PSPNet(NUM_CLASSES, PSPNetBackboneConfig("resnet18", kwargs=TINY_RESNET),
                  aux=AuxiliaryLossConfig(weight=0.0)).aux_head is None


@pytest.mark.parametrize("strides, sides", [((32, 16, 8, 4), [2, 4, 8, 16]), ((16, 4), [4, 16])])
def test_saf_strides_give_the_stated_levels(strides, sides):
    """Sec. 3.1: one pyramid level per stride, coarse -> fine, a 64-pixel side divided by each;
    the unity pyramid has one level less (the finest level's cells are unity cells)."""
    torch.manual_seed(0)
    model = SpecializeFuse(
        NUM_CLASSES,
        features=SafFeaturesConfig("resnet_decoder", "resnet18", kwargs=TINY_RESNET,
                                   decoder=DecoderConfig((4, 8, 16, 32), modules=1, blocks=1)),
        head=SafHeadConfig(strides=strides, semantic_channels=8, key_channels=4, unity_channels=4),
    ).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 64, 64))
    assert [y.shape[-1] for y in outputs["semantic"]] == sides
    assert [u.shape[-1] for u in outputs["unity"]] == sides[:-1]
    assert model.strides == strides


def test_hfgd_takes_the_skips_finer_than_the_deepest_stage():
    """Fig. 2: an OS-32 ResNet's stages at strides 4, 8, 16 are the upsampler's skips; with
    guidance the upsampler borrows the class tokens and has no classifier of its own."""
    torch.manual_seed(0)
    model = HFGD(
        NUM_CLASSES,
        backbone=HfgdBackboneConfig("resnet18", kwargs=TINY_RESNET),
        channels=8,
        encoder=EncoderConfig("identity", hidden=8),
        upsampler=UpsamplerConfig("sfpn"),
        hfgm=HfgmConfig(guidance=True),
    ).train()
    assert model.backbone.strides == [4, 8, 16, 32] and model.skip_strides == [4, 8, 16]
    assert model.output_stride == 4 and model.upsampler_classifier is None and model.stop_gradient
    outputs = model(torch.randn(2, 3, 64, 64))
    assert set(outputs) == {"out", "guide"} and outputs["out"].shape == (2, NUM_CLASSES, 64, 64)


@pytest.mark.parametrize("section, value, message", [
    ({"head": {"binz": [1, 2]}}, None, "model.head: unknown key(s) binz (known: type, bins,"),
    ({"head": {"bins": "1,2,3,6"}}, None, "model.head.bins: expected a list of integers, got '1,2,3,6'"),
    ({"head": {"bins": [1, 2.5]}}, None, "model.head.bins[1]: expected an integer, got 2.5"),
    ({"aux": {"weight": True}}, None, "model.aux.weight: expected a number, got True"),
    ({"backbone": {"pretrained": 1}}, None, "model.backbone.pretrained: expected a boolean or a string, got 1"),
    ({"decoder": {}}, None, "model: unknown key(s) decoder for family 'pspnet'"),
])
def test_unknown_or_mistyped_keys_are_one_line_errors(params, section, value, message):
    config = deep_merge(params.resolve("pspnet", "psp50", "tiny")["model"], section)
    with pytest.raises(SegreproError) as error:
        build_model(config, NUM_CLASSES)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_saf_and_hfgd_keys_are_checked_too(params):
    saf = params.resolve("saf", "A", "tiny")["model"]
    with pytest.raises(SegreproError, match=r"^model.head.tau: expected a number, got '0.9'$"):
        model_arguments({**saf, "head": {**saf["head"], "tau": "0.9"}})
    hfgd = params.resolve("hfgd", "fcn_identity", "tiny")["model"]
    with pytest.raises(SegreproError, match=r"^model.hfgm: unknown key\(s\) guidence"):
        model_arguments({**hfgd, "hfgm": {"guidence": True}})
    with pytest.raises(SegreproError, match="unknown model family 'deeplab'"):
        model_arguments({"family": "deeplab"})
