"""CBAM-ResNets (``bam_triton.models``, ``attention="cbam"``): the authors' key layout and parameter totals, where CBAM
sits in a block, the ``attention`` / ``bam`` arguments, the authors' initialisation, their checkpoints, ``add_cbam`` on
torchvision-style ResNets (re-created here: torchvision is not a dependency), and the training example's CBAM model.
Networks run on the torch backend at small sizes; the forward and training tests on the ``device`` of this run."""
import copy

import pytest
import torch
from torch import nn

from bam_triton import models
from bam_triton.bench.providers import AuthorsCBAM
from bam_triton.models import CheckpointMismatchError, add_cbam, cbam_modules, load_official_checkpoint
from test_models import BLOCKS, BUFFER_SUFFIXES, _bn, official_layout, random_checkpoint_state

# /work/shared/official_cbam_keys.md: the authors' ResidualNet("ImageNet", depth, 1000, "CBAM") and pytorchcv's
# cbam_resnet<depth>.
CBAM_TOTALS = {18: 11_779_392, 34: 21_960_468, 50: 28_089_624, 101: 49_330_172}
CBAM_COUNTS = {18: 8, 34: 16, 50: 16, 101: 33}


# ----------------------------------------------------------------------------------------------------------------------
# The authors' CBAM key layout, re-created from the key table (not derived from bam_triton)
# ----------------------------------------------------------------------------------------------------------------------


def _cbam(layout, prefix, c, reduction=16):
    h = c // reduction
    layout[f"{prefix}.ChannelGate.mlp.1.weight"] = (h, c)
    layout[f"{prefix}.ChannelGate.mlp.1.bias"] = (h,)
    layout[f"{prefix}.ChannelGate.mlp.3.weight"] = (c, h)
    layout[f"{prefix}.ChannelGate.mlp.3.bias"] = (c,)
    layout[f"{prefix}.SpatialGate.spatial.conv.weight"] = (1, 2, 7, 7)
    _bn(layout, f"{prefix}.SpatialGate.spatial.bn", 1)


def official_cbam_layout(depth, num_classes=1000):
    """{key: shape} of the authors' ResNet-<depth>+CBAM: their plain ResNet plus ``layerK.I.cbam.*`` in every block,
    C = the block's output channels."""
    layout = official_layout(depth, bam=False, num_classes=num_classes)
    expansion = 4 if depth >= 50 else 1
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), BLOCKS[depth]), start=1):
        for i in range(blocks):
            _cbam(layout, f"layer{stage}.{i}.cbam", planes * expansion)
    return layout


def _parameters(layout):
    return sum(torch.Size(shape).numel() for key, shape in layout.items() if not key.endswith(BUFFER_SUFFIXES))


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _small(factory=models.resnet18, **kwargs):
    """A CIFAR-stem network at width 8, CBAM reduction 4 (hidden widths >= 2), on the torch backend."""
    kwargs.setdefault("attention", "cbam")
    options = dict(reduction=4, backend="torch") if kwargs["attention"] else {}
    return factory(num_classes=10, cifar=True, width=8, **options, **kwargs)


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_layout_and_parameter_totals_match_the_authors(depth):
    expected = official_cbam_layout(depth)
    assert _parameters(expected) == CBAM_TOTALS[depth]  # the re-created layout agrees with the documented totals
    model = getattr(models, f"resnet{depth}")(attention="cbam", backend="torch")
    assert {key: tuple(value.shape) for key, value in model.state_dict().items()} == expected
    assert _count(model) == CBAM_TOTALS[depth]
    names = [name for name, _ in cbam_modules(model)]
    assert len(names) == CBAM_COUNTS[depth] and all(name.endswith(".cbam") for name in names)
    assert not hasattr(model, "bam1") and not model.has_bam


