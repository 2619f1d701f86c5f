"""Socket type names and the objects that travel along them.

Images, masks and latents use ComfyUI's own types (IMAGE, MASK, LATENT, VAE), so the pack composes with
the built-in nodes. The Step1X parts have their own types so they cannot be wired into nodes that would
misuse them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..step1x.sampling.denoise import TextConditioning

DIT = "STEP1X_DIT"
MLLM = "STEP1X_MLLM"
EMBEDS = "STEP1X_EMBEDS"
CONDITIONING = "STEP1X_CONDITIONING"

CATEGORY = "Step1X-Edit"


@dataclass(eq=False)
class DiT:
    """The Step1X-Edit transformer with its connector, registered with model management."""

    patcher: object
    compute_dtype: torch.dtype
    name: str
    teacache: float = 0.0
    """TeaCache threshold the sampler uses with this model (0: off)."""
    regione: object | None = None
    """RegionE settings (:class:`step1x.sampling.regione_rules.RegionEConfig`) the sampler uses (None: off)."""

    @property
    def model(self):
        return self.patcher.model

    @property
    def version(self) -> str:
        return self.model.version


@dataclass(eq=False)
class Mllm:
    """The Qwen2.5-VL instruction encoder; ``patcher`` manages ``encoder.model``."""

    patcher: object
    encoder: object
    name: str


@dataclass(eq=False)
class InstructionEmbeds:
    """MLLM output for both sides of CFG, on the intermediate device. ``working_size`` (width, height) is
    the size the reference image was shown at; ``None`` for text-to-image."""

    cond: TextConditioning
    uncond: TextConditioning
    working_size: tuple[int, int] | None
    source: str

    @property
    def hidden_size(self) -> int:
        """The MLLM's width, which the connector must take."""
        return self.cond.llm_embedding.shape[-1]

    @property
    def text_to_image(self) -> bool:
        return self.working_size is None


@dataclass(eq=False)
class Step1XConditioning:
    """Embeddings bound to a DiT's connector. The connector depends on the timestep, so it is not run
    here: the sampler evaluates ``connector`` on the embeddings at every step."""

    embeds: InstructionEmbeds
    dit: DiT

    @property
    def connector(self):
        return self.dit.model.connector

    def check_model(self, dit: DiT) -> None:
        if dit.model is not self.dit.model:
            raise ValueError(
                f"the conditioning was bound to the connector of '{self.dit.name}' but the sampler got the model "
                f"'{dit.name}'; connect the same Step1X-Edit DiT loader to the connector and the sampler"
            )
