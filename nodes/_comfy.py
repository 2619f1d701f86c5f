"""The only module that talks to ComfyUI: devices, model management, model folders, progress, latent
previews and Cancel. Outside ComfyUI (plain Python, pytest) a headless stand-in answers the same calls:
the main device is CUDA when present else the CPU, a model moves to that device when first used and
stays there (no offloading), progress goes to an optional hook, and model folders come from
``STEP1X_MODELS_DIR`` (a folder laid out like ComfyUI's ``models``) or :func:`register_model_folder`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from ..step1x.checkpoints.model_files import COMFY_DIRS, COMFY_TOKENIZER

try:  # inside ComfyUI
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops
    import comfy.utils
    import folder_paths
except ImportError:  # headless
    mm = None

IN_COMFYUI = mm is not None
MODEL_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
log = logging.getLogger("step1x_edit")


class Interrupted(RuntimeError):
    """Headless stand-in for ComfyUI's interrupt: raised between steps after :func:`request_interrupt`."""


# --------------------------------------------------------------------------------------------- devices


def main_device() -> torch.device:
    if IN_COMFYUI:
        return mm.get_torch_device()
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def intermediate_device() -> torch.device:
    """Where tensors passed between nodes live (CPU), so cached outputs hold no GPU memory."""
    return mm.intermediate_device() if IN_COMFYUI else torch.device("cpu")


def dit_devices() -> tuple[torch.device, torch.device]:
    """(load, offload) devices of the DiT."""
    if IN_COMFYUI:
        return mm.get_torch_device(), mm.unet_offload_device()
    return main_device(), torch.device("cpu")


def vae_devices() -> tuple[torch.device, torch.device]:
    if IN_COMFYUI:
        return mm.vae_device(), mm.vae_offload_device()
    return main_device(), torch.device("cpu")


TEXT_ENCODER_DEVICES = ("default", "main_gpu", "other_gpu", "cpu")


