"""pixgen models: the diffusion transformer, its ControlNet, autoencoders (and later embedding flows)."""

from pixgen.models.autoencoders import Autoencoder, PixelSpace, load_autoencoder
from pixgen.models.controlnet import ControlNetOutput, PixgenControlNet
from pixgen.models.transformer import PRESETS, PixgenTransformer, TransformerOutput

__all__ = [
    "PixgenTransformer",
    "TransformerOutput",
    "PRESETS",
    "PixgenControlNet",
    "ControlNetOutput",
    "Autoencoder",
    "PixelSpace",
    "load_autoencoder",
]
