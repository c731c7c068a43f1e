"""Compatibility with the authors' BAM, re-created here independently from the key table in
/work/shared/official_bam_keys.md (their child names, product combine, ``avg_pool2d(x, H)`` pooling, so square maps
only). Nothing here imports bam_triton's module classes except the BAM under test."""
import copy

import pytest
import torch

from bam_triton._dtypes import assert_close as check_close
import torch.nn.functional as F
from torch import nn

from bam_triton import BAM, TOLERANCES

SQUARE_SIZE = 9


class AuthorsChannelGate(nn.Module):
    def __init__(self, channels, reduction=16):
        super().__init__()
        hidden = channels // reduction
        self.gate_c = nn.Sequential()
        self.gate_c.add_module("gate_c_fc_0", nn.Linear(channels, hidden))
        self.gate_c.add_module("gate_c_bn_1", nn.BatchNorm1d(hidden))
        self.gate_c.add_module("gate_c_relu_1", nn.ReLU())
        self.gate_c.add_module("gate_c_fc_final", nn.Linear(hidden, channels))

    def forward(self, x):
        pooled = F.avg_pool2d(x, x.size(2), stride=x.size(2))  # their pooling: correct for square maps only
        return self.gate_c(pooled.flatten(1)).unsqueeze(2).unsqueeze(3).expand_as(x)


class AuthorsSpatialGate(nn.Module):
    def __init__(self, channels, reduction=16, dilation_conv_num=2, dilation_val=4):
        super().__init__()
        hidden = channels // reduction
        self.gate_s = nn.Sequential()
        self.gate_s.add_module("gate_s_conv_reduce0", nn.Conv2d(channels, hidden, kernel_size=1))
        self.gate_s.add_module("gate_s_bn_reduce0", nn.BatchNorm2d(hidden))
        self.gate_s.add_module("gate_s_relu_reduce0", nn.ReLU())
        for i in range(dilation_conv_num):
            self.gate_s.add_module(f"gate_s_conv_di_{i}", nn.Conv2d(hidden, hidden, kernel_size=3,
                                                                    padding=dilation_val, dilation=dilation_val))
            self.gate_s.add_module(f"gate_s_bn_di_{i}", nn.BatchNorm2d(hidden))
            self.gate_s.add_module(f"gate_s_relu_di_{i}", nn.ReLU())
        self.gate_s.add_module("gate_s_conv_final", nn.Conv2d(hidden, 1, kernel_size=1))

    def forward(self, x):
        return self.gate_s(x).expand_as(x)


class AuthorsBAM(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.channel_att = AuthorsChannelGate(channels)
        self.spatial_att = AuthorsSpatialGate(channels)

    def forward(self, x):
        att = 1 + torch.sigmoid(self.channel_att(x) * self.spatial_att(x))
        return att * x


def _expected_layout(c):
    """{key: shape} straight from the table in official_bam_keys.md."""
    h = c // 16
    layout = {}

    def bn(prefix):
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{prefix}.{suffix}"] = (h,)
        layout[f"{prefix}.num_batches_tracked"] = ()

    gc, gs = "channel_att.gate_c", "spatial_att.gate_s"
    layout[f"{gc}.gate_c_fc_0.weight"], layout[f"{gc}.gate_c_fc_0.bias"] = (h, c), (h,)
    bn(f"{gc}.gate_c_bn_1")
    layout[f"{gc}.gate_c_fc_final.weight"], layout[f"{gc}.gate_c_fc_final.bias"] = (c, h), (c,)
    layout[f"{gs}.gate_s_conv_reduce0.weight"], layout[f"{gs}.gate_s_conv_reduce0.bias"] = (h, c, 1, 1), (h,)
    bn(f"{gs}.gate_s_bn_reduce0")
    for i in range(2):
        layout[f"{gs}.gate_s_conv_di_{i}.weight"], layout[f"{gs}.gate_s_conv_di_{i}.bias"] = (h, h, 3, 3), (h,)
        bn(f"{gs}.gate_s_bn_di_{i}")
    layout[f"{gs}.gate_s_conv_final.weight"], layout[f"{gs}.gate_s_conv_final.bias"] = (1, h, 1, 1), (1,)
    return layout


def _randomised_authors_bam(c, seed=0):
    """Their module with every parameter and BatchNorm buffer random (and num_batches_tracked non-zero), so a load
    that skipped or swapped any tensor would show."""
    gen = torch.Generator().manual_seed(seed)
    theirs = AuthorsBAM(c)
    with torch.no_grad():
        for name, t in theirs.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(17)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif t.dim() > 1:
                t.copy_(torch.randn(t.shape, generator=gen) / t[0].numel() ** 0.5)
            elif name.endswith("weight") and "_bn_" in name:
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=gen))
            else:
                t.copy_(0.2 * torch.randn(t.shape, generator=gen))
    return theirs


