"""bam_triton.models: the ResNet(+BAM) layouts and parameter totals, BAM placement, init, the authors' checkpoint
format, add_bam on a foreign network, and the synthetic training example. The forward and training tests run on the
``device`` of this run (tests/devices.py); the training example runs on CPU, as the example itself does."""
import copy
import warnings

import pytest
import torch
from torch import nn

from bam_triton import models
from bam_triton.models import CheckpointMismatchError, add_bam, load_official_checkpoint



# ----------------------------------------------------------------------------------------------------------------------
# An independent re-creation of the authors' key -> shape layout, from the rules in /work/shared/official_bam_keys.md
# and torchvision's naming (deliberately not derived from bam_triton.models).
# ----------------------------------------------------------------------------------------------------------------------

BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def _bn(layout, prefix, channels):
    for suffix in ("weight", "bias", "running_mean", "running_var"):
        layout[f"{prefix}.{suffix}"] = (channels,)
    layout[f"{prefix}.num_batches_tracked"] = ()


def _bam(layout, prefix, c):
    h = c // 16
    gate_c, gate_s = f"{prefix}.channel_att.gate_c", f"{prefix}.spatial_att.gate_s"
    layout[f"{gate_c}.gate_c_fc_0.weight"] = (h, c)
    layout[f"{gate_c}.gate_c_fc_0.bias"] = (h,)
    _bn(layout, f"{gate_c}.gate_c_bn_1", h)
    layout[f"{gate_c}.gate_c_fc_final.weight"] = (c, h)
    layout[f"{gate_c}.gate_c_fc_final.bias"] = (c,)
    layout[f"{gate_s}.gate_s_conv_reduce0.weight"] = (h, c, 1, 1)
    layout[f"{gate_s}.gate_s_conv_reduce0.bias"] = (h,)
    _bn(layout, f"{gate_s}.gate_s_bn_reduce0", h)
    for i in range(2):
        layout[f"{gate_s}.gate_s_conv_di_{i}.weight"] = (h, h, 3, 3)
        layout[f"{gate_s}.gate_s_conv_di_{i}.bias"] = (h,)
        _bn(layout, f"{gate_s}.gate_s_bn_di_{i}", h)
    layout[f"{gate_s}.gate_s_conv_final.weight"] = (1, h, 1, 1)
    layout[f"{gate_s}.gate_s_conv_final.bias"] = (1,)