def test_cbam_sits_after_the_last_batchnorm_before_the_residual_addition(device):
    """In a BasicBlock and a Bottleneck (with and without downsample): CBAM reads the last BN's output and the block
    returns relu(CBAM(that) + identity)."""
    torch.manual_seed(0)
    for factory, last_bn in ((models.resnet18, "bn2"), (models.resnet50, "bn3")):
        model = _small(factory).eval().to(device)
        for block in (model.layer1[0], model.layer2[0], model.layer2[1]):
            seen = {}
            getattr(block, last_bn).register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o))
            block.cbam.register_forward_hook(lambda m, i, o: seen.update(cbam_in=i[0], cbam_out=o))
            block.register_forward_hook(lambda m, i, o: seen.update(block_in=i[0], block_out=o))
            with torch.no_grad():
                model(torch.randn(2, 3, 16, 16).to(device))
                identity = seen["block_in"] if block.downsample is None else block.downsample(seen["block_in"])
            assert seen["cbam_in"] is seen["bn"]
            torch.testing.assert_close(seen["block_out"], torch.relu(seen["cbam_out"] + identity))


# ----------------------------------------------------------------------------------------------------------------------
# attention= and the older bam=
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, expected", [
    ({}, "bam"), ({"bam": True}, "bam"), ({"bam": False}, None),
    ({"attention": "bam"}, "bam"), ({"attention": "cbam"}, "cbam"), ({"attention": None}, None),
    ({"bam": True, "attention": "bam"}, "bam"), ({"bam": False, "attention": None}, None),
    ({"bam": False, "attention": "cbam"}, "cbam"),
])
def test_attention_and_the_older_bam_argument(kwargs, expected):
    model = models.resnet18(num_classes=10, cifar=True, width=16, **kwargs)
    found = "bam" if models.bam_modules(model) else "cbam" if cbam_modules(model) else None
    assert found == expected and model.has_bam == (expected == "bam")


@pytest.mark.parametrize("kwargs, error, needle", [
    ({"bam": True, "attention": "cbam"}, ValueError, "bam=True contradicts attention='cbam'"),
    ({"bam": True, "attention": None}, ValueError, "bam=True contradicts attention=None"),
    ({"bam": False, "attention": "bam"}, ValueError, "bam=False contradicts attention='bam'"),
    ({"attention": "CBAM"}, ValueError, "attention must be 'bam', 'cbam' or None"),
    ({"attention": "cbam", "combine": "sum"}, TypeError, "combine: not an option of attention='cbam'"),
    ({"attention": "bam", "pool_types": ("avg",)}, TypeError, "pool_types: not an option of attention='bam'"),
])
def test_contradictions_and_wrong_options_are_clear_errors(kwargs, error, needle):
    with pytest.raises(error, match=needle.replace("(", r"\(").replace(")", r"\)")):
        models.resnet18(**kwargs)


def test_cbam_options_pass_through_and_the_backbone_is_the_same_for_every_attention():
    model = _small(pool_types=("avg", "max", "lse"), no_spatial=True)
    for _, cbam in cbam_modules(model):
        assert (cbam.reduction, cbam.pool_types, cbam.no_spatial, cbam.backend) == (4, ("avg", "max", "lse"), True,
                                                                                  "torch")
    states = []
    for attention in ("cbam", "bam", None):
        torch.manual_seed(3)
        states.append(_small(attention=attention).state_dict())
    for key, value in states[2].items():  # one seed: the same backbone with CBAM, with BAM and without attention
        assert torch.equal(value, states[0][key]) and torch.equal(value, states[1][key]), key


def test_initialisation_like_the_authors():
    """Their init loop: the CBAM spatial BatchNorm's weight 0 (keys with 'SpatialGate'), every bias 0, the 7x7 conv
    kaiming-normal with fan_out = 49; the backbone as torchvision's (BN weights 1)."""
    torch.manual_seed(0)
    model = models.resnet50(attention="cbam", backend="torch")
    convs = []
    for _, cbam in cbam_modules(model):
        bn = cbam.SpatialGate.spatial.bn
        assert torch.count_nonzero(bn.weight) == 0 and torch.count_nonzero(bn.bias) == 0
        assert torch.count_nonzero(cbam.ChannelGate.mlp[1].bias) == 0
        assert torch.count_nonzero(cbam.ChannelGate.mlp[3].bias) == 0
        convs.append(cbam.SpatialGate.spatial.conv.weight.flatten())
    assert torch.cat(convs).std().item() == pytest.approx((2 / 49) ** 0.5, rel=0.1)  # 16 x 98 values
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d) and "SpatialGate" not in name:
            assert torch.all(module.weight == 1), name


