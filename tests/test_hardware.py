"""The compute dtype fits the host (mfv.hardware): measured rates, bf16 support, ``auto``.

The measurements are monkeypatched: each test states the host it pretends to run on.
"""

from __future__ import annotations

import pytest
import torch

from mfv import hardware
from mfv.errors import ConfigError
from mfv.models import BACKBONES, BackboneSpec, load_backbone

GB = 10**9
AMX = hardware.Bf16Support("Intel Sapphire Rapids", ("avx512_bf16", "amx_bf16"), 2.0e11, 9.0e11, 256, 1)
AVX2 = hardware.Bf16Support("AMD EPYC 7B13", (), 1.2e11, 1.0e9, 256, 1)


def built_with(**options):
    """A stand-in builder: returns the options it was built with."""
    return options


def built_in_bf16(dtype: str = "bfloat16", **options):
    """A stand-in builder whose default dtype is bf16 (as the Hugging Face families')."""
    return dict(options, dtype=dtype)


@pytest.fixture
def host(monkeypatch):
    """Sets the pretend host: ``host(support, available_gb)``; returns the lines printed."""
    monkeypatch.setattr(hardware, "_warned", [])

    def pretend(support: hardware.Bf16Support | None, available_gb: float | None = 20.0) -> None:
        def measured() -> hardware.Bf16Support:
            if support is None:
                raise AssertionError("nothing should be measured here")
            return support

        monkeypatch.setattr(hardware, "bf16_support", measured)
        monkeypatch.setattr(hardware, "available_memory_bytes",
                            lambda: None if available_gb is None else int(available_gb * GB))

    return pretend


@pytest.fixture
def weights(tmp_path):
    """A release folder of 3 GB of 16-bit weight files (sparse: no disk is used)."""
    folder = tmp_path / "release"
    folder.mkdir()
    for name, size in (("model-00001.safetensors", 2 * GB), ("model-00002.safetensors", GB)):
        with open(folder / name, "wb") as handle:
            handle.truncate(size)
    (folder / "config.json").write_text("{}")
    return folder


def test_native_means_a_flag_and_a_rate_near_fp32():
    assert AMX.native and AMX.ratio == pytest.approx(4.5)
    assert not AVX2.native
    no_unit = hardware.Bf16Support("x", ("avx512_bf16",), 1e11, 1e9, 256, 1)  # a flag the kernels do not use
    assert not no_unit.native
    assert AMX.to_dict()["native"] is True and AMX.to_dict()["flags"] == ["avx512_bf16", "amx_bf16"]


def test_measurement_is_real_fast_and_cached():
    hardware.bf16_support.cache_clear()
    first = hardware.bf16_support(size=64)
    assert first.fp32_flop_per_s > 0 and first.bf16_flop_per_s > 0 and first.threads == 1
    assert hardware.bf16_support(size=64) is first  # once per process
    assert torch.get_num_threads() >= 1
    hardware.bf16_support.cache_clear()


def test_fp32_bytes_needed_counts_weight_files_twice(weights, tmp_path):
    assert hardware.fp32_bytes_needed({"model_path": str(weights)}) == 6 * GB
    assert hardware.fp32_bytes_needed({"checkpoint_path": str(weights / "model-00002.safetensors"),
                                       "device": "cpu"}) == 2 * GB
    assert hardware.fp32_bytes_needed({"model_path": "Qwen/Qwen3-VL-4B-Instruct"}) is None  # a hub id
    assert hardware.fp32_bytes_needed({"model_path": str(tmp_path / "missing")}) is None


def test_bf16_on_an_emulating_cpu_says_so_in_one_line(host, weights, capsys):
    host(AVX2, available_gb=20)
    assert hardware.resolve_dtype("bfloat16", "cpu", {"model_path": str(weights)}) == "bfloat16"
    assert hardware.resolve_dtype("bfloat16", "cpu", {}) == "bfloat16"
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines  # once per process
    assert "not native" in lines[0] and "AMD EPYC 7B13" in lines[0] and "120x slower" in lines[0]
    assert "float32" in lines[0] and "6.0 GB, fit in the 20.0 GB" in lines[0]


def test_bf16_on_a_native_cpu_or_cuda_is_silent(host, capsys):
    host(AMX)
    assert hardware.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    host(None)  # CUDA and fp32 requests measure nothing
    assert hardware.resolve_dtype("bfloat16", "cuda:0") == "bfloat16"
    assert hardware.resolve_dtype("float32", "cpu") == "float32"
    assert hardware.resolve_dtype("float16", "cpu") == "float16"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("support, device, available_gb, expected, warns", [
    (None, "cuda", 1, "bfloat16", False),
    (AMX, "cpu", 1, "bfloat16", False),
    (AVX2, "cpu", 20, "float32", False),        # 6 GB of fp32 weights fit in 80% of 20 GB
    (AVX2, "cpu", 7, "bfloat16", True),         # ... not in 80% of 7 GB
    (AVX2, "cpu", None, "bfloat16", True),      # memory unknown: the weights' own dtype
])
def test_auto_picks_the_dtype_that_fits(host, weights, capsys, support, device, available_gb, expected, warns):
    host(support, available_gb)
    assert hardware.resolve_dtype("auto", device, {"model_path": str(weights)}) == expected
    err = capsys.readouterr().err
    assert ("not native" in err) == warns
    if available_gb == 7:
        assert "once about 6.0 GB is free" in err


