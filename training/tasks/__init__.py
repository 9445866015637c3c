"""Training tasks for :class:`training.engine.Engine`: what each kind of model brings to the loop.

- :class:`GeneratorTask`: the latent-diffusion transformer (new, fine-tuned, LoRA).
- :class:`ControlNetTask`: a ControlNet over a frozen generator, control inputs from the cache.
- :class:`EmbeddingFlowTask`: a rectified-flow MLP in embedding space (class / text prior, stain translator).

Example:
    >>> from training.engine import Engine
    >>> Engine(EmbeddingFlowTask(FlowConfig(max_steps=200), "cache/"), "runs/prior").fit()   # doctest: +SKIP
"""

from training.tasks.controlnet import ControlNetTask
from training.tasks.flow import EmbeddingFlowTask, FlowConfig
from training.tasks.generator import GeneratorTask

__all__ = ["GeneratorTask", "ControlNetTask", "EmbeddingFlowTask", "FlowConfig"]
