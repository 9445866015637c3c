"""The bundled SSL encoder ``pixgen-ssl``: a small ViT trained by ``training/ssl.py`` (DINO on H&E).

It takes 64 px tiles at 1.0 um/px (a 64 um field: a 256 px tile at 0.25 um/px, or 128 px at
0.5 um/px, which `Encoder.preprocess` resizes to 64 px) and returns its 192-d CLS token.

The weights live in ``pixgen/weights/pixgen-ssl/`` in timm's Hub layout (``config.json`` with
``architecture`` + ``model_args``, and ``model.safetensors``), so plain timm and
``load_encoder(..., library "timm")`` can read them too. timm is imported only when a
backbone is built, never when this module is imported.

Example:
    >>> from pixgen.encoders import load_encoder
    >>> enc = load_encoder("pixgen-ssl")                          # the bundled weights  # doctest: +SKIP
    >>> enc = load_encoder("pixgen-ssl", local_path="runs/ssl/export")   # your own run  # doctest: +SKIP
    >>> enc.embed(tiles_256px_at_0_25mpp).shape                                         # doctest: +SKIP
    torch.Size([N, 192])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pixgen.encoders.backbones import read_json_file, weights_errors
from pixgen.encoders.base import Encoder
from pixgen.encoders.loading import register_loader
from pixgen.encoders.registry import register_encoder
from pixgen.encoders.spec import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, check_model_kwargs
from pixgen.errors import InputError, ModelLoadError

__all__ = ["ARCHITECTURE", "BUNDLED_SSL_DIR", "BundledEncoder", "PIXGEN_SSL", "SSL_MODEL_ARGS", "build_vit", "load_bundled"]

BUNDLED_SSL_DIR = Path(__file__).resolve().parents[1] / "weights" / "pixgen-ssl"
ARCHITECTURE = "vit_tiny_patch16_224"  # timm family; model_args override size, patch and depth
SSL_MODEL_ARGS: dict[str, Any] = {
    "img_size": 64,
    "patch_size": 8,
    "embed_dim": 192,
    "depth": 6,
    "num_heads": 3,
    "dynamic_img_size": True,  # training also feeds 32 px local crops
}

PIXGEN_SSL = register_encoder(
    EncoderSpec(
        name="pixgen-ssl",
        dim=192,
        input_size=64,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        mpp=1.0,
        source="bundled",
        library="bundled",
        licence="research / non-commercial (trained on LC25000, CoNSeP, MoNuSeg)",
        description="pixgen's own small ViT (6 x 192, patch 8), DINO-trained on H&E tiles; 64 um field of view. "
        "Small and CPU-friendly, far weaker than the pathology foundation models.",
        model_kwargs=dict(SSL_MODEL_ARGS),
    )
)


def build_vit(model_args: dict[str, Any] | None = None) -> nn.Module:
    """A randomly initialised timm ViT with ``model_args`` (default `SSL_MODEL_ARGS`), no classifier.

    Example:
        >>> vit = build_vit({**SSL_MODEL_ARGS, "depth": 1})
        >>> vit.forward_features(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 65, 192])
    """
    import timm

    args = {**(SSL_MODEL_ARGS if model_args is None else model_args), "num_classes": 0}
    return timm.create_model(ARCHITECTURE, pretrained=False, **args)


class BundledEncoder(Encoder):
    """`Encoder` over a pixgen-trained timm ViT; ``model_args`` are written to ``config.json``.

    Example:
        >>> spec = EncoderSpec(name="tiny", dim=32, input_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        ...                    mpp=1.0, source="bundled", library="bundled")
        >>> args = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
        >>> enc = BundledEncoder(spec, build_vit(args), args)
        >>> enc.embed(torch.zeros(2, 3, 16, 16, dtype=torch.uint8)).shape
        torch.Size([2, 32])
    """

    def __init__(self, spec: EncoderSpec, backbone: nn.Module, model_args: dict[str, Any]):
        super().__init__(spec, backbone)
        self.model_args = dict(model_args)

    def forward_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.backbone.forward_features(pixel_values)  # (N, 1 + P, D), final norm applied
        return tokens[:, 0], tokens[:, self.backbone.num_prefix_tokens :]

    def save_backbone(self, directory: Path) -> None:
        """``config.json`` (timm Hub layout) + ``model.safetensors`` (in the dtype the encoder holds)."""
        from safetensors.torch import save

        from pixgen.io import write_bytes_atomic, write_json_atomic

        config = {
            "architecture": ARCHITECTURE,
            "num_classes": 0,
            "model_args": self.model_args,
            "pretrained_cfg": {"input_size": [3, self.input_size, self.input_size], "mean": list(self.mean),
                               "std": list(self.std), "num_classes": 0},
        }
        write_json_atomic(directory / "config.json", config)
        state = {k: v.detach().contiguous() for k, v in self.backbone.state_dict().items()}
        write_bytes_atomic(directory / "model.safetensors", save(state))


def load_bundled(spec: EncoderSpec, local_path: str | None, token: str | None) -> BundledEncoder:
    """Loader for library ``"bundled"``: ``local_path`` or the package's weights -> `BundledEncoder`.

    Weights stored in fp16 / bf16 are cast to float32. ``token`` is unused (nothing is downloaded).
    """
    directory = Path(local_path).expanduser() if local_path else BUNDLED_SSL_DIR
    config_file, weights_file = directory / "config.json", directory / "model.safetensors"
    if not (config_file.is_file() and weights_file.is_file()):
        raise ModelLoadError(
            f"no weights for bundled encoder '{spec.name}' in {directory} (needs config.json and model.safetensors)",
            fix="train them with `python -m training.ssl --data <data> --out <run>` and pass local_path=<run>/export",
        )
    from safetensors.torch import load_file

    model_args = read_json_file(config_file).get("model_args", spec.model_kwargs)
    try:
        check_model_kwargs(model_args, str(config_file))
    except InputError as err:
        raise ModelLoadError(err.message, fix=err.fix) from None
    with weights_errors(config_file, f"bundled encoder '{spec.name}'"):  # model_args the ViT does not take
        backbone = build_vit(model_args)
    with weights_errors(weights_file, f"bundled encoder '{spec.name}'"):
        state = {k: v.float() for k, v in load_file(str(weights_file)).items()}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelLoadError(
            f"weights in {weights_file} do not fit encoder '{spec.name}': {str(err).splitlines()[0][:200]}",
            fix="check that config.json's model_args belong to these weights",
        ) from err
    if backbone.num_features != spec.embedding_width:
        raise ModelLoadError(
            f"bundled backbone in {directory} has width {backbone.num_features}, spec '{spec.name}' expects {spec.embedding_width}",
            fix="load the directory itself (load_encoder(directory)) or fix the spec's dim",
        )
    return BundledEncoder(spec, backbone, model_args)


register_loader("bundled", load_bundled)