def text_encoder_devices(choice: str) -> tuple[torch.device, torch.device]:
    """(load, offload) devices of the MLLM. "default" follows ComfyUI's rule for text encoders (the GPU
    with enough VRAM, the CPU under --lowvram/--novram/--cpu)."""
    offload = mm.text_encoder_offload_device() if IN_COMFYUI else torch.device("cpu")
    if choice == "default":
        return (mm.text_encoder_device() if IN_COMFYUI else main_device()), offload
    if choice == "cpu":
        return torch.device("cpu"), offload
    main = main_device()
    if choice == "main_gpu":
        return main, offload
    if choice == "other_gpu":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        main_index = (main.index or 0) if main.type == "cuda" else -1
        others = [i for i in range(count) if i != main_index]
        if not others:
            raise ValueError(
                f"device 'other_gpu' needs a second CUDA GPU, but {count} is visible; choose main_gpu, default or cpu"
            )
        return torch.device("cuda", others[0]), offload
    raise ValueError(f"unknown device {choice!r}; choose one of {list(TEXT_ENCODER_DEVICES)}")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the device runs it well (as the official code), else float32."""
    if IN_COMFYUI:
        return torch.bfloat16 if mm.should_use_bf16(device) else torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def operations():
    """Layer classes for the models: ComfyUI's casting ops inside ComfyUI (so --lowvram can keep part of
    the weights on the CPU and stream them), the library default otherwise."""
    if IN_COMFYUI:
        return _quantized_ops(_autocast_aware_ops())
    from ..step1x.models.ops import CastOps

    return CastOps


_AUTOCAST_OPS = None


def _autocast_aware_ops():
    """``comfy.ops.manual_cast`` whose Linear casts its weight straight to the dtype the matmul runs in.

    The sampler runs under autocast as the official code does, so a Linear's input is often float32 (after
    a LayerNorm) while the matmul runs in bfloat16; casting to the input's dtype would copy every weight to
    float32 on every call only for autocast to cast it back."""
    global _AUTOCAST_OPS
    if _AUTOCAST_OPS is not None:
        return _AUTOCAST_OPS
    import inspect

    from ..step1x.models.ops import compute_dtype

    base = comfy.ops.manual_cast
    # Newer ComfyUI overlaps the weight copy with compute ("offloadable" casts, released by uncast_bias_weight);
    # older versions return just (weight, bias).
    offloadable = "offloadable" in inspect.signature(comfy.ops.cast_bias_weight).parameters

    class Linear(base.Linear):
        def forward_comfy_cast_weights(self, input, *args, **kwargs):
            dtype = compute_dtype(input)
            if dtype == input.dtype:
                return super().forward_comfy_cast_weights(input, *args, **kwargs)
            if not offloadable:
                weight, bias = comfy.ops.cast_bias_weight(self, input, dtype=dtype, bias_dtype=dtype)
                return torch.nn.functional.linear(input, weight, bias)
            weight, bias, stream = comfy.ops.cast_bias_weight(self, input, dtype=dtype, bias_dtype=dtype,
                                                              offloadable=True)
            out = torch.nn.functional.linear(input, weight, bias)
            comfy.ops.uncast_bias_weight(self, weight, bias, stream)
            return out

    _AUTOCAST_OPS = type("AutocastManualCast", (base,), {"Linear": Linear})
    return _AUTOCAST_OPS


_QUANTIZED_OPS: dict = {}


def _quantized_ops(base):
    """``base`` (the casting ops above) whose Linear may also hold a GGUF-quantised weight: a uint8 parameter of
    the file's bytes, so ComfyUI counts, loads and --lowvram-streams the quantised size. Each call moves the
    bytes to the compute device, dequantises them there and then applies ComfyUI's weight functions (LoRA
    patches of a partly loaded model, :func:`add_lora`'s wrappers) to the dequantised weight."""
    if base in _QUANTIZED_OPS:
        return _QUANTIZED_OPS[base]
    from ..step1x.models.quantized import matmul_dtype

    class Linear(base.Linear):
        holds_quantized = True
        qtype = None
        weight_shape = None

        def forward_comfy_cast_weights(self, input, *args, **kwargs):
            if self.qtype is None:
                return super().forward_comfy_cast_weights(input, *args, **kwargs)
            from ..step1x.models.dequant import dequantize

            dtype = matmul_dtype(input)
            non_blocking = mm.device_supports_non_blocking(input.device)
            weight = dequantize(self.weight.to(input.device, non_blocking=non_blocking), self.qtype,
                                self.weight_shape, dtype)
            for function in self.weight_function:
                weight = function(weight)
            bias = None
            if self.bias is not None:
                bias = self.bias.to(device=input.device, dtype=dtype, non_blocking=non_blocking)
                for function in self.bias_function:
                    bias = function(bias)
            return torch.nn.functional.linear(input, weight, bias)

    _QUANTIZED_OPS[base] = type(f"Quantized{base.__name__}", (base,), {"Linear": Linear})
    return _QUANTIZED_OPS[base]


# ------------------------------------------------------------------------------------------ error names


def name_errors_by_the_pack(package: str) -> None:
    """Give the error classes of the pack's modules their names relative to the pack folder.

    ComfyUI shows an exception's type as ``type.__module__ + "." + qualname`` (in /history and Show Report),
    and it imports a custom node folder under the folder's path, so an error would read
    ``/home/…/custom_nodes/ComfyUI-Step1X-Edit.step1x.checkpoints.safetensors_file.CheckpointError``. After this
    it reads ``step1x.checkpoints.safetensors_file.CheckpointError``, the name the library has on its own.
    Covers the modules imported so far: call it once the node modules are imported."""
    prefix = package + "."
    for name, module in list(sys.modules.items()):
        if not name.startswith(prefix) or module is None:
            continue
        for value in list(vars(module).values()):
            if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == name:
                value.__module__ = name[len(prefix):]


