"""Putting a checkpoint's tensors into a model built on the meta device, and checking first that they fit.

Every reader (a .safetensors file, a diffusers-layout folder, a GGUF file) compares what the file holds with
:func:`declared_tensors` before it reads a byte, so a file that lacks tensors, holds others or has them in
another shape is refused with its name and nothing is loaded; :func:`load_state` then loads the tensors and
checks that the model's layers took every one of them.
"""

from __future__ import annotations

import torch

from .safetensors_file import CheckpointError


def declared_tensors(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every tensor ``model`` declares, by state-dict key, with its shape.

    That is its state dict plus the weights of layers built lazily: ComfyUI's layers under dynamic VRAM
    create a Linear with ``weight = None`` and make the parameter only when a state dict is loaded into
    it, so such a layer is missing from ``model.state_dict()`` until then."""
    shapes = {key: tuple(t.shape) for key, t in model.state_dict(keep_vars=True).items()}
    for name, module in model.named_modules():
        for key, shape in _lazy_tensors(module).items():
            shapes.setdefault(f"{name}.{key}" if name else key, shape)
    return shapes


def _lazy_tensors(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The parameters a lazily built Linear creates when it is loaded; none for any other layer."""
    if not isinstance(module, torch.nn.Linear) or "weight" in module._parameters or module.weight is not None:
        return {}
    tensors = {"weight": (module.out_features, module.in_features)}
    if getattr(module, "comfy_need_lazy_init_bias", False):
        tensors["bias"] = (module.out_features,)
    return tensors


def unloaded_tensors(model: torch.nn.Module) -> list[str]:
    """Keys of tensors that still hold no data: meta placeholders and lazy layers never loaded."""
    names = [k for k, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    for name, module in model.named_modules():
        names += [f"{name}.{key}" if name else key for key in _lazy_tensors(module)]
    return names


def check_file(label: str, expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]],
               ignored: tuple[str, ...] = ()) -> None:
    """Refuse a file (``label``) whose tensors (``stored``: shape by model key) are not the model's ``expected``
    ones, or not in their shapes; keys ending in one of ``ignored`` are the file's own extras (fp8 scales)."""
    missing = sorted(expected.keys() - stored.keys())
    unexpected = sorted(k for k in stored.keys() - expected.keys() if not k.endswith(ignored))
    refuse_mismatch(label, "the model it describes", missing, unexpected)
    refuse_wrong_shapes(label, expected, stored)


def refuse_mismatch(label: str, what: str, missing: list[str], unexpected: list[str]) -> None:
    """Refuse weights (``label``: the file or folder) that lack tensors ``what`` needs or hold others."""
    if not (missing or unexpected):
        return
    parts = [f"{len(names)} {kind} (e.g. {', '.join(names[:5])})"
             for kind, names in (("missing", missing), ("unexpected", unexpected)) if names]
    raise CheckpointError(
        f"{label} does not match {what}: {'; '.join(parts)} tensors. The weights are incomplete or of another "
        "model; nothing was loaded."
    )


def refuse_wrong_shapes(label: str, expected: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse weights whose tensors (``shapes``, by model key) differ from the shapes the model expects."""
    wrong = [(key, tuple(shapes[key]), shape) for key, shape in sorted(expected.items())
             if tuple(shapes[key]) != shape]
    if wrong:
        key, stored, shape = wrong[0]
        raise CheckpointError(
            f"{label}: {len(wrong)} tensors do not have the shape the rest of the weights implies, e.g. {key} is "
            f"{list(stored)} where {list(shape)} is expected. The weights are inconsistent (a bad conversion or a "
            "mix of two models); nothing was loaded."
        )


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], label: str) -> None:
    """Assign ``state`` (checked against the model beforehand) into ``model`` and check that its layers took
    every tensor: one they refuse is a fault of those layer classes, not of the file."""
    result = model.load_state_dict(state, strict=False, assign=True)
    refused = sorted(set(result.missing_keys) | set(result.unexpected_keys) | set(unloaded_tensors(model)))
    if refused:
        layers = sorted({_layer_type(model, key) for key in refused})
        raise RuntimeError(
            f"{label} matches the model, but its layers did not take {len(refused)} of the file's "
            f"tensors (e.g. {', '.join(refused[:5])}; layer classes: {', '.join(layers[:4])}). The file is fine: "
            "these layer classes load weights in a way this pack does not support. Please report it together "
            "with your ComfyUI version."
        )


def _layer_type(model: torch.nn.Module, key: str) -> str:
    try:
        module = model.get_submodule(key.rpartition(".")[0])
    except AttributeError:
        return "unknown"
    return f"{type(module).__module__}.{type(module).__qualname__}"