def official_layout(depth, bam=True, num_classes=1000):
    """{state_dict key: shape} of the authors' ResNet-<depth>(+BAM) for ImageNet."""
    bottleneck = depth >= 50
    expansion = 4 if bottleneck else 1
    layout = {"conv1.weight": (64, 3, 7, 7)}
    _bn(layout, "bn1", 64)
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), BLOCKS[depth]), start=1):
        for i in range(blocks):
            prefix = f"layer{stage}.{i}"
            stride = 2 if (i == 0 and stage > 1) else 1
            if bottleneck:
                layout[f"{prefix}.conv1.weight"] = (planes, inplanes, 1, 1)
                layout[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
                layout[f"{prefix}.conv3.weight"] = (planes * 4, planes, 1, 1)
                for j, channels in ((1, planes), (2, planes), (3, planes * 4)):
                    _bn(layout, f"{prefix}.bn{j}", channels)
            else:
                layout[f"{prefix}.conv1.weight"] = (planes, inplanes, 3, 3)
                layout[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
                _bn(layout, f"{prefix}.bn1", planes)
                _bn(layout, f"{prefix}.bn2", planes)
            out = planes * expansion
            if i == 0 and (stride != 1 or inplanes != out):
                layout[f"{prefix}.downsample.0.weight"] = (out, inplanes, 1, 1)
                _bn(layout, f"{prefix}.downsample.1", out)
            inplanes = out
        if bam and stage <= 3:
            _bam(layout, f"bam{stage}", inplanes)
    layout["fc.weight"] = (num_classes, 512 * expansion)
    layout["fc.bias"] = (num_classes,)
    return layout


def _parameter_total(layout):
    total = 0
    for key, shape in layout.items():
        if not key.endswith(BUFFER_SUFFIXES):
            total += torch.Size(shape).numel()
    return total


def random_checkpoint_state(layout, seed=0):
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.randint(1, 10**6, (), generator=generator, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator)
    return state


def _count(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------------
# Layout and parameter totals
# ----------------------------------------------------------------------------------------------------------------------


def test_independent_layout_reproduces_the_documented_totals():
    """Guards the reference itself: the re-created layout has the doc's parameter totals."""
    assert _parameter_total(official_layout(50, bam=False)) == 25_557_032
    assert _parameter_total(official_layout(50, bam=True)) == 25_915_099
    assert _parameter_total(official_layout(18, bam=False)) == 11_689_512
    assert _parameter_total(official_layout(18, bam=True)) == 11_712_503


@pytest.mark.parametrize("factory, bam, total", [
    (models.resnet18, False, 11_689_512), (models.resnet18, True, 11_712_503),
    (models.resnet50, False, 25_557_032), (models.resnet50, True, 25_915_099),
    (models.resnet34, False, 21_797_672), (models.resnet101, False, 44_549_160),  # torchvision's totals
])
def test_parameter_totals(factory, bam, total):
    assert _count(factory(bam=bam, backend="torch")) == total


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
@pytest.mark.parametrize("bam", [False, True])
def test_state_dict_layout_matches_the_authors(depth, bam):
    model = getattr(models, f"resnet{depth}")(bam=bam, backend="torch")
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    expected = official_layout(depth, bam=bam)
    assert sorted(ours) == sorted(expected)
    assert ours == expected
    if not bam:
        assert not any(key.startswith("bam") for key in ours)


def test_bam_per_stage_parameter_counts_match_the_doc():
    counts = {name: _count(module) for name, module in models.bam_modules(models.resnet50(backend="torch"))}
    assert counts == {"bam1": 17_361, "bam2": 68_513, "bam3": 272_193}
    counts = {name: _count(module) for name, module in models.bam_modules(models.resnet18(backend="torch"))}
    assert counts == {"bam1": 1_173, "bam2": 4_457, "bam3": 17_361}


def test_bottleneck_stride_is_on_the_3x3_conv():
    model = models.resnet50(bam=False)
    block = model.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2) and block.conv3.stride == (1, 1)
    assert block.downsample[0].stride == (2, 2)


def test_default_combine_is_product_and_bam_kwargs_pass_through():
    model = models.resnet18(backend="torch")
    assert {bam.combine for _, bam in models.bam_modules(model)} == {"product"}
    model = models.resnet18(combine="sum", reduction=8, dilation=2, backend="torch")
    for _, bam in models.bam_modules(model):
        assert (bam.combine, bam.reduction, bam.dilation, bam.backend) == ("sum", 8, 2, "torch")


# ----------------------------------------------------------------------------------------------------------------------
# Forward: where BAM sits, the CIFAR stem
# ----------------------------------------------------------------------------------------------------------------------


def _record_io(model, names):
    """Forward hooks recording (input, output) of the named submodules."""
    seen = {}
    for name in names:
        model.get_submodule(name).register_forward_hook(
            lambda module, inputs, output, name=name: seen.__setitem__(name, (inputs[0], output)))
    return seen


@pytest.mark.slow_on_gpu
@pytest.mark.parametrize("cifar, size, maps", [(True, 32, (32, 16, 8)), (False, 64, (16, 8, 4))])
def test_bam_follows_layers_1_to_3_and_not_layer4(cifar, size, maps, device):
    torch.manual_seed(0)
    model = models.resnet18(num_classes=10, cifar=cifar, backend="torch").to(device)
    seen = _record_io(model, ["layer1", "layer2", "layer3", "layer4", "bam1", "bam2", "bam3", "avgpool"])
    out = model(torch.randn(2, 3, size, size).to(device))
    assert out.shape == (2, 10)
    for k, (channels, side) in enumerate(zip((64, 128, 256), maps), start=1):
        stage_out = seen[f"layer{k}"][1]
        bam_in, bam_out = seen[f"bam{k}"]
        assert bam_in is stage_out  # BAM reads exactly the stage's output...
        assert bam_in.shape == (2, channels, side, side)
        if k < 3:
            assert seen[f"layer{k + 1}"][0] is bam_out  # ...and the next stage reads BAM's output
    assert seen["layer4"][0] is seen["bam3"][1]
    assert seen["avgpool"][0] is seen["layer4"][1]  # no BAM after layer4


def test_cifar_stem():
    model = models.resnet18(cifar=True, bam=False)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    imagenet = models.resnet18(bam=False)
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)


def test_width_scales_every_stage(device):
    model = models.resnet18(num_classes=10, cifar=True, width=8, reduction=4, backend="torch").to(device)
    assert [bam.channels for _, bam in models.bam_modules(model)] == [8, 16, 32]
    assert model.fc.in_features == 64
    assert model(torch.randn(2, 3, 16, 16).to(device)).shape == (2, 10)


@pytest.mark.parametrize("combine", ["sum", "product"])
def test_training_step_reaches_every_parameter(combine, device):
    torch.manual_seed(0)
    model = models.resnet18(num_classes=10, cifar=True, width=8, reduction=4, combine=combine, backend="torch")
    model.to(device)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16).to(device)),
                                       torch.tensor([0, 1, 2, 3], device=device))
    loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_initialisation_like_torchvision():
    torch.manual_seed(0)
    model = models.resnet50(backend="torch")
    conv = model.layer3[0].conv2  # 256 -> 256, 3x3: fan_out = 256 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.05)
    bam_conv = model.bam2.spatial_att.gate_s.gate_s_conv_reduce0  # 512 -> 32, 1x1: fan_out = 32
    assert bam_conv.weight.std().item() == pytest.approx((2 / 32) ** 0.5, rel=0.05)
    assert torch.count_nonzero(bam_conv.bias) == 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    zero_init = models.resnet18(zero_init_residual=True, backend="torch")
    assert torch.count_nonzero(zero_init.layer1[0].bn2.weight) == 0