# ------------------------------------------------------------------------------------ model management


class HeadlessPatcher:
    """What the nodes use of ComfyUI's ModelPatcher: the module, its devices, and clones that share the
    module but carry their own LoRAs (applied when the clone is loaded, as ComfyUI applies patches)."""

    def __init__(self, model: torch.nn.Module, load_device: torch.device, offload_device: torch.device):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        self.loras: list = []

    def clone(self) -> "HeadlessPatcher":
        clone = HeadlessPatcher(self.model, self.load_device, self.offload_device)
        clone.loras = list(self.loras)
        return clone

    def apply_loras(self) -> None:
        """Bring the shared module to this patcher's LoRAs, taking off those of another clone first."""
        from ..step1x.checkpoints.lora import apply_lora

        applied, handles = getattr(self.model, "_step1x_loras", ([], []))
        same = len(applied) == len(self.loras) and all(
            a[0] is b[0] and a[1] == b[1] for a, b in zip(applied, self.loras, strict=True))
        if same:
            return
        for handle in reversed(handles):
            handle.remove()
        handles = [apply_lora(self.model, patch, strength, backup_device=self.offload_device)
                   for patch, strength in self.loras]
        self.model._step1x_loras = (list(self.loras), handles)


class ModuleHolder(torch.nn.Module):
    """Holds a module whose ``device`` is a read-only property (transformers models), because ModelPatcher
    records the device it loaded a model onto in that attribute."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner


def manage(model: torch.nn.Module, load_device: torch.device, offload_device: torch.device):
    """Register ``model`` with ComfyUI's model management, with the patcher ComfyUI gives its own models."""
    if isinstance(getattr(type(model), "device", None), property):
        model = ModuleHolder(model)
    if IN_COMFYUI:
        return patcher_class()(model, load_device=load_device, offload_device=offload_device)
    return HeadlessPatcher(model, load_device, offload_device)


def patcher_class():
    """The patcher ComfyUI wraps its own models in: ``CoreModelPatcher``, which ComfyUI's start-up turns into
    the dynamic-VRAM patcher when that mode is on (so it is looked up at each call, never cached), or
    ``ModelPatcher`` in versions that predate it (0.3.x). The dynamic patcher hands a model whose load device
    is the CPU to a plain ModelPatcher itself, as it does for ComfyUI's own models."""
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def load(patchers: list, memory_required: int = 0, full: bool = False) -> None:
    """Make room and load ``patchers`` onto their load devices (ComfyUI may load only part of a model
    built from its casting ops; ``full`` forbids that for models that are not)."""
    if IN_COMFYUI:
        mm.load_models_gpu(patchers, memory_required=memory_required, force_full_load=full)
        return
    for patcher in patchers:
        patcher.model.to(patcher.load_device)
        if isinstance(patcher, HeadlessPatcher):
            patcher.apply_loras()


def add_lora(patcher, patch, strength: float):
    """A clone of ``patcher`` that changes its model by ``patch`` (a :class:`step1x.checkpoints.lora.LoraPatch`) at
    ``strength`` whenever it is loaded; ``patcher`` itself stays as it is. In ComfyUI the modules become
    weight patches, which ComfyUI applies and removes itself (fp8 and --lowvram included)."""
    clone = patcher.clone()
    if not IN_COMFYUI:
        clone.loras.append((patch, strength))
        return clone
    quantized = _add_quantized_lora(clone, patch, strength)
    patches = {m.target: _comfy_lora(m) for m in patch.modules if m.target not in quantized}
    missing = set(patches) - set(clone.add_patches(patches, strength))
    if missing:
        raise ValueError(f"{patch.name}: the model has no weights {', '.join(sorted(missing)[:3])}; "
                         "load the LoRA onto the Step1X-Edit DiT it was made for")
    return clone


