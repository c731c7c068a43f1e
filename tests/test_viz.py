"""bam_triton.viz: the recorded attention is what BAM applies, hooks come off, the figure and the CLI command. The
models run on the ``device`` of this run (tests/devices.py); the recorder hands back CPU tensors whatever the device."""
import pytest
import torch
from torch import nn

from bam_triton import models
from bam_triton.cli import main as cli_main
from bam_triton.viz import AttentionRecorder, attention_maps, plot_attention, synthetic_images

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
    with pytest.raises(SystemExit):
        cli_main(["attention", "--images", "0", "--out", str(out)])
