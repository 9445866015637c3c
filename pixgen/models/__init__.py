"""pixgen models: the diffusion transformer, autoencoders (and later ControlNet, embedding flows)."""

from pixgen.models.autoencoders import Autoencoder, PixelSpace, load_autoencoder
from pixgen.models.transformer import PRESETS, PixgenTransformer, TransformerOutput

__all__ = ["PixgenTransformer", "TransformerOutput", "PRESETS", "Autoencoder", "PixelSpace", "load_autoencoder"]
