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

LAYOUT_V11 = "v1.0-v1.1"
LAYOUT_V12 = "v1.2"
"""The two instruction-encoder layouts: v1.0/v1.1 (640 padded tokens) and v1.2 (per-prompt tokens with text
positions, input embeddings and the quote mask). The DiT's version decides which one it takes."""


def layout_of(version: str) -> str:
    """The encoder layout a DiT of ``version`` takes."""
    return LAYOUT_V12 if version == "v1.2" else LAYOUT_V11


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
    """The Qwen2.5-VL instruction encoder; ``patcher`` manages ``encoder.model``. ``layout``: the encoder layout
    of the DiT in the same model folder (read from its weights), None when the loader could not tell."""

    patcher: object
    encoder: object
    name: str
    layout: str | None = None


@dataclass(eq=False)
class InstructionEmbeds:
    """MLLM output for both sides of CFG, on the intermediate device. ``working_size`` (width, height) is
    the size the reference image was shown at; ``None`` for text-to-image. In the v1.2 layout each side is a
    list with one conditioning per image (each trimmed to its own length)."""

    cond: TextConditioning | list[TextConditioning]
    uncond: TextConditioning | list[TextConditioning]
    working_size: tuple[int, int] | None
    source: str
    layout: str = LAYOUT_V11

    @property
    def hidden_size(self) -> int:
        """The MLLM's width, which the connector must take."""
        first = self.cond[0] if isinstance(self.cond, list) else self.cond
        return first.llm_embedding.shape[-1]

    @property
    def rows(self) -> int:
        """How many images the instruction was encoded with."""
        return len(self.cond) if isinstance(self.cond, list) else self.cond.llm_embedding.shape[0]

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
        check_layout(self.embeds, dit)
        if dit.model is not self.dit.model:
            raise ValueError(
                f"the conditioning was bound to the connector of '{self.dit.name}' but the sampler got the model "
                f"'{dit.name}'; connect the same Step1X-Edit DiT loader to the connector and the sampler"
            )


def check_layout(embeds: InstructionEmbeds, dit: DiT) -> None:
    """Refuse embeddings whose encoder layout the DiT does not take, saying what to change."""
    wanted = layout_of(dit.version)
    if embeds.layout == wanted:
        return
    if wanted == LAYOUT_V12:
        fix = ("set Instruction Encode's layout to v1.2, or load the MLLM from the v1.2 model folder (its "
               "text_encoder/) so that layout 'auto' finds v1.2")
    else:
        fix = f"set Instruction Encode's layout to {LAYOUT_V11} (or auto with an MLLM that is not from a v1.2 folder)"
    raise ValueError(
        f"the instruction was encoded in the {embeds.layout} layout (from '{embeds.source}'), but '{dit.name}' is "
        f"Step1X-Edit {dit.version}, which takes the {wanted} layout: {fix}"
    )
