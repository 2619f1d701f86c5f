"""Model configurations as data: the real Step1X-Edit model and a tiny one for tests and the self-test."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ConnectorParams:
    """The connector (``connector.*``): a timestep-conditioned token refiner from the MLLM width to the
    DiT text width, plus a pooled 768-d vector."""

    in_channels: int = 3584
    hidden_size: int = 4096
    num_heads: int = 32
    depth: int = 2
    mlp_ratio: float = 4.0
    global_out: int = 768
    has_scale_factor: bool = True
    """v1.0 scales the pooled mean by ``1 + connector.scale_factor``; v1.1 has no such key."""

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"connector hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )


@dataclass(frozen=True)
class DiTParams:
    """The FLUX-style double/single stream transformer, with its connector."""

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    connector: ConnectorParams = field(default_factory=ConnectorParams)
    text_token_mapping: bool = False
    """v1.2: ``text_token_mapping``, a Linear from the MLLM width to the connector width (3584 -> 4096 in the
    released model) whose output on the quoted-character tokens is added to the connector's text tokens."""

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if sum(self.axes_dim) != head_dim:
            raise ValueError(
                f"axes_dim {list(self.axes_dim)} sums to {sum(self.axes_dim)}, but the head dim is "
                f"{head_dim} ({self.hidden_size}/{self.num_heads})"
            )
        if any(a % 2 for a in self.axes_dim):
            raise ValueError(f"every RoPE axis must be even, got {list(self.axes_dim)}")
        if self.connector.hidden_size != self.context_in_dim:
            raise ValueError(
                f"connector hidden_size {self.connector.hidden_size} must equal context_in_dim {self.context_in_dim}"
            )
        if self.connector.global_out != self.vec_in_dim:
            raise ValueError(
                f"connector global_out {self.connector.global_out} must equal vec_in_dim {self.vec_in_dim}"
            )
        if self.text_token_mapping and self.connector.has_scale_factor:
            raise ValueError("a DiT with text_token_mapping (v1.2) has no connector scale_factor (v1.0)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def version(self) -> str:
        if self.text_token_mapping:
            return "v1.2"
        return "v1.0" if self.connector.has_scale_factor else "v1.1"

    @property
    def text_token_mapping_shape(self) -> tuple[int, int] | None:
        """(out, in) of the v1.2 ``text_token_mapping.weight``: connector width x MLLM width."""
        if not self.text_token_mapping:
            return None
        return self.connector.hidden_size, self.connector.in_channels

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DiTParams":
        data = dict(data)
        connector = ConnectorParams(**data.pop("connector"))
        data["axes_dim"] = tuple(data["axes_dim"])
        return cls(connector=connector, **data)


@dataclass(frozen=True)
class AutoEncoderParams:
    """The FLUX VAE (``encoder.*``, ``decoder.*``)."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32
    """GroupNorm groups of every norm (32 in the FLUX VAE; diffusers' ``norm_num_groups``)."""

    def __post_init__(self):
        widths = {self.ch * m for m in self.ch_mult}
        if any(w % self.norm_groups for w in widths):
            raise ValueError(f"VAE widths {sorted(widths)} are not all divisible by norm_groups {self.norm_groups}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AutoEncoderParams":
        data = dict(data)
        data["ch_mult"] = tuple(data["ch_mult"])
        return cls(**data)


def with_version(params: DiTParams, version: str) -> DiTParams:
    """The same architecture as Step1X-Edit ``version``: "v1.0" (connector scale factor), "v1.1", or "v1.2"
    (text token mapping)."""
    if version not in VERSIONS:
        raise ValueError(f"unknown Step1X-Edit version {version!r}; expected one of {VERSIONS}")
    connector = ConnectorParams(**{**asdict(params.connector), "has_scale_factor": version == "v1.0"})
    return DiTParams(**{**asdict(params), "connector": connector, "axes_dim": tuple(params.axes_dim),
                        "text_token_mapping": version == "v1.2"})


VERSIONS = ("v1.0", "v1.1", "v1.2")

STEP1X_EDIT = DiTParams()
"""The released 12B model (v1.0 ``step1x-edit-i1258``; use :func:`with_version` for v1.1 and v1.2)."""

FLUX_VAE = AutoEncoderParams()

TINY_DIT = DiTParams(
    in_channels=64,
    out_channels=64,
    vec_in_dim=768,
    context_in_dim=32,
    hidden_size=64,
    mlp_ratio=4.0,
    num_heads=4,
    depth=2,
    depth_single_blocks=2,
    axes_dim=(4, 6, 6),
    theta=10_000,
    qkv_bias=True,
    connector=ConnectorParams(in_channels=48, hidden_size=32, num_heads=2, depth=2, global_out=768),
)
"""The tiny model of the official parity fixtures (random weights only)."""

TINY_VAE = AutoEncoderParams(resolution=64, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)

# Timestep schedule shift (official ``get_schedule``): mu linear in the token count between these points.
SHIFT_BASE = (256, 0.5)
SHIFT_MAX = (4096, 1.15)

# The official text-to-image negative prompt (v1.1, ``inference.py``).
T2I_NEGATIVE_PROMPT = (
    "worst quality, wrong limbs, unreasonable limbs, normal quality, low quality, low res, blurry, text, "
    "watermark, logo, banner, extra digits, cropped, jpeg artifacts, signature, username, error, sketch ,"
    "duplicate, ugly, monochrome, horror, geometry, mutation, disgusting"
)