def test_training_reaches_every_parameter_as_the_authors_init_allows(device):
    """With the spatial BN's weight 0 the first step gives the 7x7 convs no gradient (as in the authors' networks);
    the BN's weight gets one, and after one SGD step every parameter has a gradient."""
    torch.manual_seed(0)
    model = _small().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.randn(4, 3, 16, 16).to(device), torch.tensor([0, 1, 2, 3], device=device)
    for step in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        no_grad = {name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
        if step == 0:
            assert no_grad == {name for name, _ in model.named_parameters() if name.endswith("spatial.conv.weight")}
            assert all(cbam.SpatialGate.spatial.bn.weight.grad.abs().sum() > 0 for _, cbam in cbam_modules(model))
        else:
            assert no_grad == set()
        optimizer.step()


# ----------------------------------------------------------------------------------------------------------------------
# The authors' checkpoints
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cbam_state():
    return random_checkpoint_state(official_cbam_layout(50), seed=2)


def test_loads_the_authors_cbam_training_checkpoint(tmp_path, cbam_state):
    path = tmp_path / "RESNET50_CBAM_best.pth.tar"
    torch.save({"epoch": 90, "arch": "resnet", "state_dict": {f"module.{k}": v for k, v in cbam_state.items()},
                "best_prec1": torch.tensor(77.34), "optimizer": {"state": {}, "param_groups": []}}, path)
    model = models.resnet50(attention="cbam", backend="torch")
    info = load_official_checkpoint(model, path)
    assert info["epoch"] == 90 and "state_dict" not in info
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(cbam_state)
    for key, value in cbam_state.items():
        assert torch.equal(loaded[key], value), key


def test_a_cbam_checkpoint_and_a_model_of_another_attention_say_which_to_build(cbam_state):
    for model, has in ((models.resnet50(backend="torch"), "the model BAM"),
                       (models.resnet50(bam=False), "the model no attention module")):
        with pytest.raises(CheckpointMismatchError) as caught:
            load_official_checkpoint(model, {"state_dict": cbam_state})
        message = str(caught.value)
        assert f"the checkpoint has CBAM, {has}: build the model with attention='cbam'" in message
        assert "layer4.2.cbam.SpatialGate.spatial.conv.weight" in message  # listed as unexpected
    plain = random_checkpoint_state(official_layout(50, bam=False))
    with pytest.raises(CheckpointMismatchError, match="build the model with attention=None"):
        load_official_checkpoint(models.resnet50(attention="cbam", backend="torch"), plain)


def test_a_cbam_mismatch_lists_the_keys_and_loads_nothing(cbam_state):
    model = _small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {f"module.{k}": torch.ones_like(v) for k, v in before.items()}
    del state["module.layer2.1.cbam.ChannelGate.mlp.3.bias"]
    state["module.layer2.0.cbam.ChannelGate.mlp.1.weight"] = torch.ones(8, 16)  # a reduction of 2, not 4
    with pytest.raises(CheckpointMismatchError) as caught:
        load_official_checkpoint(model, {"state_dict": state})
    assert caught.value.missing == ["layer2.1.cbam.ChannelGate.mlp.3.bias"] and caught.value.unexpected == []
    assert "layer2.0.cbam.ChannelGate.mlp.1.weight: checkpoint (8, 16) vs model (4, 16)" in str(caught.value)
    assert "build the model with" not in str(caught.value)  # same attention on both sides: no such advice
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("train", [False, True])
def test_loaded_network_computes_what_the_authors_code_computes(train, cbam_state):
    """With a checkpoint loaded, our CBAM-ResNet equals the same network with each CBAM replaced by the authors'
    forward (bench.providers.AuthorsCBAM on the same weights)."""
    state = random_checkpoint_state(official_cbam_layout(18), seed=4)
    ours = models.resnet18(attention="cbam", backend="torch")
    load_official_checkpoint(ours, {"state_dict": state})
    theirs = copy.deepcopy(ours)
    for block in (b for stage in models.CBAM_STAGES for b in getattr(theirs, stage)):
        block.cbam = AuthorsCBAM(block.cbam)
    ours.train(train), theirs.train(train)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# add_cbam on torchvision-style ResNets (torchvision's block code, re-created: torchvision is not installed here)
# ----------------------------------------------------------------------------------------------------------------------


class TVBasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock's structure and forward (in-place residual addition)."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVBottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck's structure and forward."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVResNet(nn.Module):
    """torchvision.models.ResNet's layout at a given width, with the CIFAR stem of bam_triton's (3x3 conv, no max-pool
    module: ``maxpool`` stays an Identity there, so the keys are the same)."""

    def __init__(self, block, layers, num_classes=10, width=8):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        stage = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.mark.parametrize("block, layers, ours", [(TVBasicBlock, (2, 2, 2, 2), models.resnet18),
                                                 (TVBottleneck, (3, 4, 6, 3), models.resnet50)])
def test_add_cbam_on_a_torchvision_resnet_is_the_cbam_resnet(block, layers, ours, device):
    """Same keys as ours with attention='cbam' (the authors' layout), the same outputs once the same weights are
    loaded, in eval and in train mode; gradients reach every CBAM."""
    torch.manual_seed(0)
    model = TVResNet(block, layers).to(device)
    backbone_keys = list(model.state_dict())
    assert add_cbam(model, reduction=4, backend="torch") is model
    reference = _small(ours).to(device)
    assert sorted(model.state_dict()) == sorted(reference.state_dict())
    assert [k for k in model.state_dict() if ".cbam." not in k] == backbone_keys
    assert [c.channels for _, c in cbam_modules(model)] == [c.channels for _, c in cbam_modules(reference)]
    assert all(torch.count_nonzero(c.SpatialGate.spatial.bn.weight) == 0 for _, c in cbam_modules(model))
    load_official_checkpoint(model, reference.state_dict())
    x = torch.randn(2, 3, 16, 16).to(device)
    for train in (False, True):
        model.train(train), reference.train(train)
        torch.testing.assert_close(model(x), reference(x))
    model.train()
    model(x).sum().backward()
    assert all(c.ChannelGate.mlp[1].weight.grad is not None for _, c in cbam_modules(model))


def test_add_cbam_on_our_plain_resnet_uses_the_blocks_own_cbam(device):
    torch.manual_seed(0)
    reference = _small().eval().to(device)
    converted = add_cbam(_small(attention=None).to(device), reduction=4, backend="torch").eval()
    assert all(not block.bn2._forward_hooks for block in converted.layer1)  # our blocks call their cbam themselves
    load_official_checkpoint(converted, reference.state_dict())
    x = torch.randn(2, 3, 16, 16).to(device)
    torch.testing.assert_close(converted(x), reference(x))


def test_add_cbam_follows_device_dtype_and_mode_and_copies_with_the_model():
    model = TVResNet(TVBasicBlock, (1, 1, 1, 1)).double()
    model.layer2.eval()
    add_cbam(model, stages=("layer1", "layer2"), reduction=4, backend="torch")
    assert model.layer1[0].cbam.ChannelGate.mlp[1].weight.dtype == torch.float64
    assert model.layer1[0].cbam.training and not model.layer2[0].cbam.training
    assert not hasattr(model.layer3[0], "cbam")
    model.eval()
    clone = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    before = clone(x)
    with torch.no_grad():
        model.layer1[0].cbam.SpatialGate.spatial.bn.bias.fill_(5.0)
    torch.testing.assert_close(clone(x), before)  # the copy's hook calls the copy's CBAM
    assert not torch.allclose(model(x), before)


def test_add_cbam_refuses_what_it_cannot_place_cbam_in():
    class NotAResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer1 = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
            self.layer2 = nn.Conv2d(8, 8, 3)

    with pytest.raises(ValueError, match=r"no submodule 'layer1'"):
        add_cbam(nn.Sequential(nn.Conv2d(3, 8, 3)))
    with pytest.raises(ValueError, match=r"layer1\.0 \(Conv2d\) is not a BasicBlock or Bottleneck"):
        add_cbam(NotAResNet(), stages=("layer1",))
    with pytest.raises(ValueError, match=r"'layer2' is a Conv2d, not a non-empty nn.Sequential"):
        add_cbam(NotAResNet(), stages=("layer2",))
    with pytest.raises(ValueError, match="distinct"):
        add_cbam(TVResNet(TVBasicBlock, (1, 1, 1, 1)), stages=("layer1", "layer1"))
    model = add_cbam(TVResNet(TVBasicBlock, (1, 1, 1, 1)), reduction=4)
    with pytest.raises(ValueError, match=r"layer1\.0 already has an attribute 'cbam'"):
        add_cbam(model, reduction=4)
    with pytest.raises(ValueError, match="already"):
        add_cbam(_small(), reduction=4)
    fresh = TVResNet(TVBasicBlock, (1, 1, 1, 1))
    keys = list(fresh.state_dict())
    with pytest.raises(ValueError, match="channels // reduction"):
        add_cbam(fresh, reduction=16)  # layer1's 8 channels // 16 = 0: refused before any block is changed
    assert list(fresh.state_dict()) == keys and not any(hasattr(b, "cbam") for b in fresh.modules())
    with pytest.raises(TypeError, match="combine: not an option of attention='cbam'"):
        add_cbam(fresh, combine="sum")


def test_add_cbam_on_torchvision_itself():
    """Where torchvision is installed: its resnet18 and resnet50 get the authors' CBAM keys and parameter totals."""
    torchvision = pytest.importorskip("torchvision")
    for depth in (18, 50):
        model = add_cbam(getattr(torchvision.models, f"resnet{depth}")(weights=None), backend="torch")
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_cbam_layout(depth)
        assert _count(model) == CBAM_TOTALS[depth]
        model.eval()(torch.randn(1, 3, 64, 64))


# ----------------------------------------------------------------------------------------------------------------------
# The training example trains the plain network, BAM and CBAM side by side
# ----------------------------------------------------------------------------------------------------------------------




def test_example_builds_the_three_models_on_one_backbone(example):
    built = {attention: example.build_model(attention, width=8) for attention in example.ATTENTIONS}
    assert cbam_modules(built["cbam"]) and models.bam_modules(built["bam"])
    assert not cbam_modules(built["none"]) and not models.bam_modules(built["none"])
    for key, value in built["none"].state_dict().items():
        assert torch.equal(value, built["bam"].state_dict()[key]) and torch.equal(value, built["cbam"].state_dict()[key])


@pytest.mark.slow_on_gpu
def test_example_trains_the_cbam_model(example):
    """24 steps on 64 images: the training loss falls well below chance (ln 10). Slower than the BAM model's (see
    test_models): with the authors' init every block's spatial gate starts at 0.5, halving its residual branch
    (here 2.32 -> 1.74 at lr 0.1; BAM 2.39 -> 0.86 at 0.05)."""
    train_set = example.make_shapes(64, seed=0)
    model = example.build_model("cbam", width=8, seed=0)
    rows, step_losses = example.train(model, train_set, example.make_shapes(64, seed=1), epochs=12, steps_per_epoch=2,
                                      batch_size=32, lr=0.1, seed=0, log=lambda message: None)
    first, last = sum(step_losses[:4]) / 4, sum(step_losses[-4:]) / 4
    assert first > 2.0 and last < 0.85 * first, (first, last)
    assert rows[-1]["train_loss"] < rows[1]["train_loss"]


def test_example_command_line_trains_all_three(example, tmp_path, capsys):
    assert example.main(["--epochs", "1", "--steps", "1", "--train-size", "64", "--test-size", "32", "--batch-size",
                         "32", "--width", "8", "--out", str(tmp_path)]) == 0
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert {line.split(",")[0] for line in rows[1:]} == {"resnet18", "resnet18+bam", "resnet18+cbam"}
    assert (tmp_path / "curves.png").exists() and (tmp_path / "attention.png").exists()
    assert (tmp_path / "attention_cbam.png").exists()
