"""Step1X-Edit MLLM instruction encoder (Qwen2.5-VL-7B-Instruct), token-exact with the official v1.0/v1.1
encoder (``TextEncoder.encode``) and with the v1.2 pipeline (``TextEncoder.encode_v12``).

Pure PyTorch + transformers; device and dtype are always passed in.
"""

from .checkpoint import CheckpointError
from .encoder import GenerationUnavailableError, TextEncoder, TextEncoderOutput
from .image_chain import ImageInputError, make_image_processor
from .image_v12 import blank_reference
from .inputs import DROP_TOKENS, MAX_LENGTH, EncoderInputs, build_inputs
from .inputs_v12 import MAX_LENGTH_V12, PREFIX_TOKENS_V12, EncoderInputsV12, build_inputs_v12
from .loader import load_text_encoder, text_encoder_path
from .template import T2I_NEGATIVE_PROMPT_V12, default_negative_prompt_v12
from .tokens import TokenizerError, load_tokenizer

__all__ = [
    "CheckpointError",
    "DROP_TOKENS",
    "EncoderInputs",
    "EncoderInputsV12",
    "GenerationUnavailableError",
    "ImageInputError",
    "MAX_LENGTH",
    "MAX_LENGTH_V12",
    "PREFIX_TOKENS_V12",
    "T2I_NEGATIVE_PROMPT_V12",
    "TextEncoder",
    "TextEncoderOutput",
    "TokenizerError",
    "blank_reference",
    "build_inputs",
    "build_inputs_v12",
    "default_negative_prompt_v12",
    "load_text_encoder",
    "load_tokenizer",
    "make_image_processor",
    "text_encoder_path",
]