def test_auto_without_weight_files_is_fp32_on_an_emulating_cpu(host, capsys):
    host(AVX2, available_gb=1)
    assert hardware.resolve_dtype("auto", "cpu", {"seed": 0}) == "float32"  # a random model: small
    assert capsys.readouterr().err == ""


def test_a_bad_dtype_is_one_line_naming_the_setting(host):
    host(None)
    with pytest.raises(ConfigError, match=r"model.backbone_dtype.*auto|auto.*model.backbone_dtype"):
        hardware.resolve_dtype("bf16", "cpu")


def test_load_backbone_resolves_auto_before_building(host, weights, monkeypatch):
    monkeypatch.setitem(BACKBONES, "fake", BackboneSpec(f"{__name__}:built_with", f"{__name__}:built_with"))
    host(AVX2, available_gb=20)
    assert load_backbone("fake", dtype="auto", model_path=str(weights))["dtype"] == "float32"
    host(AMX)
    assert load_backbone("fake", dtype="auto", device="cpu")["dtype"] == "bfloat16"
    assert "dtype" not in load_backbone("fake", device="cpu")  # the builder's own default stays


def test_a_builders_bf16_default_on_an_emulating_cpu_says_so(host, monkeypatch, capsys):
    monkeypatch.setitem(BACKBONES, "fake16", BackboneSpec(f"{__name__}:built_in_bf16", f"{__name__}:built_in_bf16"))
    host(AVX2)
    assert load_backbone("fake16", device="cpu")["dtype"] == "bfloat16"
    assert "not native" in capsys.readouterr().err


@pytest.mark.parametrize("support, dtype", [(AVX2, torch.float32), (AMX, torch.bfloat16)])
def test_training_module_takes_auto(host, support, dtype):
    from mfv.models import _TINY_OPENFLAMINGO
    from mfv.training.module import FunctionVectorModule

    host(support)
    module = FunctionVectorModule("openflamingo-random", dict(_TINY_OPENFLAMINGO), layer=1, init="zeros",
                                  backbone_dtype="auto")
    assert next(module.backbone.parameters()).dtype == dtype
    assert module.function_vectors.dtype == torch.float32


def test_the_head_hook_gives_matmul_a_foldable_one_row_input():
    """Full-size hot spot (#36): ``hidden[:, -1:]`` of one row passed ``.contiguous()`` unchanged,
    with the sequence's stride, and ``F.linear`` then copied the whole head weight per call."""
    from mfv.hooks import keep_input_contiguous

    head = torch.nn.Linear(8, 5, bias=False)
    keep_input_contiguous(head)
    seen = []
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0].stride()))
    hidden = torch.randn(1, 7, 8)
    assert torch.equal(head(hidden[:, -1:]), hidden[:, -1:] @ head.weight.T)
    assert seen == [(8, 8, 1)]


def test_the_released_vision_tower_keeps_its_values_without_its_hot_spots():
    """Full-size hot spots (#36): in-place QuickGELU (bit for bit) and fused attention (to
    rounding) in open_clip's tower; with gradients open_clip's own code runs."""
    import copy

    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    from mfv.models.openflamingo.vision import quick_gelu, speed_up_vision_tower

    torch.manual_seed(0)
    tower = _build_vision_tower(32, CLIPVisionCfg(layers=2, width=64, head_width=16, image_size=32, patch_size=8),
                                quick_gelu=True).eval()
    tower.output_tokens = True
    fast = copy.deepcopy(tower)
    assert speed_up_vision_tower(fast) == 4  # two activations, two attentions
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected, got = tower(images)[1], fast(images)[1]
    assert torch.allclose(expected, got, atol=1e-5) and not torch.equal(expected, torch.zeros_like(expected))
    x = torch.randn(4, 8).bfloat16()
    with torch.no_grad():
        assert torch.equal(quick_gelu(x), x * torch.sigmoid(1.702 * x))
    leaf = torch.randn(2, 5, requires_grad=True)
    quick_gelu(leaf).sum().backward()  # no in-place op on a recorded graph
    assert leaf.grad is not None and torch.equal(fast(images)[1], tower(images)[1])  # with grad: the originals


def test_a_patch_convolution_runs_as_one_matmul_with_the_same_values():
    """Full-size hot spot (#36): Qwen-VL's per-patch Conv3d (oneDNN bf16: 0.002 TFLOP/s)."""
    from mfv.models.patch_embedding import speed_up_patch_embeddings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(3, 8, (2, 4, 4), (2, 4, 4)), torch.nn.Conv2d(3, 8, 3, stride=1))
    patches, image = torch.randn(5, 3, 2, 4, 4), torch.randn(2, 3, 8, 8)
    expected = model[0](patches), model[1](image)
    assert speed_up_patch_embeddings(model) == 1  # the 3x3 stride-1 convolution is no patch embedding
    assert "forward" in vars(model[0]) and "forward" not in vars(model[1])
    got = model[0](patches)
    assert got.shape == expected[0].shape == (5, 8, 1, 1, 1) and torch.allclose(got, expected[0], atol=1e-6)
    larger = torch.randn(1, 3, 4, 8, 8)  # not one patch: the convolution runs
    assert torch.equal(model[0](larger), torch.nn.functional.conv3d(larger, model[0].weight, model[0].bias, stride=(2, 4, 4)))
