"""ComfyUI custom node pack for Step1X-Edit.

ComfyUI imports this folder as a package and reads the two mappings. The node modules are imported
relatively: ComfyUI has its own top-level ``nodes`` module. The pure-PyTorch library is ``step1x``.
"""

if __package__:  # imported as a package (ComfyUI, or any importer of this folder)
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # executed as a loose file (e.g. collected by a tool that does not know the package)
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