# ----------------------------------------------------------------------------------------------------------------------
# The authors' checkpoint format
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_state():
    return random_checkpoint_state(official_layout(50, bam=True), seed=1)


def _assert_loaded(model, state):
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_loads_the_authors_training_checkpoint_file(tmp_path, official_state):
    path = tmp_path / "RESNET50_IMAGENET_BAM_best.pth.tar"
    torch.save({"epoch": 90, "arch": "resnet", "state_dict": {f"module.{k}": v for k, v in official_state.items()},
                "best_prec1": torch.tensor(76.86),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.0001, "momentum": 0.9, "params": [0, 1]}]}},
               path)
    model = models.resnet50(backend="torch")
    info = load_official_checkpoint(model, path)
    _assert_loaded(model, official_state)
    assert info["epoch"] == 90 and info["arch"] == "resnet" and float(info["best_prec1"]) == pytest.approx(76.86)
    assert "state_dict" not in info and "optimizer" not in info


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_loads_a_bare_state_dict(tmp_path, official_state, prefix):
    path = tmp_path / "bare.pth"
    torch.save({prefix + k: v for k, v in official_state.items()}, path)
    model = models.resnet50(backend="torch")
    assert load_official_checkpoint(model, str(path)) == {}
    _assert_loaded(model, official_state)


def test_loads_into_a_wrapped_model_and_fills_num_batches_tracked():
    source = models.resnet18(num_classes=10, cifar=True, width=8, reduction=4, backend="torch")
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    target = nn.DataParallel(models.resnet18(num_classes=10, cifar=True, width=8, reduction=4, backend="torch"))
    load_official_checkpoint(target, {"state_dict": state})
    for key, value in state.items():
        assert torch.equal(target.module.state_dict()[key], value)


