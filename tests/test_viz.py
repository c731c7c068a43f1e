"""bam_triton.viz: the recorded attention is what BAM and CBAM apply, hooks come off, the figure and the CLI command. The
models run on the ``device`` of this run (tests/devices.py); the recorder hands back CPU tensors whatever the device."""
import os

import pytest
import torch
from torch import nn

from bam_triton import models
from bam_triton.cli import main as cli_main
from bam_triton.viz import AttentionRecorder, attention_maps, last_block_per_stage, plot_attention, synthetic_images

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _tiny_model(combine="product", seed=0, device="cpu"):
    torch.manual_seed(seed)
    model = models.resnet18(num_classes=10, cifar=True, width=16, reduction=4, combine=combine, backend="torch")
    with torch.no_grad():  # non-trivial BN statistics, so that the eval-mode maps are not near-constant
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_var.uniform_(0.5, 2.0)
                module.running_mean.uniform_(-0.2, 0.2)
    return model.eval().to(device)


@pytest.mark.parametrize("combine", ["sum", "product"])
def test_combined_map_is_the_attention_bam_applies(combine, device):
    """BAM computes F' = F * (1 + A): the recorder's A, rebuilt from the hooked Mc and Ms, must equal F'/F - 1."""
    model = _tiny_model(combine, device=device)
    io = {}
    model.bam2.register_forward_hook(lambda m, inputs, output: io.update(f=inputs[0].clone().cpu(),
                                                                         out=output.clone().cpu()))
    with AttentionRecorder(model) as recorder, torch.no_grad():
        model(torch.rand(3, 3, 32, 32).to(device))
    mc, ms, recorded_combine = recorder.logits["bam2"]
    assert recorded_combine == combine and mc.shape == (3, 32) and ms.shape == (3, 1, 16, 16)
    logits = mc[:, :, None, None] + ms if combine == "sum" else mc[:, :, None, None] * ms
    attention = torch.sigmoid(logits)
    f, out = io["f"], io["out"]
    nonzero = f.abs() > 1e-2
    assert nonzero.float().mean() > 0.2  # enough positions to make the comparison meaningful
    torch.testing.assert_close((out / f - 1)[nonzero], attention[nonzero], atol=1e-4, rtol=1e-4)
    maps = recorder.maps("combined")
    torch.testing.assert_close(maps["bam2"], attention.mean(dim=1))
    assert sorted(maps) == ["bam1", "bam2", "bam3"]
    assert [tuple(m.shape) for m in maps.values()] == [(3, 32, 32), (3, 16, 16), (3, 8, 8)]


def test_spatial_map_is_sigmoid_of_the_spatial_branch(device):
    model = _tiny_model(device=device)
    inputs = {}
    model.bam3.register_forward_hook(lambda m, args, output: inputs.update(f=args[0].clone()))
    with AttentionRecorder(model) as recorder, torch.no_grad():
        model(torch.rand(2, 3, 32, 32).to(device))
        expected = torch.sigmoid(model.bam3.spatial_att(inputs["f"]))[:, 0].cpu()
    torch.testing.assert_close(recorder.maps("spatial")["bam3"], expected)
    assert recorder.maps("spatial")["bam3"].shape == (2, 8, 8)
    with pytest.raises(ValueError, match="kind"):
        recorder.maps("volume")


def test_hooks_are_removed_and_model_state_restored(device):
    model = _tiny_model(device=device).train()
    maps = attention_maps(model, torch.rand(2, 3, 32, 32), kind="combined")
    assert model.training  # attention_maps runs in eval mode and restores the flag
    for _, bam in models.bam_modules(model):
        assert not bam.spatial_att._forward_hooks and not bam.channel_att._forward_hooks
    assert all(0 <= m.min() and m.max() <= 1 for m in maps.values())


def test_recorder_needs_bam_and_a_forward():
    with pytest.raises(ValueError, match="no BAM"):
        AttentionRecorder(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with AttentionRecorder(_tiny_model()) as recorder:
        with pytest.raises(RuntimeError, match="forward"):
            recorder.maps()


def test_synthetic_images():
    images = synthetic_images(3, size=48, seed=1)
    assert images.shape == (3, 3, 48, 48) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, synthetic_images(3, size=48, seed=1))


@pytest.mark.parametrize("scale", ["per-map", "fixed"])
def test_plot_attention_writes_a_png(tmp_path, scale, device):
    images = synthetic_images(2, size=32, seed=0)  # CPU images: attention_maps moves them to the model's device
    maps = attention_maps(_tiny_model(device=device), images)
    path = plot_attention(images, maps, tmp_path / "grid.png", title="test", scale=scale)
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5_000
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(path).shape
    assert width > height  # 4 columns (input + 3 BAMs) by 2 rows


