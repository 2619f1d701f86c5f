"""Step1X-Edit MLLM instruction encoder (Qwen2.5-VL-7B-Instruct), token-exact with the official one.

Pure PyTorch + transformers; device and dtype are always passed in.
"""

from .checkpoint import CheckpointError
from .encoder import TextEncoder, TextEncoderOutput
from .image_chain import ImageInputError, make_image_processor
from .inputs import DROP_TOKENS, MAX_LENGTH, EncoderInputs, build_inputs
from .loader import load_text_encoder
from .tokens import TokenizerError, load_tokenizer

__all__ = [
    "CheckpointError",
    "DROP_TOKENS",
    "EncoderInputs",
    "ImageInputError",
    "MAX_LENGTH",
    "TextEncoder",
    "TextEncoderOutput",
    "TokenizerError",
    "build_inputs",
    "load_text_encoder",
    "load_tokenizer",
    "make_image_processor",
]