def test_mismatch_lists_missing_unexpected_and_shapes():
    model = models.resnet18(num_classes=10, cifar=True, width=8, reduction=4, backend="torch")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {f"module.{k}": torch.zeros_like(v) for k, v in before.items()}
    del state["module.bam2.channel_att.gate_c.gate_c_fc_0.weight"]
    state["module.bam4.spatial_att.gate_s.gate_s_conv_final.bias"] = torch.zeros(1)
    state["module.fc.weight"] = torch.zeros(1000, 64)
    with pytest.raises(CheckpointMismatchError) as caught:
        load_official_checkpoint(model, {"epoch": 1, "state_dict": state})
    message = str(caught.value)
    assert "missing" in message and "bam2.channel_att.gate_c.gate_c_fc_0.weight" in message
    assert "unexpected" in message and "bam4.spatial_att.gate_s.gate_s_conv_final.bias" in message
    assert "fc.weight: checkpoint (1000, 64) vs model (10, 64)" in message
    assert caught.value.missing == ["bam2.channel_att.gate_c.gate_c_fc_0.weight"]
    # Nothing was loaded: the model is untouched.
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_a_plain_resnet_rejects_a_bam_checkpoint(official_state):
    with pytest.raises(CheckpointMismatchError, match=r"unexpected key\(s\)[\s\S]*bam1\.channel_att"):
        load_official_checkpoint(models.resnet50(bam=False), official_state)


def test_combine_of_a_checkpoint(tmp_path):
    """The authors' files record no combine: loading one into "sum" BAMs warns. Ours record each BAM's (state_dict
    metadata): loading into the other combine raises, also through a DataParallel prefix and a file."""
    source = models.resnet18(num_classes=10, cifar=True, width=8, reduction=4, backend="torch")
    target = models.resnet18(num_classes=10, cifar=True, width=8, reduction=4, combine="sum", backend="torch")
    authors_like = dict(source.state_dict())  # a plain dict: keys and tensors only, as the authors' files
    with pytest.warns(UserWarning, match="combine='product'"):
        load_official_checkpoint(target, authors_like)
    with pytest.raises(CheckpointMismatchError, match="bam1: checkpoint combine='product', model combine='sum'") as info:
        load_official_checkpoint(target, source.state_dict())
    assert info.value.combine_mismatches == [(f"bam{i}", "product", "sum") for i in (1, 2, 3)]
    assert "build the model with combine='product'" in str(info.value) and "architecture" not in str(info.value)
    path = tmp_path / "ours.pth.tar"
    torch.save({"epoch": 1, "state_dict": nn.DataParallel(source).state_dict()}, path)  # keys under module.
    with pytest.raises(CheckpointMismatchError, match="bam3: checkpoint combine='product'"):
        load_official_checkpoint(target, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_official_checkpoint(source, path)
        load_official_checkpoint(models.resnet18(num_classes=10, cifar=True, width=8, reduction=4, combine="sum"),
                                 target.state_dict())  # ours, trained with sum: nothing to warn about


def test_rejects_what_is_not_a_checkpoint():
    with pytest.raises(ValueError, match="not a state_dict"):
        load_official_checkpoint(models.resnet18(), {"epoch": 3, "arch": "resnet"})


# ----------------------------------------------------------------------------------------------------------------------
# add_bam
# ----------------------------------------------------------------------------------------------------------------------


class _DownStage(nn.Module):
    """A stage that is not an nn.Sequential: conv (stride 2) + BN + ReLU, in -> out channels."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class TinyResNet(nn.Module):
    """A fake torchvision-style ResNet: stem, layer1 (Sequential), layer2/layer3 (custom stages), pool, fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.layer2 = _DownStage(8, 16)
        self.layer3 = _DownStage(16, 32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_add_bam_infers_channels_and_keeps_backbone_keys(device):
    """(On the run's device: the dry run must use the model's device.)"""
    torch.manual_seed(0)
    model = TinyResNet().to(device)
    backbone_keys = list(model.state_dict())
    stats_before = model.stem[1].running_mean.clone()
    model.train()
    model.layer2.eval()  # a deliberately mixed set of flags, which add_bam must restore one by one
    flags = {name: m.training for name, m in model.named_modules()}
    assert add_bam(model, reduction=4, backend="torch") is model
    assert [model.bam1.channels, model.bam2.channels, model.bam3.channels] == [8, 16, 32]
    assert model.bam1.combine == "product" and model.bam1.reduction == 4
    keys = list(model.state_dict())
    assert keys[:len(backbone_keys)] == backbone_keys  # backbone keys unchanged, BAM keys appended
    assert {k.split(".")[0] for k in keys[len(backbone_keys):]} == {"bam1", "bam2", "bam3"}
    assert torch.equal(model.stem[1].running_mean, stats_before)  # the dry run ran in eval mode
    restored = {name: m.training for name, m in model.named_modules() if not name.startswith("bam")}
    assert restored == flags
    assert model.bam2.training is False and model.bam1.training is True  # each BAM follows its stage
    assert any(p is model.bam3.channel_att.gate_c.gate_c_fc_0.weight for p in model.parameters())


def test_add_bam_forward_is_bam_after_each_stage(device):
    torch.manual_seed(0)
    model = add_bam(TinyResNet().to(device), reduction=4, backend="torch").eval()
    x = torch.randn(2, 3, 16, 16).to(device)
    expected = model.bam1(model.layer1.forward(model.stem(x)))
    # Calling the stages directly would fire their hooks; compute each stage's raw output through forward().
    expected = model.bam2(model.layer2.forward(expected))
    expected = model.bam3(model.layer3.forward(expected))
    expected = model.fc(expected.mean(dim=(2, 3)))
    torch.testing.assert_close(model(x), expected)
    plain = TinyResNet().to(device)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("bam")})
    assert not torch.allclose(plain.eval()(x), model(x))