def test_cli_attention_random_and_from_checkpoint(tmp_path, capsys):
    out = tmp_path / "random.png"
    assert cli_main(["attention", "--images", "2", "--size", "64", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    checkpoint = tmp_path / "ckpt.pth.tar"
    torch.manual_seed(3)
    state = models.resnet18(backend="torch").state_dict()
    torch.save({"epoch": 7, "arch": "resnet", "state_dict": {f"module.{k}": v for k, v in state.items()},
                "best_prec1": 1.0, "optimizer": {}}, checkpoint)
    out = tmp_path / "loaded.png"
    assert cli_main(["attention", "--checkpoint", str(checkpoint), "--images", "1", "--size", "64",
                     "--map", "spatial", "--out", str(out)]) == 0
    assert out.exists() and f"wrote {out}" in capsys.readouterr().out
    capsys.readouterr()
    assert cli_main(["attention", "--images", "0", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "error: bam-triton attention: --images must be >= 1, got 0"


def _tiny_cbam_model(seed=0, device="cpu"):
    torch.manual_seed(seed)
    model = models.resnet18(num_classes=10, cifar=True, width=16, attention="cbam", reduction=4, backend="torch")
    with torch.no_grad():  # non-trivial BN statistics and spatial gates (the authors' init zeroes their BN weight)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_var.uniform_(0.5, 2.0)
                module.running_mean.uniform_(-0.2, 0.2)
                module.weight.uniform_(0.5, 1.5)
    return model.eval().to(device)


def test_cbam_maps_are_the_attention_cbam_applies(device):
    """CBAM computes F' = F · a · b: the recorder's maps, rebuilt from the hooked channel and spatial logits, must
    give F'/F = sigmoid(Mc) · sigmoid(Ms); combined is its mean over channels, spatial sigmoid(Ms)."""
    model = _tiny_cbam_model(device=device)
    io = {}
    model.layer2[1].cbam.register_forward_hook(lambda m, inputs, output: io.update(f=inputs[0].clone().cpu(),
                                                                                   out=output.clone().cpu()))
    with AttentionRecorder(model) as recorder, torch.no_grad():
        model(torch.rand(3, 3, 32, 32).to(device))
    mc, ms, how = recorder.logits["layer2.1.cbam"]
    assert how == "cbam" and mc.shape == (3, 32) and ms.shape == (3, 1, 16, 16)
    attention = torch.sigmoid(mc)[:, :, None, None] * torch.sigmoid(ms)
    f, out = io["f"], io["out"]
    nonzero = f.abs() > 1e-2
    assert nonzero.float().mean() > 0.2
    torch.testing.assert_close((out / f)[nonzero], attention[nonzero], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(recorder.maps("combined")["layer2.1.cbam"], attention.mean(dim=1))
    torch.testing.assert_close(recorder.maps("spatial")["layer2.1.cbam"], torch.sigmoid(ms[:, 0]))
    assert len(recorder.maps()) == 8
    for _, cbam in models.cbam_modules(model):
        assert not cbam.ChannelGate._forward_hooks and not cbam.SpatialGate._forward_hooks


def test_last_block_per_stage_and_cbam_without_spatial_gate():
    maps = attention_maps(_tiny_cbam_model(), torch.rand(2, 3, 32, 32))
    shown = last_block_per_stage(maps)
    assert list(shown) == ["layer1.1.cbam", "layer2.1.cbam", "layer3.1.cbam", "layer4.1.cbam"]
    assert [tuple(m.shape) for m in shown.values()] == [(2, 32, 32), (2, 16, 16), (2, 8, 8), (2, 4, 4)]
    assert last_block_per_stage({"bam1": 1, "bam2": 2}) == {"bam1": 1, "bam2": 2}
    flat = models.resnet18(num_classes=10, cifar=True, width=16, attention="cbam", reduction=4, no_spatial=True)
    with pytest.raises(ValueError, match="no spatial gate"):
        AttentionRecorder(flat)


def test_cli_attention_cbam(tmp_path, capsys):
    checkpoint = tmp_path / "cbam.pth.tar"
    torch.manual_seed(3)
    state = models.resnet18(attention="cbam", backend="torch").state_dict()
    torch.save({"epoch": 2, "state_dict": {f"module.{k}": v for k, v in state.items()}}, checkpoint)
    out = tmp_path / "cbam.png"
    assert cli_main(["attention", "--attention", "cbam", "--checkpoint", str(checkpoint), "--images", "2",
                     "--size", "64", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE and f"wrote {out}" in capsys.readouterr().out
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(out).shape
    assert width > 1.6 * height  # 5 columns (input + the last CBAM of 4 stages) by 2 rows
    capsys.readouterr()
    # The same checkpoint without --attention cbam: one line that says what to pass.
    assert cli_main(["attention", "--checkpoint", str(checkpoint), "--images", "1", "--size", "64",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit" in err[0] and "the checkpoint has CBAM: pass --attention cbam" in err[0], err


@pytest.mark.parametrize("argv, needle", [
    (["--size", "0"], "--size must be >= 32"),
    (["--out", "maps.txt"], "the format 'txt' is not an image format matplotlib writes"),
    (["--out", "maps"], "no image format"),
    (["--attention", "cbam", "--combine", "sum"], "--combine sum applies to BAM only"),
    (["--checkpoint", "."], "is a directory, not a checkpoint file"),
])
def test_cli_attention_refuses_bad_arguments_before_any_work(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["attention", "--images", "1", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: bam-triton attention: "), err
    assert needle in err, err
    assert os.listdir(tmp_path) == []


def test_cli_attention_checkpoint_of_the_other_combine(tmp_path, capsys):
    """A checkpoint our code saved from combine='sum' BAMs: the default (the authors' product) refuses it in one line
    naming --combine sum; with --combine sum it draws."""
    checkpoint = tmp_path / "sum.pth"
    torch.save(models.resnet18(combine="sum", backend="torch").state_dict(), checkpoint)
    out = tmp_path / "sum.png"
    argv = ["attention", "--checkpoint", str(checkpoint), "--images", "1", "--size", "64", "--out", str(out)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 BAM(s) saved with combine='sum' (bam1, bam2, bam3): pass --combine sum" in err[0], err
    assert cli_main(argv + ["--combine", "sum"]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE
