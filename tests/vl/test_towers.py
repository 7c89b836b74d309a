"""Vision towers against timm on the same weights (issue point 2).

Shapes are reduced (fewer/narrower blocks, smaller images) but keep every structural feature:
SigLIP's border-dropping patch 14, SAM's padded windows, global blocks and rel-pos tables.
"""

import pytest
import timm
import torch
from timm.models.vision_transformer_sam import VisionTransformerSAM

import vl.sam
from vl.modeling_vl import CLIPVisionTower
from vl.sam import SAMConfig, SAMEncoder
from vl.siglip import SigLIPConfig, SigLIPViT


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.state_dict().items():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if "norm" not in name else 1.0))


def _timm_siglip(act: str) -> torch.nn.Module:
    # SO400M geometry (patch 14, mlp 4304/1152 ratio) on a 62-px image: 4x4 patches, 6-px border dropped.
    return timm.create_model(
        "vit_so400m_patch14_siglip_384",
        pretrained=False,
        num_classes=0,
        img_size=62,
        embed_dim=48,
        depth=2,
        num_heads=4,
        act_layer=act,
    ).eval()


def _our_siglip(approx: str) -> SigLIPViT:
    cfg = SigLIPConfig(
        image_size=62, patch_size=14, width=48, layers=2, heads=4, mlp_dim=int(48 * 3.7362), gelu_approximate=approx
    )
    return SigLIPViT(cfg).eval()


@pytest.mark.parametrize("act,approx", [("gelu", "none"), ("gelu_tanh", "tanh")])
def test_siglip_equals_timm_exactly(act, approx):
    torch.manual_seed(0)
    ref = _timm_siglip(act)
    _randomize(ref, 1)
    ours = _our_siglip(approx)
    weights = {k: v for k, v in ref.state_dict().items() if not k.startswith("attn_pool.")}
    ours.load_state_dict(weights, strict=True)
    x = torch.randn(3, 3, 62, 62)
    with torch.no_grad():
        out = ours(x)
        assert out.shape == (3, 16, 48)
        assert torch.equal(out, ref.forward_features(x))


def test_tanh_and_exact_gelu_differ():
    """VL1 (exact) and VL2 (tanh) towers must not be interchangeable: same weights, different output."""
    ref = _timm_siglip("gelu")
    _randomize(ref, 2)
    weights = {k: v for k, v in ref.state_dict().items() if not k.startswith("attn_pool.")}
    exact, tanh = _our_siglip("none"), _our_siglip("tanh")
    exact.load_state_dict(weights)
    tanh.load_state_dict(weights)
    x = torch.randn(1, 3, 62, 62)
    with torch.no_grad():
        assert (exact(x) - tanh(x)).abs().max() > 1e-4


def test_siglip_rejects_wrong_image_size():
    with pytest.raises(ValueError, match=r"\(B, 3, 62, 62\)"):
        _our_siglip("none")(torch.zeros(1, 3, 64, 64))


SAM_CFG = SAMConfig(
    image_size=160,
    patch_size=16,
    width=32,
    layers=4,
    heads=2,
    mlp_dim=128,
    window_size=4,
    global_attn_indexes=(1, 3),
    neck_channels=16,
    downsample_channels=(32, 64),
    neck_resize=16,
)


def _timm_sam() -> torch.nn.Module:
    # 10x10 patch grid with window 4: windows are zero-padded to 12x12, as 64x64 -> 70x70 at full size.
    return VisionTransformerSAM(
        img_size=160,
        patch_size=16,
        embed_dim=32,
        depth=4,
        num_heads=2,
        global_attn_indexes=(1, 3),
        window_size=4,
        use_rel_pos=True,
        neck_chans=16,
        num_classes=0,
        global_pool="",
    ).eval()


def _sam_pair(seed: int):
    ref = _timm_sam()
    _randomize(ref, seed)
    ours = SAMEncoder(SAM_CFG).eval()
    _randomize(ours, seed + 100)
    renamed = {k.replace("mlp.fc1", "mlp.lin1").replace("mlp.fc2", "mlp.lin2"): v for k, v in ref.state_dict().items()}
    result = ours.load_state_dict(renamed, strict=False)
    extras = {"hd_alpha_downsamples", *(k for k in ours.state_dict() if k.startswith(("neck_hd.", "downsamples.")))}
    assert set(result.missing_keys) == extras and not result.unexpected_keys
    return ref, ours


