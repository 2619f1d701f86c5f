"""The Step1X-Edit node set. One table gives each node its id (the ``class_type`` saved in workflows) and
its display name."""

from . import _comfy
from .conditioning import Connector, InstructionEncode
from .image import Resize, RestoreSize, VaeDecode, VaeEncode
from .loaders import DiTLoader, MllmLoader, VaeLoader
from .lora import LoraLoader
from .native import CFGRenorm, Encode, ModelLoader, ModelSampling, Sigmas
from .reasoning import ReasonEdit, Reflect, Think
from .regione import RegionE
from .sampler import Sampler
from .teacache import TeaCache

NODE_CONFIG = {
    "Step1XEditDiTLoader": {"class": DiTLoader, "name": "Step1X-Edit DiT Loader"},
    "Step1XEditMLLMLoader": {"class": MllmLoader, "name": "Step1X-Edit MLLM Loader"},
    "Step1XEditVAELoader": {"class": VaeLoader, "name": "Step1X-Edit VAE Loader"},
    "Step1XEditLoraLoader": {"class": LoraLoader, "name": "Step1X-Edit LoRA Loader"},
    "Step1XEditInstructionEncode": {"class": InstructionEncode, "name": "Step1X-Edit Instruction Encode"},
    "Step1XEditConnector": {"class": Connector, "name": "Step1X-Edit Connector"},
    "Step1XEditSampler": {"class": Sampler, "name": "Step1X-Edit Sampler"},
    "Step1XEditTeaCache": {"class": TeaCache, "name": "Step1X-Edit TeaCache"},
    "Step1XEditRegionE": {"class": RegionE, "name": "Step1X-Edit RegionE"},
    "Step1XEditVAEDecode": {"class": VaeDecode, "name": "Step1X-Edit VAE Decode"},
    "Step1XEditVAEEncode": {"class": VaeEncode, "name": "Step1X-Edit VAE Encode"},
    "Step1XEditResize": {"class": Resize, "name": "Step1X-Edit Resize (size_level)"},
    "Step1XEditRestoreSize": {"class": RestoreSize, "name": "Step1X-Edit Restore Original Size"},
    "Step1XEditThink": {"class": Think, "name": "Step1X-Edit Think (v1.2)"},
    "Step1XEditReflect": {"class": Reflect, "name": "Step1X-Edit Reflect (v1.2)"},
    "Step1XEditReasonEdit": {"class": ReasonEdit, "name": "Step1X-Edit Reason Edit (v1.2)"},
    "Step1XEditModelLoader": {"class": ModelLoader, "name": "Step1X-Edit Model Loader (MODEL)"},
    "Step1XEditEncode": {"class": Encode, "name": "Step1X-Edit Encode (CONDITIONING)"},
    "Step1XEditSigmas": {"class": Sigmas, "name": "Step1X-Edit Sigmas (official schedule)"},
    "Step1XEditModelSampling": {"class": ModelSampling, "name": "Step1X-Edit Model Sampling (latent size)"},
    "Step1XEditCFGRenorm": {"class": CFGRenorm, "name": "Step1X-Edit CFG Renorm"},
}

_comfy.name_errors_by_the_pack(__package__.rpartition(".")[0])

NODE_CLASS_MAPPINGS = {node_id: entry["class"] for node_id, entry in NODE_CONFIG.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: entry["name"] for node_id, entry in NODE_CONFIG.items()}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_CONFIG", "NODE_DISPLAY_NAME_MAPPINGS"]
