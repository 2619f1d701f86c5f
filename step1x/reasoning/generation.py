"""Text generation with a loaded Qwen2.5-VL: ``QwenGenerator(call) -> reply``, seeded, cancellable, with progress.

Anything with the signature ``(ChatCall) -> str`` can stand in for it (``GenerateFn``); tests script replies
that way, and the thinker never needs to know which it got.

The reference samples every call with ``max_new_tokens=128, do_sample=True, top_p=0.9, temperature=0.7`` and
``eos_token_id=151645`` (``<|im_end|>``); everything else (top_k, repetition penalty) comes from the model's
own generation config. It passes a per-call ``max_tokens`` (512–1024) that its client ignores, so 128 is the
default here too; ``max_new_tokens=None`` uses those per-call budgets instead. Only the new tokens are
decoded, without special tokens, then stripped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..encoder.tokens import IM_END_ID
from .images import make_thinker_image_processor
from .inputs import ModelInputs, build_model_inputs
from .messages import ChatCall

GenerateFn = Callable[[ChatCall], str]
"""What the thinker calls for each model reply."""


class ReasoningCancelled(RuntimeError):
    """Raised when the caller's ``should_stop`` callback asks to stop thinking/reflection."""


class CannotGenerateError(ValueError):
    """A text encoder that cannot generate text (loaded without its language-model head)."""


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int | None = 128
    """128 as the reference actually runs; None uses the per-call budgets it names (512/768/1024)."""
    do_sample: bool = True
    top_p: float = 0.9
    temperature: float = 0.7
    eos_token_id: int = IM_END_ID

    def __post_init__(self):
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be a positive integer or None, got {self.max_new_tokens!r}")

    def generate_kwargs(self, call: ChatCall) -> dict[str, Any]:
        """The keyword arguments the reference passes to ``generate()`` for ``call``."""
        budget = self.max_new_tokens if self.max_new_tokens is not None else call.reference_max_tokens
        kwargs: dict[str, Any] = {"max_new_tokens": budget, "do_sample": self.do_sample}
        if self.do_sample:
            kwargs.update(top_p=self.top_p, temperature=self.temperature)
        kwargs["eos_token_id"] = self.eos_token_id
        return kwargs


def check_can_generate(model: nn.Module) -> None:
    """Raise unless ``model`` is a Qwen2.5-VL with a real language-model head."""
    head = getattr(model, "lm_head", None)
    if head is None or isinstance(head, nn.Identity) or not hasattr(model, "generate"):
        raise CannotGenerateError(
            f"the loaded text encoder ({type(model).__name__}) cannot generate text: its language-model head "
            f"is {type(head).__name__ if head is not None else 'missing'}. Thinking and reflection need the full "
            "Qwen2.5-VL (with lm_head); load the encoder with generation enabled."
        )


def takes_token_types(model: nn.Module) -> bool:
    """Whether the model's forward takes ``mm_token_type_ids`` (transformers 5), which it then needs in order to
    compute the multimodal RoPE positions of the image tokens (transformers 4 works them out from the ids)."""
    import inspect

    inner = getattr(model, "model", model)
    return "mm_token_type_ids" in inspect.signature(inner.forward).parameters


class _TokenWatch:
    """A transformers ``StoppingCriteria`` that reports progress and raises when the caller asks to stop."""

    def __init__(self, prompt_length: int, max_new_tokens: int, should_stop, on_token):
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.should_stop = should_stop
        self.on_token = on_token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.on_token is not None:
            self.on_token(input_ids.shape[1] - self.prompt_length, self.max_new_tokens)
        if self.should_stop is not None and self.should_stop():
            raise ReasoningCancelled("thinking/reflection was cancelled while generating")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class SeededSampling:
    """A private random stream for sampling: seeded once, continued from call to call, and kept apart from
    the global generator (so an edit between two calls neither disturbs it nor is disturbed by it)."""

    def __init__(self, seed: int, device: torch.device):
        self.seed = int(seed)
        self.device = torch.device(device)
        self._states: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @contextmanager
    def active(self) -> Iterator[None]:
        accelerator = self.device.type not in ("cpu", "meta")
        module = torch.get_device_module(self.device.type) if accelerator else None
        index = self.device.index if self.device.index is not None else (module.current_device() if module else 0)
        devices = [index] if accelerator else []
        device_type = self.device.type if accelerator else "cuda"
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            if self._states is None:
                torch.random.default_generator.manual_seed(self.seed)
                if accelerator:
                    _seed_device(module, index, self.seed)
            else:
                torch.set_rng_state(self._states[0])
                if accelerator:
                    module.set_rng_state(self._states[1], index)
            yield
            self._states = (torch.get_rng_state(), module.get_rng_state(index) if accelerator else None)


def _seed_device(module, index: int, seed: int) -> None:
    """Seed one accelerator's default generator as ``torch.manual_seed`` would, leaving the others alone."""
    generators = getattr(module, "default_generators", None)
    if generators:
        generators[index].manual_seed(seed)
    else:
        module.manual_seed(seed)


class QwenGenerator:
    """``GenerateFn`` on a loaded ``Qwen2_5_VLForConditionalGeneration`` (with ``lm_head``).

    seed: None samples from the global random state (as the reference); an integer makes every run of the
        same calls give the same replies. Successive calls continue one stream, so a retried call gets a new
        sample.
    should_stop: checked before each call and after every generated token; True raises ``ReasoningCancelled``
        (a callback that raises its own exception, e.g. ComfyUI's interrupt, works as well).
    on_token: ``(tokens generated, max new tokens)`` after every token.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        image_processor=None,
        *,
        settings: GenerationSettings | None = None,
        seed: int | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_token: Callable[[int, int], None] | None = None,
    ):
        check_can_generate(model)
        self.model = model
        self.tokenizer = tokenizer
        if image_processor is None:
            vision = model.config.vision_config
            image_processor = make_thinker_image_processor(
                vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
            )
        self.image_processor = image_processor
        self.settings = settings or GenerationSettings()
        self.should_stop = should_stop
        self.on_token = on_token
        self.sampling = SeededSampling(seed, self.device) if seed is not None else None
        self.token_types = takes_token_types(model)
        self.last_new_tokens = 0
        """Tokens generated by the latest call (eos included)."""

    @classmethod
    def from_encoder(cls, encoder, **kwargs) -> QwenGenerator:
        """From the pack's ``TextEncoder`` (its model must have been loaded with ``lm_head``)."""
        return cls(encoder.model, encoder.tokenizer, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def inputs(self, call: ChatCall) -> ModelInputs:
        return build_model_inputs(call, self.tokenizer, self.image_processor)

    def __call__(self, call: ChatCall) -> str:
        if self.should_stop is not None and self.should_stop():
            raise ReasoningCancelled("thinking/reflection was cancelled")
        inputs = self.inputs(call)
        kwargs = self.settings.generate_kwargs(call)
        prompt_length = inputs.input_ids.shape[1]
        watch = _TokenWatch(prompt_length, kwargs["max_new_tokens"], self.should_stop, self.on_token)
        from transformers import StoppingCriteriaList

        with torch.inference_mode(), self._sampling():
            out = self.model.generate(
                **inputs.generate_kwargs(self.device, token_types=self.token_types),
                **kwargs,
                use_cache=True,
                stopping_criteria=StoppingCriteriaList([watch]),
            )
        new = out[:, prompt_length:]
        self.last_new_tokens = int(new.shape[1])
        text = self.tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
        return text.strip()

    @contextmanager
    def _sampling(self) -> Iterator[None]:
        if self.sampling is None:
            yield
        else:
            with self.sampling.active():
                yield
