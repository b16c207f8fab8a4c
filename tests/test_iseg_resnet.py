"""The HFGD / CAR authors' ResNet-50 (iSeg `backbones/resnet_common.py`, `feature_extractor.py`):
stride and dilation of every block at OS 32 and OS 8, the endpoints taken before each strided
block, the average-pooled shortcut, and HFGD building it from params/papers/hfgd.yaml."""

from pathlib import Path

import pytest
import torch

from segrepro.config.params import deep_merge, load_params
from segrepro.core.errors import SegreproError
from segrepro.models.common.backbone import ISegResNet, iseg_block_layout
from segrepro.models.factory import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = {"channels": [4, 8, 16, 32], "stem_width": 4}

# (stride, dilation) of each bottleneck's 3x3, stage by stage, worked out by hand from iSeg's
# build_stacks(slim_behaviour=True), build_atrous_resnet and apply_multi_grid((1, 2, 4)).
OS32 = [
    [(1, 1), (1, 1), (2, 1)],
    [(1, 1), (1, 1), (1, 1), (2, 1)],
    [(1, 1)] * 5 + [(2, 1)],
    [(1, 1), (1, 2), (1, 4)],
]
OS8 = [
    [(1, 1), (1, 1), (2, 1)],
    [(1, 1), (1, 1), (1, 1), (1, 2)],   # the stride that would pass OS 8 becomes rate 2 at once
    [(1, 2)] * 5 + [(1, 4)],
    [(1, 4), (1, 8), (1, 16)],          # rate 4 times the multi-grid
]


def block_plan(model: ISegResNet) -> list[list[tuple[int, int]]]:
    return [[(block.conv2.stride[0], block.conv2.dilation[0]) for block in stage] for stage in model.stages]


@pytest.mark.parametrize("output_stride, expected", [(32, OS32), (8, OS8)])
def test_stride_and_dilation_of_every_block(output_stride, expected):
    assert iseg_block_layout([3, 4, 6, 3], output_stride) == expected
    model = ISegResNet("resnet50s", (1, 2, 3, 4), output_stride, kwargs=TINY)
    assert block_plan(model) == expected
    for stage in model.stages:
        for index, block in enumerate(stage):
            assert block.conv2.padding == block.conv2.dilation  # "same" padding at every rate
            if index == 0:  # the projection shortcut never strides
                assert block.downsample[0].stride == (1, 1)
            elif block.conv2.stride == (2, 2):
                assert isinstance(block.downsample, torch.nn.AvgPool2d)
            else:
                assert block.downsample is None


def test_multi_grid_is_a_switch():
    assert iseg_block_layout([3, 4, 6, 3], 32, (1, 1, 1))[3] == [(1, 1)] * 3
    assert iseg_block_layout([3, 4, 6, 3], 8, (1, 1, 1))[3] == [(1, 4)] * 3
    with pytest.raises(SegreproError, match="multi-grid"):
        iseg_block_layout([3, 4, 6, 3], 32, (1, 2))


@pytest.mark.parametrize("output_stride, sides, reductions", [
    (32, [33, 17, 9, 5, 3], [2, 4, 8, 16, 32]),
    (8, [33, 17, 9, 9, 9], [2, 4, 8, 8, 8]),
])
def test_endpoints_are_taken_before_the_strided_block(output_stride, sides, reductions):
    model = ISegResNet("resnet50s", (0, 1, 2, 3, 4), output_stride, kwargs=TINY).eval()
    image = torch.randn(1, 3, 65, 65)  # odd, as the 513 crop: TF "SAME" and these paddings agree
    with torch.no_grad():
        features = model(image)
        assert [f.shape[-1] for f in features] == sides
        assert model.reductions == reductions
        assert model.channels == [8, 16, 32, 64, 128]
        # stage 1's endpoint is the output of its first two blocks, not of the strided third
        x = model.maxpool(model.stem(image))
        torch.testing.assert_close(features[1], model.stages[0][1](model.stages[0][0](x)))


def test_the_strided_shortcut_averages_the_valid_pixels_of_a_partial_window():
    model = ISegResNet("resnet50s", (4,), 32, kwargs=TINY)
    pool = model.stages[0][-1].downsample
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    # windows {0,1,3,4}, {2,5}, {6,7}, {8}: TF's avg_pool "SAME" leaves the padding out
    assert pool(x).flatten().tolist() == [2.0, 3.5, 6.5, 8.0]


def test_hfgd_builds_the_authors_resnet_by_default():
    params = load_params(ROOT)
    config = params.resolve("hfgd", "usfpn_cae_hfgm", "tiny")["model"]
    assert config["backbone"]["layout"] == "iseg"
    model = build_model(config, 5)
    assert isinstance(model.backbone.body, ISegResNet)
    assert block_plan(model.backbone.body) == OS32
    d8 = build_model(params.resolve("hfgd", "d8_sa_car", "tiny")["model"], 5)
    assert block_plan(d8.backbone.body) == OS8
    assert d8.backbone.strides == [4, 8, 8, 8]
    timm_layout = build_model(deep_merge(config, {"backbone": {"layout": "timm"}}), 5)
    assert not isinstance(timm_layout.backbone.body, ISegResNet)


def test_the_layout_is_for_bottleneck_resnets_only():
    params = load_params(ROOT)
    swin = params.resolve("hfgd", "swin_usfpn_cae", "tiny")["model"]
    with pytest.raises(SegreproError, match="iseg layout"):
        build_model(deep_merge(swin, {"backbone": {"layout": "iseg"}}), 5)
    with pytest.raises(SegreproError, match="bottleneck ResNet"):
        ISegResNet("resnet18", (1, 2, 3, 4), 32)
