"""Chat templates, for the server: they live in jaxlm.model.io.chat (training renders
conversations with them too); this name keeps serve's imports short."""
from jaxlm.model.io.chat import DEFAULT_TEMPLATE, ChatTemplate, encode_prompt, load_template

__all__ = ["ChatTemplate", "DEFAULT_TEMPLATE", "encode_prompt", "load_template"]