def test_add_bam_names_other_stages_and_refuses_duplicates():
    model = add_bam(TinyResNet(), stages=("layer2", "stem.2"), reduction=4, backend="torch")
    assert model.bam2.channels == 16 and model.bam_stem_2.channels == 8
    with pytest.raises(ValueError, match="already"):
        add_bam(model, stages=("layer2",), reduction=4)
    with pytest.raises(ValueError, match="distinct"):
        add_bam(TinyResNet(), stages=("layer1", "layer1"))


def _gray_tiny_resnet():
    model = TinyResNet()
    model.stem[0] = nn.Conv2d(1, 8, 3, padding=1, bias=False)  # 1-channel images
    return model


def test_add_bam_errors_name_add_bam_and_what_to_pass():
    with pytest.raises(ValueError, match=r"^add_bam .* the default example_input, zeros\(1, 3, 64, 64\): RuntimeError: "
                                         r".*Pass example_input=<a batch your model accepts>"):
        add_bam(_gray_tiny_resnet())
    with pytest.raises(ValueError, match=r"^add_bam .* example_input of shape \(2, 3, 8, 8\)"):
        add_bam(_gray_tiny_resnet(), example_input=torch.zeros(2, 3, 8, 8))
    assert add_bam(_gray_tiny_resnet(), example_input=torch.zeros(1, 1, 8, 8), reduction=4).bam3.channels == 32
    with pytest.raises(ValueError, match=r"^add_bam: .* no 'layer5' .*; its top-level submodules: stem, layer1, "
                                         r"layer2, layer3, fc$"):
        add_bam(TinyResNet(), stages=("layer2", "layer5"))
    with pytest.raises(ValueError, match=r"^add_bam: .* no 'layer1.7'"):
        add_bam(TinyResNet(), stages="layer1.7")


def test_add_bam_deepcopy_uses_the_copys_bam(device):
    torch.manual_seed(0)
    model = add_bam(TinyResNet().to(device), reduction=4, backend="torch").eval()
    clone = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16).to(device)
    before = clone(x)
    with torch.no_grad():
        model.bam1.spatial_att.gate_s.gate_s_conv_final.bias.fill_(5.0)
    torch.testing.assert_close(clone(x), before)
    assert not torch.allclose(model(x), before)