def assert_close(got, ref, what):
    """fp32 against the authors' module in float64, with the package's fp32 tolerance (1e-5)."""
    atol, rtol = TOLERANCES[torch.float32]
    assert atol <= 1e-5 and rtol <= 1e-5
    check_close(got, ref, torch.float32, what=what)


@pytest.mark.parametrize("c", [64, 256])
def test_authors_layout_matches_the_key_table(c):
    """Guards the re-creation itself against the document."""
    layout = {k: tuple(v.shape) for k, v in AuthorsBAM(c).state_dict().items()}
    assert layout == _expected_layout(c)


@pytest.mark.parametrize("c", [64, 256])
def test_same_keys_and_shapes_both_ways(c):
    ours = {k: (tuple(v.shape), v.dtype) for k, v in BAM(c, combine="product").state_dict().items()}
    theirs = {k: (tuple(v.shape), v.dtype) for k, v in AuthorsBAM(c).state_dict().items()}
    assert list(ours) == list(theirs)  # same keys, in the same order
    assert ours == theirs


@pytest.mark.parametrize("c", [64, 256])
def test_their_state_dict_loads_strict_unchanged(c):
    theirs = _randomised_authors_bam(c)
    state = theirs.state_dict()
    snapshot = {k: v.clone() for k, v in state.items()}
    ours = BAM(c, combine="product")
    result = ours.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in ours.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    assert all(torch.equal(v, snapshot[k]) for k, v in state.items())  # the source dict is untouched
    # and ours loads strict into theirs
    back = AuthorsBAM(c)
    back.load_state_dict(ours.state_dict(), strict=True)
    for k, v in back.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_combine_travels_in_metadata_not_in_keys(tmp_path):
    """Our state_dict records combine in its metadata: no extra key (their code still loads it strictly), kept by
    torch.save/torch.load(weights_only=True), and loading it into a BAM with the other combine raises, strict or not.
    Their state_dicts record nothing and load into either."""
    state = BAM(64, combine="sum").state_dict()
    assert list(state) == list(AuthorsBAM(64).state_dict())
    AuthorsBAM(64).load_state_dict(state, strict=True)
    torch.save(state, tmp_path / "sum.pt")
    loaded = torch.load(tmp_path / "sum.pt", weights_only=True)
    assert loaded._metadata[""]["combine"] == "sum"
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="saved by a BAM with combine='sum' and this BAM has "
                                               "combine='product'"):
            BAM(64, combine="product").load_state_dict(loaded, strict=strict)
    BAM(64, combine="sum").load_state_dict(loaded)
    for combine in ("sum", "product"):
        BAM(64, combine=combine).load_state_dict(AuthorsBAM(64).state_dict())


def _pair(c, seed=0):
    theirs = _randomised_authors_bam(c, seed)
    ours = BAM(c, combine="product")
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("c", [64, 256])
def test_outputs_match_theirs(c, train, backend, device):
    """Square maps, fp32, their module in float64 as the reference; in train mode the BatchNorm running statistics
    must also end up the same. On the ``device`` of this run (compiled kernels in a CUDA run)."""
    theirs, ours = _pair(c)
    ours.backend = backend
    ref_model = copy.deepcopy(theirs).double().train(train).to(device)
    ours.train(train).to(device)
    x = torch.randn(2, c, SQUARE_SIZE, SQUARE_SIZE, generator=torch.Generator().manual_seed(c)).to(device)
    x_before = x.clone()
    with torch.no_grad():
        ref = ref_model(x.double())
        out = ours(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close(out, ref, f"{backend} {'train' if train else 'eval'} output")
    assert torch.equal(x, x_before)
    ref_buffers = dict(ref_model.named_buffers())
    for name, b in ours.named_buffers():
        assert_close(b.double(), ref_buffers[name].double(), f"buffer {name}")


def test_checkpoint_file_round_trip(tmp_path):
    """Their weights -> torch.save -> torch.load -> ours (strict) -> torch.save -> torch.load -> theirs: the same
    tensors and the same outputs all the way, in their training script's checkpoint format."""
    c = 64
    theirs, _ = _pair(c, seed=3)
    path = tmp_path / "bam_checkpoint.pth.tar"
    torch.save({"epoch": 5, "arch": "bam", "state_dict": theirs.state_dict()}, path)
    ours = BAM(c, combine="product")
    ours.load_state_dict(torch.load(path, weights_only=True)["state_dict"], strict=True)

    path2 = tmp_path / "ours.pt"
    torch.save(ours.state_dict(), path2)
    again = AuthorsBAM(c)
    again.load_state_dict(torch.load(path2, weights_only=True), strict=True)
    for (k1, v1), (k2, v2) in zip(theirs.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1

    x = torch.randn(2, c, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = theirs.double().eval()(x.double())
        assert_close(ours.eval()(x), ref, "ours after the round trip")
        assert_close(again.eval()(x), ref, "theirs after the round trip")
