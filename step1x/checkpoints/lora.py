"""LoRAs for the Step1X-Edit DiT: read a LoRA file, map each of its modules onto the DiT weight it
changes, and apply it at a strength.

A LoRA module adds ``strength * scale * up @ down`` to one weight, with ``scale = alpha / rank`` (1 when
the file has no alpha or alpha 0, as the official kohya-style trainer reads it). Four naming layouts are
read; each ends on an official key such as ``double_blocks.0.img_attn.qkv.weight``:

- kohya sd-scripts: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``. The official trainer writes these for the Linear layers of the double and single blocks;
  DiffSynth-Studio writes them with ``--align_to_opensource_format``.
- the official module names, bare or under ``diffusion_model.`` (ComfyUI), ``transformer.`` or
  ``base_model.model.`` (PEFT), with ``lora_down``/``lora_up`` or ``lora_A``/``lora_B`` tensors.
- DiffSynth-Studio's own names (``blocks.0.attn.a_to_qkv``, ``single_blocks.0.to_qkv_mlp``).
- diffusers' names (``transformer_blocks.0.attn.to_q``): the separate q, k, v (and the single blocks'
  ``proj_mlp``) LoRAs are stacked into one LoRA on the fused ``qkv`` / ``linear1`` weight; ``norm_out.linear``
  (scale|shift) has the two halves of its output rows swapped onto ``final_layer.adaLN_modulation.1`` (shift|scale).

``connector.*`` layers are patched like any other when a file has them. Text-encoder modules
(``lora_te*``) are reported and left out: the MLLM is not patched.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.ops import FP8_DTYPES, cast_to
from .safetensors_file import CheckpointError, Header, open_tensors, read_header

log = logging.getLogger(__name__)

KOHYA_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder.", "text_encoders.")
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "pipe.dit.", "dit.")
ROLES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".alpha", "alpha"),
)
UNSUPPORTED = ((".dora_scale", "DoRA"), (".hada_w", "LoHa"), (".lokr_w", "LoKr"), (".oft_", "OFT"),
               (".lora_mid.", "LoCon (Tucker)"))
EXPECTED = ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight (kohya, as the official trainer writes) or "
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight")

_DIFFSYNTH = {
    "blocks": ("double_blocks", {
        "norm1_a.linear": "img_mod.lin", "norm1_b.linear": "txt_mod.lin",
        "attn.a_to_qkv": "img_attn.qkv", "attn.b_to_qkv": "txt_attn.qkv",
        "attn.a_to_out": "img_attn.proj", "attn.b_to_out": "txt_attn.proj",
        "ff_a.0": "img_mlp.0", "ff_a.2": "img_mlp.2", "ff_b.0": "txt_mlp.0", "ff_b.2": "txt_mlp.2"}),
    "single_blocks": ("single_blocks", {
        "norm.linear": "modulation.lin", "to_qkv_mlp": "linear1", "proj_out": "linear2"}),
}
_DIFFUSERS = {
    "transformer_blocks": ("double_blocks", {
        "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
        "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
        "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
        "attn.add_v_proj": ("txt_attn.qkv", 2),
        "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
        "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
        "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}),
    "single_transformer_blocks": ("single_blocks", {
        "norm.linear": "modulation.lin", "proj_out": "linear2",
        "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
        "proj_mlp": ("linear1", 3)}),
}
SWAP_HALVES = "swap halves"
"""The part of a module whose output rows are the official layer's with its two halves swapped."""
_DIFFUSERS_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "norm_out.linear": ("final_layer.adaLN_modulation.1", SWAP_HALVES),
    "time_embed.in_layer": "time_in.in_layer", "time_embed.out_layer": "time_in.out_layer",
    "vec_embed.in_layer": "vector_in.in_layer", "vec_embed.out_layer": "vector_in.out_layer",
}
_BLOCK = re.compile(r"^([a-z_]+)\.(\d+)\.(.+)$")


class LoraModule(NamedTuple):
    """One low-rank update: ``weight[target] += strength * scale * up @ down``."""

    target: str
    up: Tensor
    down: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True, eq=False)