def test_add_bam_on_our_plain_resnet_gives_the_bam_resnet(device):
    """add_bam(resnet18(bam=False)) has the authors' keys (bam1..3) and computes what resnet18(bam=True) does."""
    torch.manual_seed(0)
    reference = models.resnet18(num_classes=10, cifar=True, width=8, reduction=4, backend="torch").eval().to(device)
    converted = add_bam(models.resnet18(num_classes=10, cifar=True, width=8, reduction=4, bam=False).to(device),
                        reduction=4, backend="torch").eval()
    assert list(converted.state_dict()) != [] and sorted(converted.state_dict()) == sorted(reference.state_dict())
    load_official_checkpoint(converted, reference.state_dict())
    x = torch.randn(2, 3, 16, 16).to(device)
    torch.testing.assert_close(converted(x), reference(x))


# ----------------------------------------------------------------------------------------------------------------------
# The training example
# ----------------------------------------------------------------------------------------------------------------------




def test_synthetic_shapes_are_deterministic_and_balanced(example):
    images, labels = example.make_shapes(200, seed=5)
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert torch.bincount(labels, minlength=10).tolist() == [20] * 10
    again, labels_again = example.make_shapes(200, seed=5)
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    assert not torch.equal(images, example.make_shapes(200, seed=6)[0])


def test_same_seed_gives_both_models_the_same_backbone(example):
    plain, with_bam = example.build_model("none", width=8), example.build_model("bam", width=8)
    bam_state = with_bam.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, bam_state[key]), key


@pytest.mark.slow_on_gpu
def test_short_training_run_decreases_the_loss(example):
    """24 steps on 64 images with the example's own train(): the training loss falls well below chance (ln 10)."""
    torch.manual_seed(0)
    train_set = example.make_shapes(64, seed=0)
    test_set = example.make_shapes(64, seed=1)
    model = example.build_model("bam", width=8, seed=0)
    rows, step_losses = example.train(model, train_set, test_set, epochs=12, steps_per_epoch=2, batch_size=32,
                                      lr=0.05, seed=0, log=lambda message: None)
    assert len(step_losses) == 24 and [row["epoch"] for row in rows] == list(range(13))
    first, last = sum(step_losses[:4]) / 4, sum(step_losses[-4:]) / 4
    assert first > 2.0 and last < 0.6 * first, (first, last)
    assert rows[-1]["train_loss"] < rows[1]["train_loss"]


def test_load_official_checkpoint_names_a_file_it_cannot_read(tmp_path):
    """Not a checkpoint (text) or cut short: CheckpointReadError, a ValueError naming the file, not torch's pickle
    error."""
    from bam_triton.models import CheckpointReadError, load_official_checkpoint, resnet18

    good = tmp_path / "good.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:100])
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    # Short texts that torch.load's unpickler reads as opcodes: KeyError, struct.error, IndexError inside it.
    opcodes = [tmp_path / f"{i}.pt" for i in range(4)]
    for path, content in zip(opcodes, ("hi", "hello", "jj", "K")):
        path.write_text(content)
    # Files torch.load reads that hold no state_dict: a list, a dict of other things.
    no_state = [tmp_path / "list.pt", tmp_path / "notes.pt"]
    torch.save([torch.zeros(2)], no_state[0])
    torch.save({"epoch": 3, "note": "no weights"}, no_state[1])
    for path in no_state:
        with pytest.raises(CheckpointReadError, match="holds no state_dict"):
            load_official_checkpoint(resnet18(), str(path))
    for path in (cut, text, *opcodes):
        with pytest.raises(CheckpointReadError, match="cannot be read") as info:
            load_official_checkpoint(resnet18(), str(path))
        assert str(path) in str(info.value) and isinstance(info.value, ValueError)