def test_sam_encoder_equals_timm():
    ref, ours = _sam_pair(3)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        neck, _ = ours.encode(x)
        assert (neck - ref.forward_features(x)).abs().max() < 1e-4


@pytest.mark.parametrize("budget", [1, 12_000])  # bands of 1 row; of 3, 3, 3 and 1 rows
def test_sam_global_attention_in_row_bands_equals_timm(monkeypatch, budget):
    """The relative-position bias built a band of grid rows at a time (1 row, or a few) changes nothing."""
    monkeypatch.setattr(vl.sam, "_BIAS_CHUNK_ELEMENTS", budget)
    ref, ours = _sam_pair(3)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        neck, _ = ours.encode(x)
        assert (neck - ref.forward_features(x)).abs().max() < 1e-4


def test_sam_deepseek_branch_rebuilt_on_timm():
    """Full high-res path: timm SAM + resize to 16x16 + shared stride-2 convs + alpha * neck_hd branch."""
    ref, ours = _sam_pair(4)
    with torch.no_grad():
        ours.hd_alpha_downsamples.fill_(0.7)
    x = torch.randn(2, 3, 160, 160)
    captured = {}
    ref.blocks[1].register_forward_hook(lambda m, i, o: captured.setdefault("global", o))
    with torch.no_grad():
        main = ref.forward_features(x)

        def down(t):
            t = torch.nn.functional.interpolate(t, size=(16, 16), mode="bilinear", align_corners=False)
            return ours.downsamples[1](ours.downsamples[0](t))

        expected = down(main) + 0.7 * down(ours.neck_hd(captured["global"].permute(0, 3, 1, 2)))
        out = ours(x)
    assert out.shape == (2, 64, 4, 4)
    assert (out - expected).abs().max() < 1e-4
    with torch.no_grad():
        ours.hd_alpha_downsamples.zero_()
        assert (ours(x) - down(main)).abs().max() < 1e-4


def test_tower_normalises_inside():
    """Pixels enter in [0, 1]; the tower applies its own mean/std exactly once."""
    siglip = _our_siglip("none")
    _randomize(siglip, 5)
    tower = CLIPVisionTower(siglip, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).eval()
    x = torch.rand(1, 3, 62, 62)
    with torch.no_grad():
        assert torch.equal(tower(x), siglip((x - 0.5) / 0.5))


FULL_SIZE = [  # timm name, our config, input side, expected tokens x width
    (
        "vit_large_patch16_siglip_384",
        dict(image_size=384, patch_size=16, width=1024, layers=24, heads=16, mlp_dim=4096, gelu_approximate="none"),
        "gelu",
        (576, 1024),
    ),
    (
        "vit_so400m_patch14_siglip_384",
        dict(image_size=384, patch_size=14, width=1152, layers=27, heads=16, mlp_dim=4304, gelu_approximate="tanh"),
        "gelu_tanh",
        (729, 1152),
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,cfg,act,shape", FULL_SIZE, ids=["VL1-SigLIP-L16", "VL2-SO400M14"])
def test_full_size_siglip_equals_timm(name, cfg, act, shape):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, num_classes=0, act_layer=act).eval()
    with torch.device("meta"):
        ours = SigLIPViT(SigLIPConfig(**cfg))
    weights = {k: v for k, v in ref.state_dict().items() if not k.startswith("attn_pool.")}
    ours.load_state_dict(weights, strict=True, assign=True)
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        out = ours.eval()(x)
        assert out.shape == (1, *shape)
        assert torch.equal(out, ref.forward_features(x))


@pytest.mark.slow
def test_full_size_sam_b_equals_timm():
    torch.manual_seed(0)
    ref = timm.create_model("samvit_base_patch16", pretrained=False, num_classes=0, global_pool="").eval()
    with torch.device("meta"):
        ours = SAMEncoder(SAMConfig())
    weights = {k.replace("mlp.fc1", "mlp.lin1").replace("mlp.fc2", "mlp.lin2"): v for k, v in ref.state_dict().items()}
    extras = {k: torch.randn(v.shape) * 0.02 for k, v in ours.state_dict().items() if k not in weights}
    assert set(extras) >= {"hd_alpha_downsamples", "downsamples.0.weight", "downsamples.1.weight", "neck_hd.0.weight"}
    ours.load_state_dict({**weights, **extras}, strict=True, assign=True)
    x = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        neck, first_global = ours.eval().encode(x)
        assert first_global.shape == (1, 64, 64, 768)
        assert (neck - ref.forward_features(x)).abs().max() < 1e-4
        assert ours(x).shape == (1, 1024, 24, 24)