class LoraPatch:
    """A LoRA file mapped onto one DiT. ``unmatched``: modules of the file that match no layer of the
    DiT; ``ignored``: text-encoder modules and tensors that are not LoRA pairs."""

    path: Path
    layouts: tuple[str, ...]
    modules: tuple[LoraModule, ...]
    unmatched: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def targets(self) -> list[str]:
        return [m.target for m in self.modules]

    @property
    def touches_connector(self) -> bool:
        return any(t.startswith("connector.") for t in self.targets)


class _Part(NamedTuple):
    """A module of the file: where it goes (``part``: which stacked q/k/v/mlp rows, None for all,
    ``SWAP_HALVES`` for all with the two halves of the rows swapped)."""

    name: str
    layout: str
    part: int | str | None
    keys: dict[str, str]


@dataclass
class LoraPlan:
    """What a LoRA file will change in a DiT, checked from the file header alone (no tensor data)."""

    header: Header
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    """(out, in) of every Linear layer of the DiT (:func:`linear_shapes`)."""
    targets: dict[str, list[_Part]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def layouts(self) -> tuple[str, ...]:
        return tuple(sorted({p.layout for parts in self.targets.values() for p in parts}))


# ------------------------------------------------------------------------------------------- key names


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear layer of ``model`` by module name (its weight key less ``.weight``)."""
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _kohya_names(shapes) -> dict[str, str]:
    return {name.replace(".", "_"): name for name in shapes}


def _translate(name: str, shapes, kohya: dict[str, str]) -> tuple[str, str, int | None] | None:
    """(layout, official module name, stacked part) of a module name of the file, or None."""
    if name.startswith(KOHYA_PREFIX):
        module = kohya.get(name[len(KOHYA_PREFIX):])
        return ("kohya", module, None) if module else None
    bare = next((name[len(p):] for p in PREFIXES if name.startswith(p)), name)
    if bare in shapes:
        return "official names", bare, None
    layout, hit = _rename(bare)
    if hit is None:
        return None
    module, part = (hit, None) if isinstance(hit, str) else hit
    return (layout, module, part) if module in shapes else None


def _rename(name: str) -> tuple[str, str | tuple[str, int | str] | None]:
    """A DiffSynth-Studio or diffusers module name as the official one (with its stacked part)."""
    if name in _DIFFUSERS_TOP:
        return "diffusers", _DIFFUSERS_TOP[name]
    match = _BLOCK.match(name)
    kind, index, rest = match.groups() if match else ("", "", "")
    for layout, tables in (("DiffSynth-Studio", _DIFFSYNTH), ("diffusers", _DIFFUSERS)):
        if kind in tables:
            official, renames = tables[kind]
            hit = renames.get(rest)
            if isinstance(hit, tuple):
                return layout, (f"{official}.{index}.{hit[0]}", hit[1])
            return layout, hit and f"{official}.{index}.{hit}"
    return "", None


def module_names(shapes) -> dict[str, tuple[str, int | None]]:
    """Every module name of a LoRA file that this reader maps onto a layer of a DiT with these Linear
    ``shapes`` (:func:`linear_shapes`): name -> (official module name, stacked part or None). For tools
    that look LoRA modules up by name (ComfyUI's LoRA key map) instead of translating them."""
    names: dict[str, tuple[str, int | None]] = {}
    renamed: dict[str, tuple[str, int | None]] = {}
    for theirs, ours in _DIFFUSERS_TOP.items():
        renamed[theirs] = (ours, None)
    for tables in (_DIFFSYNTH, _DIFFUSERS):
        for kind, (official, renames) in tables.items():
            for module in shapes:
                match = _BLOCK.match(module)
                if not match or match.group(1) != official:
                    continue
                index, rest = match.group(2), match.group(3)
                for theirs, hit in renames.items():
                    target, part = hit if isinstance(hit, tuple) else (hit, None)
                    if target == rest:
                        renamed[f"{kind}.{index}.{theirs}"] = (module, part)
    for module in shapes:
        names[KOHYA_PREFIX + module.replace(".", "_")] = (module, None)
        renamed[module] = (module, None)
    for name, hit in renamed.items():
        if hit[0] in shapes:
            for prefix in ("", *PREFIXES):
                names[prefix + name] = hit
    return names


def _group(header: Header) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Tensor keys by module name and role (down, up, alpha); the keys that are no LoRA tensor."""
    modules: dict[str, dict[str, str]] = {}
    other = []
    for key in header.tensors:
        role = next(((suffix, r) for suffix, r in ROLES if key.endswith(suffix)), None)
        if role is None:
            kind = next((kind for marker, kind in UNSUPPORTED if marker in key), None)
            if kind is not None:
                raise CheckpointError(
                    f"{header.path.name} is a {kind} file (it has {key}); only plain LoRA files (lora_down/lora_up "
                    "or lora_A/lora_B pairs) can be applied to Step1X-Edit. Convert it to a LoRA or pick another file."
                )
            other.append(key)
            continue
        modules.setdefault(key[: -len(role[0])], {})[role[1]] = key
    for name, keys in modules.items():
        if "down" not in keys or "up" not in keys:
            have = ", ".join(sorted(keys))
            raise CheckpointError(f"{header.path.name}: the LoRA module {name} has only {have}; a LoRA module needs "
                                  "both its down and up matrices. The file is incomplete; download it again.")
    return modules, other


def _describe(names: list[str]) -> str:
    text = " ".join(names)
    if re.search(r"(down|up)_blocks|input_blocks|output_blocks|mid_block", text):
        return "an SD1.x/SDXL LoRA (U-Net blocks)"
    if "guidance_in" in text:
        return "a FLUX.1 LoRA"
    if names and all(n.startswith(TEXT_ENCODER_PREFIXES) for n in names):
        return "a text-encoder LoRA"
    if "transformer_blocks" in text:
        return "a diffusers LoRA of another model"
    return "a LoRA of another model"


# -------------------------------------------------------------------------------------------- checking


def check_lora(path: str | os.PathLike, model: nn.Module) -> LoraPlan:
    """Map the modules of the LoRA file ``path`` onto ``model`` (which may live on the meta device) and
    check every shape, from the header alone. Raises :class:`CheckpointError` naming the file when no
    module fits, or when a module fits by name but not by shape."""
    header = read_header(path)
    modules, other = _group(header)
    shapes = linear_shapes(model)
    kohya = _kohya_names(shapes)
    plan = LoraPlan(header, shapes, ignored=list(other))
    for name in sorted(modules):
        found = _translate(name, shapes, kohya)
        if found is None:
            (plan.ignored if name.startswith(TEXT_ENCODER_PREFIXES) else plan.unmatched).append(name)
            continue
        layout, module, part = found
        plan.targets.setdefault(module + ".weight", []).append(_Part(name, layout, part, modules[name]))
    if not plan.targets:
        names = sorted(modules)
        found = (f"none of its {len(names)} LoRA modules is a layer of the Step1X-Edit DiT (it has e.g. "
                 f"{', '.join(names[:3])})" if names else f"it has no LoRA tensors (keys like {', '.join(other[:3])})")
        raise CheckpointError(f"{header.path.name} is {_describe(names) if names else 'not a LoRA'}: {found}. "
                              f"Expected a Step1X-Edit LoRA with keys like {EXPECTED}; nothing was applied.")
    _check_shapes(plan)
    return plan


def _check_shapes(plan: LoraPlan) -> None:
    tensors, wrong = plan.header.tensors, []
    for target, parts in plan.targets.items():
        out, inp = plan.shapes[target[: -len(".weight")]]
        if len(parts) > 1 and (any(p.part is None for p in parts) or len({p.part for p in parts}) < len(parts)):
            raise CheckpointError(
                f"{plan.header.path.name}: {', '.join(p.name for p in parts)} all change {target}; a LoRA file holds "
                "one module per layer. The file mixes two LoRAs; pick one of them."
            )
        for p in parts:
            down, up = tensors[p.keys["down"]].shape, tensors[p.keys["up"]].shape
            rows = out if p.part in (None, SWAP_HALVES) else inp if p.part < 3 else out - 3 * inp
            alpha = tensors[p.keys["alpha"]].shape if "alpha" in p.keys else ()
            if len(down) != 2 or not down[0] or down[1] != inp or tuple(up) != (rows, down[0]) or len(alpha) > 1:
                wrong.append(f"{p.name}: down {tuple(down)}, up {tuple(up)} for {target} {(out, inp)}")
    if wrong:
        raise CheckpointError(
            f"{plan.header.path.name} does not fit this Step1X-Edit DiT: {len(wrong)} module(s) have other shapes "
            f"({'; '.join(wrong[:3])}). The LoRA was made for a model of another size; nothing was applied."
        )


def _report(plan: LoraPlan) -> None:
    name = plan.header.path.name
    arch = plan.header.metadata.get("modelspec.architecture", "")
    if arch and "step1x" not in arch.lower():
        log.warning("%s was trained for %s, not Step1X-Edit; its layers share the FLUX names, so it applies, but "
                    "the result may not be what it was made for", name, arch)
    if plan.unmatched:
        log.warning("%s: %d of its modules match no layer of this DiT and are left out: %s", name,
                    len(plan.unmatched), _some(plan.unmatched, 10))
    if plan.ignored:
        log.warning("%s: %d entries are not DiT LoRA modules and are left out (text-encoder parts are not applied): "
                    "%s", name, len(plan.ignored), _some(plan.ignored, 5))


def _some(names: list[str], count: int) -> str:
    return ", ".join(names[:count]) + (" ..." if len(names) > count else "")


# --------------------------------------------------------------------------------------------- loading


def load_lora(path: str | os.PathLike, model: nn.Module) -> LoraPatch:
    """Read the LoRA file ``path`` for ``model``: every module as ``(target key, up, down, scale)``.
    Modules that match nothing are logged as a warning and kept in ``unmatched``."""
    plan = check_lora(path, model)
    _report(plan)
    modules = []
    with open_tensors(plan.header.path) as f:
        for target, parts in plan.targets.items():
            loaded = []
            for p in parts:
                down = f.get_tensor(p.keys["down"])
                alpha = f.get_tensor(p.keys["alpha"]) if "alpha" in p.keys else None
                loaded.append((p, f.get_tensor(p.keys["up"]), down, _scale(alpha, down.shape[0])))
            modules.append(_module(target, loaded, plan.shapes[target[: -len(".weight")]]))
    return LoraPatch(plan.header.path, plan.layouts, tuple(modules), tuple(plan.unmatched), tuple(plan.ignored))


def _scale(alpha: Tensor | None, rank: int) -> float:
    """``alpha / rank``; no alpha, or alpha 0, is no scaling (the kohya reading)."""
    value = 0.0 if alpha is None else float(alpha.float().reshape(-1)[0])
    return 1.0 if value == 0 else value / rank


def _module(target: str, loaded, shape) -> LoraModule:
    if len(loaded) == 1 and loaded[0][0].part in (None, SWAP_HALVES):
        part, up, down, scale = loaded[0]
        if part.part == SWAP_HALVES:
            first, second = up.chunk(2)
            up = torch.cat((second, first))
        return LoraModule(target, up, down, scale)
    out, inp = shape
    rank = sum(down.shape[0] for _, _, down, _ in loaded)
    up_all = torch.zeros(out, rank, dtype=torch.float32)
    column = 0
    for part, up, down, scale in loaded:
        first = 0 if part.part is None else part.part * inp
        up_all[first: first + up.shape[0], column: column + down.shape[0]] = up.float() * scale
        column += down.shape[0]
    return LoraModule(target, up_all, torch.cat([down.float() for _, _, down, _ in loaded]), 1.0)


# -------------------------------------------------------------------------------------------- applying


def lora_delta(module: LoraModule, strength: float, device: torch.device | str = "cpu") -> Tensor:
    """``strength * scale * up @ down`` in float32 on ``device``."""
    up, down = module.up.to(device=device, dtype=torch.float32), module.down.to(device=device, dtype=torch.float32)
    return (strength * module.scale) * (up @ down)


def merge_lora(model: nn.Module, patch: LoraPatch, strength: float = 1.0, *, backup: dict | None = None,
               backup_device: torch.device | str | None = None) -> None:
    """Add each module's delta to its weight in place: the sum is taken in float32 and rounded once to
    the weight's dtype. ``backup`` (a dict) receives the original of each weight before its first change,
    on ``backup_device`` (default: the weight's), so that :func:`restore` undoes the merge bit for bit.

    fp8 weights keep only 3 (e4m3) or 2 (e5m2) mantissa bits, so rounding a merged weight back to fp8
    loses most of a small LoRA delta; :func:`apply_lora` keeps a low-rank branch beside them instead."""
    _merge(dict(model.named_parameters()), patch.modules, strength, backup, backup_device)


def _merge(params, modules, strength, backup, backup_device) -> None:
    quantized = [m.target for m in modules if not params[m.target].is_floating_point()]
    if quantized:
        raise ValueError(f"{quantized[0]} is stored quantised (GGUF blocks); a LoRA cannot be merged into it. Use "
                         "apply_lora, which keeps a low-rank branch beside such weights.")
    with torch.no_grad():
        for module in modules:
            weight = params[module.target]
            if backup is not None and module.target not in backup:
                backup[module.target] = weight.detach().to(backup_device or weight.device, copy=True)
            weight.copy_(weight.float() + lora_delta(module, strength, weight.device))


def restore(model: nn.Module, backup: dict[str, Tensor]) -> None:
    """Put the weights saved by :func:`merge_lora` back."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, original in backup.items():
            params[key].copy_(original)


class LoraBranch(nn.Module):
    """``factor * up(down(x))`` added to a Linear's output by a forward hook, leaving its weight as stored.
    The matrices are non-persistent buffers: they move with the model and stay out of its state dict."""

    def __init__(self, up: Tensor, down: Tensor, factor: float):
        super().__init__()
        self.register_buffer("up", up, persistent=False)
        self.register_buffer("down", down, persistent=False)
        self.factor = factor

    def hook(self, linear: nn.Module, args, output: Tensor) -> Tensor:
        x = args[0]
        dtype = output.dtype
        low = F.linear(x.to(dtype), cast_to(self.down, dtype, x.device))
        return output + self.factor * F.linear(low, cast_to(self.up, dtype, x.device))


@dataclass(eq=False)
class LoraHandle:
    """A LoRA applied by :func:`apply_lora`; :meth:`remove` takes it off again."""

    model: nn.Module
    patch: LoraPatch
    strength: float
    merged: list[LoraModule] = field(default_factory=list)
    backup: dict[str, Tensor] | None = None
    branches: list = field(default_factory=list)

    def remove(self) -> None:
        """Undo the LoRA: branches are dropped; merged weights are restored from the backup (bit for bit) or,
        without one, get the delta subtracted (exact up to one rounding to their dtype)."""
        for linear, name, hook in self.branches:
            hook.remove()
            delattr(linear, name)
        if self.backup is not None:
            restore(self.model, self.backup)
        else:
            _merge(dict(self.model.named_parameters()), self.merged, -self.strength, None, None)
        self.merged, self.branches, self.backup = [], [], None


def _keeps_branch(weight: Tensor) -> bool:
    """fp8 weights, and quantised ones (GGUF blocks, stored as uint8), get a low-rank branch, not a merge."""
    return weight.dtype in FP8_DTYPES or not weight.is_floating_point()


def apply_lora(model: nn.Module, patch: LoraPatch, strength: float = 1.0, *,
               backup_device: torch.device | str | None = None) -> LoraHandle:
    """Apply ``patch`` at ``strength``: merged into weights stored in 16 or 32 bits (no cost per step),
    as a :class:`LoraBranch` beside fp8 and GGUF-quantised weights (rounding a merged fp8 weight would lose
    most of the delta, and quantised blocks cannot be changed in place; the branch keeps it exact for a few
    small matmuls per layer). With ``backup_device``, the original of every merged weight is kept there so
    that :meth:`LoraHandle.remove` restores it exactly."""
    handle = LoraHandle(model, patch, strength, backup=None if backup_device is None else {})
    if strength == 0:
        return handle
    params, layers = dict(model.named_parameters()), dict(model.named_modules())
    for module in patch.modules:
        if _keeps_branch(params[module.target]):
            linear = layers[module.target[: -len(".weight")]]
            branch = LoraBranch(module.up, module.down, strength * module.scale).to(params[module.target].device)
            name = next(f"lora_branch_{i}" for i in itertools.count() if not hasattr(linear, f"lora_branch_{i}"))
            linear.add_module(name, branch)
            handle.branches.append((linear, name, linear.register_forward_hook(branch.hook)))
        else:
            handle.merged.append(module)
    _merge(params, handle.merged, strength, handle.backup, backup_device)
    return handle