def _add_quantized_lora(clone, patch, strength: float) -> set[str]:
    """The modules of ``patch`` whose weight is GGUF-quantised become weight wrappers of ``clone`` (ComfyUI
    applies a wrapper to the weight at every call, after the layer dequantised it; a weight patch would be
    merged into the stored bytes). Returns their targets."""
    from ..step1x.models.quantized import is_quantized

    layers = dict(clone.model.named_modules())
    done = set()
    for module in patch.modules:
        layer = layers.get(module.target[: -len(".weight")])
        if layer is not None and is_quantized(layer):
            clone.add_weight_wrapper(module.target, LowRankDelta(module.up, module.down, strength * module.scale))
            done.add(module.target)
    return done


class LowRankDelta:
    """A ComfyUI weight function: ``weight + factor * up @ down``, summed in float32, in the weight's dtype."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, factor: float):
        self.up, self.down, self.factor = up, down, factor

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        up = self.up.to(device=weight.device, dtype=torch.float32)
        down = self.down.to(device=weight.device, dtype=torch.float32)
        return (weight.float() + self.factor * (up @ down)).to(weight.dtype)


def _comfy_lora(module):
    """A ComfyUI LoRA weight adapter; ComfyUI computes ``alpha / rank``, so alpha is ``scale * rank``."""
    weights = (module.up, module.down, module.scale * module.rank, None, None, None)
    try:
        from comfy.weight_adapter import LoRAAdapter
    except ImportError:  # ComfyUI before weight adapters
        return ("lora", weights)
    return LoRAAdapter(set(), weights)


# ----------------------------------------------------------------------------------------- model files

_HEADLESS_FOLDERS: dict[str, list[Path]] = {}
FOLDER_ALIASES = {names[0]: names for names in COMFY_DIRS.values()}
"""ComfyUI's folder key and its legacy alias, per model kind (``diffusion_models``: ``unet`` ...)."""


def register_model_folder(kind: str, path: str | os.PathLike) -> None:
    """Headless: add a folder to search for models of ``kind`` ("diffusion_models", "vae", "text_encoders")."""
    if IN_COMFYUI:
        folder_paths.add_model_folder_path(kind, str(path))
        return
    folders = _HEADLESS_FOLDERS.setdefault(kind, [])
    if Path(path) not in folders:
        folders.append(Path(path))


def clear_model_folders() -> None:
    _HEADLESS_FOLDERS.clear()


def model_folders(kind: str) -> list[Path]:
    if IN_COMFYUI:
        return [Path(p) for p in folder_paths.get_folder_paths(kind)]
    folders = list(_HEADLESS_FOLDERS.get(kind, []))
    root = os.environ.get("STEP1X_MODELS_DIR")
    if root:
        folders += [Path(root) / sub for sub in FOLDER_ALIASES.get(kind, (kind,))]
    return folders


def _files_below(folder: Path):
    """(path relative to ``folder``, file name) of every file below ``folder``. Linked folders are followed,
    as ComfyUI's own listing follows them (large models are often links); hidden folders (.git, download
    staging) are skipped."""
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(root).relative_to(folder)
        for name in files:
            yield rel / name, name


def gguf_files(kind: str) -> list[str]:
    """GGUF files below the ``kind`` folders (ComfyUI's own listing of a folder leaves them out), relative to
    their folder."""
    names = set()
    for folder in model_folders(kind):
        names.update(rel.as_posix() for rel, name in _files_below(folder) if name.lower().endswith(".gguf"))
    return sorted(names)


def model_files(kind: str) -> list[str]:
    """Model files of ``kind``, relative to their folder, for a loader's dropdown."""
    if IN_COMFYUI:
        return folder_paths.get_filename_list(kind)
    names = set()
    for folder in model_folders(kind):
        names.update(rel.as_posix() for rel, name in _files_below(folder)
                     if Path(name).suffix.lower() in MODEL_EXTENSIONS)
    return sorted(names)


