"""Registry entries for public pathology foundation models and DINOv2.

Facts (width, input size, normalisation, registers, licence) come from the model cards on the
Hugging Face Hub and the timm / transformers configs they publish. ``mpp`` is the resolution of
the training tiles (20x = 0.5 um/px); where a card does not state one, the description says so.

Hibou needs its repository's own Python code (``remote_code``). Such an entry loads only when it
is pinned to a reviewed commit (``revision``) and the caller passes ``trust_remote_code=True``;
the Hibou entries are not pinned here (no commit could be reviewed offline), so they refuse to
load and say how to pin one.
"""

from __future__ import annotations

from pixgen.encoders.registry import register_encoder
from pixgen.encoders.spec import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec

__all__ = ["BUILTIN_ENCODERS"]

# H-optimus-0/1 publish their own RGB statistics (model card and preprocessor_config.json).
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
# Hibou's image processor statistics.
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)

_SWIGLU = {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}
_NC_ND = "CC-BY-NC-ND-4.0"


def _dinov2(size: str, dim: int, timm_name: str) -> EncoderSpec:
    return EncoderSpec(
        name=f"dinov2-vit{size}14",
        dim=dim,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        mpp=0.5,
        source=f"hf-hub:timm/{timm_name}.lvd142m",
        library="timm",
        licence="Apache-2.0",
        description=(
            f"Meta DINOv2 ViT-{size.upper()}/14 trained on natural images (LVD-142M), not pathology; "
            "run at 224 px (position embeddings resampled from 518). mpp 0.5 is a nominal value "
            "pixgen uses to cut tiles, not a training resolution."
        ),
        model_kwargs={"img_size": 224},
    )


BUILTIN_ENCODERS: tuple[EncoderSpec, ...] = (
    EncoderSpec(
        name="uni",
        dim=1024,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        mpp=0.5,
        source="hf-hub:MahmoodLab/uni",
        library="timm",
        gated=True,
        licence=_NC_ND,
        description="MahmoodLab UNI: ViT-L/16 trained with DINOv2 on ~100k H&E WSIs (Mass-100K), 20x tiles.",
        model_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
    ),
    EncoderSpec(
        name="uni2-h",
        dim=1536,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        mpp=0.5,
        source="hf-hub:MahmoodLab/UNI2-h",
        library="timm",
        gated=True,
        licence=_NC_ND,
        description=(
            "MahmoodLab UNI2-h: ViT-H/14 with 8 register tokens and SwiGLU MLP, trained on 200M+ "
            "H&E and IHC tiles from 350k+ WSIs. The conditioning encoder of PixCell."
        ),
        resize="bilinear",  # PixCell's tools/extract_features.py: torchvision Resize(224), bilinear
        model_kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "reg_tokens": 8,
            "dynamic_img_size": True,
            **_SWIGLU,
        },
    ),
    EncoderSpec(
        name="virchow",
        dim=2560,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        mpp=0.5,
        source="hf-hub:paige-ai/Virchow",
        library="timm",
        gated=True,
        output="cls+mean",
        licence="Apache-2.0 (with Paige's additional terms on the model card)",
        description=(
            "Paige Virchow: ViT-H/14 (1280-d tokens, SwiGLU) trained on 1.5M H&E WSIs at 20x; "
            "embedding = CLS token + mean of patch tokens (2560-d)."
        ),
        model_kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "dynamic_img_size": True, **_SWIGLU},
    ),
    EncoderSpec(
        name="virchow2",
        dim=2560,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        mpp=0.5,
        source="hf-hub:paige-ai/Virchow2",
        library="timm",
        gated=True,
        output="cls+mean",
        licence=_NC_ND,
        description=(
            "Paige Virchow2: ViT-H/14 with 4 register tokens and SwiGLU, trained on 3.1M WSIs at mixed "
            "magnifications (5x-40x); 0.5 mpp (20x) is the usual operating point. Embedding = CLS + "
            "mean of patch tokens (registers excluded), 2560-d."
        ),
        model_kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "mlp_ratio": 5.3375,
            "reg_tokens": 4,
            "dynamic_img_size": True,
            **_SWIGLU,
        },
    ),
    EncoderSpec(
        name="h-optimus-0",
        dim=1536,
        input_size=224,
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        mpp=0.5,
        source="hf-hub:bioptimus/H-optimus-0",
        library="timm",
        licence="Apache-2.0",
        description="Bioptimus H-optimus-0: 1.1B-parameter ViT-g/14 with 4 registers, 500k+ H&E WSIs, 224 px tiles at 0.5 mpp.",
        model_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
    ),
    EncoderSpec(
        name="h-optimus-1",
        dim=1536,
        input_size=224,
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        mpp=0.5,
        source="hf-hub:bioptimus/H-optimus-1",
        library="timm",
        gated=True,
        licence="Bioptimus licence for non-commercial academic research (see model card)",
        description="Bioptimus H-optimus-1: ViT-g/14 with 4 registers, 1M+ H&E WSIs from 800k+ patients, 224 px at 0.5 mpp.",
        model_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
    ),
    EncoderSpec(
        name="hibou-b",
        dim=768,
        input_size=224,
        mean=HIBOU_MEAN,
        std=HIBOU_STD,
        mpp=0.5,
        source="hf-hub:histai/hibou-b",
        library="transformers",
        licence="Apache-2.0",
        description=(
            "HistAI Hibou-B: DINOv2 ViT-B/14 with registers, 1M+ WSIs (H&E and other stains); custom "
            "transformers code (trust_remote_code). The card states no mpp: 0.5 is nominal."
        ),
        remote_code=True,  # revision: not pinned (see the module docstring)
    ),
    EncoderSpec(
        name="hibou-l",
        dim=1024,
        input_size=224,
        mean=HIBOU_MEAN,
        std=HIBOU_STD,
        mpp=0.5,
        source="hf-hub:histai/hibou-L",
        library="transformers",
        gated=True,
        licence="Apache-2.0",
        description=(
            "HistAI Hibou-L: DINOv2 ViT-L/14 with registers, 1M+ WSIs; custom transformers code "
            "(trust_remote_code). The card states no mpp: 0.5 is nominal."
        ),
        remote_code=True,  # revision: not pinned (see the module docstring)
    ),
    EncoderSpec(
        name="phikon-v2",
        dim=1024,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        mpp=0.5,
        source="hf-hub:owkin/phikon-v2",
        library="transformers",
        licence="Owkin non-commercial licence",
        description="Owkin Phikon-v2: DINOv2 ViT-L/16 trained on 460M public tiles (PANCAN-XL), 224 px at 20x.",
    ),
    _dinov2("s", 384, "vit_small_patch14_dinov2"),
    _dinov2("b", 768, "vit_base_patch14_dinov2"),
    _dinov2("l", 1024, "vit_large_patch14_dinov2"),
    _dinov2("g", 1536, "vit_giant_patch14_dinov2"),
)

for _spec in BUILTIN_ENCODERS:
    register_encoder(_spec)