def model_path(kind: str, name: str) -> Path:
    """Full path of ``name`` in the ``kind`` folders; an error that says where to put it otherwise."""
    for folder in model_folders(kind):
        candidate = folder / name
        if candidate.exists():
            return candidate
    where = ", ".join(str(f) for f in model_folders(kind)) or f"models/{kind} (no folder is configured)"
    raise FileNotFoundError(f"model '{name}' not found in the {kind} folders ({where}). Put the file there and "
                            "refresh the list (press R in ComfyUI), or pick another file.")


def hf_folders(kind: str) -> list[str]:
    """Sub-folders holding a Hugging Face model (a config.json), relative to the ``kind`` folders."""
    names = set()
    for folder in model_folders(kind):
        names.update(rel.parent.as_posix() for rel, name in _files_below(folder)
                     if name == "config.json" and rel.parent != Path("."))
    return sorted(names)


def default_tokenizer_dir() -> Path | None:
    """The Qwen2.5 tokenizer to use for single-file MLLMs: the copy ComfyUI ships (for Qwen-Image), else
    ``STEP1X_QWEN_TOKENIZER``."""
    if IN_COMFYUI:
        path = Path(comfy.utils.__file__).parents[1] / COMFY_TOKENIZER
        if path.is_dir():
            return path
    value = os.environ.get("STEP1X_QWEN_TOKENIZER")
    return Path(value) if value else None


# ------------------------------------------------------------------------------ progress and interrupt

_progress_hook: Callable[[int, int, object], None] | None = None
_interrupt_requested = False


def set_progress_hook(hook: Callable[[int, int, object], None] | None) -> None:
    """Headless: receive ``(step, total, preview)`` after every sampling step."""
    global _progress_hook
    _progress_hook = hook


def request_interrupt(value: bool = True) -> None:
    """Headless: make the next step raise :class:`Interrupted` (ComfyUI's Cancel, outside ComfyUI)."""
    global _interrupt_requested
    _interrupt_requested = value


def check_interrupt() -> None:
    global _interrupt_requested
    if IN_COMFYUI:
        mm.throw_exception_if_processing_interrupted()
    elif _interrupt_requested:
        _interrupt_requested = False
        raise Interrupted("sampling was cancelled")


class Progress:
    """Per-step progress bar, latent preview and Cancel check for the sampler's callback."""

    def __init__(self, total: int, device: torch.device):
        self.previewer = None
        self.bar = None
        if IN_COMFYUI:
            import comfy.latent_formats
            import latent_preview

            self.previewer = latent_preview.get_previewer(device, comfy.latent_formats.Flux())
            self.bar = comfy.utils.ProgressBar(total)

    def __call__(self, info) -> None:
        """``info``: a :class:`step1x.sampling.denoise.StepInfo` (``denoised`` is the model-space estimate)."""
        check_interrupt()
        if self.bar is not None:
            preview = None
            if self.previewer is not None:
                preview = self.previewer.decode_latent_to_preview_image("JPEG", info.denoised)
            self.bar.update_absolute(info.step + 1, info.total, preview)
        elif _progress_hook is not None:
            _progress_hook(info.step + 1, info.total, info.denoised)


class Counter:
    """A progress bar over units other than sampling steps (generated tokens), with the Cancel check:
    ``counter(done, total)``."""

    def __init__(self, total: int = 1):
        self.bar = comfy.utils.ProgressBar(total) if IN_COMFYUI else None

    def __call__(self, done: int, total: int) -> None:
        check_interrupt()
        if self.bar is not None:
            self.bar.update_absolute(done, total)
        elif _progress_hook is not None:
            _progress_hook(done, total, None)


def should_stop() -> bool:
    """For the library's ``should_stop`` callbacks: raises ComfyUI's interrupt (or :class:`Interrupted`
    headless) when Cancel was pressed, else False."""
    check_interrupt()
    return False
