"""Chat templates: messages → the text a chat model was trained on.

Serving renders a prompt with it, training renders whole conversations (train/chat.py),
so it lives here, with the other things that travel with a model.

A template comes from a directory, an HF one or a jaxlm run: `tokenizer_config.json`
(`chat_template`: a string, or a list of {name, template} of which "default" is taken) or
`chat_template.jinja`. It is rendered the way transformers' `apply_chat_template(...,
tokenize=False)` renders it: a sandboxed jinja2 environment with trim_blocks/lstrip_blocks,
loop controls, a `tojson` filter that does not HTML-escape, `raise_exception` and
`strftime_now`, and the variables messages, add_generation_prompt, bos_token and eos_token.

A model without a template (a jaxlm run with the byte tokenizer, a base HF model) gets
DEFAULT_TEMPLATE: "<|role|>\\ncontent\\n" per message, then "<|assistant|>\\n".
"""
from __future__ import annotations

import datetime
import json
import os

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

DEFAULT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n"
                    "{{ message['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks the assistant's tokens
    with it, for training masks): serving renders the body as it is."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body
                                      ).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes (<, >, &), which would change the prompt text
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def _token_text(token) -> str:
    """bos_token / eos_token as tokenizer_config.json stores them: a string, an
    AddedToken dict {"content": ...}, or null."""
    if isinstance(token, dict):
        return token.get("content") or ""
    return token or ""


class ChatTemplate:
    """A compiled template. `render(messages)` is a prompt (generation prompt on);
    `render(messages, add_generation_prompt=False)` a finished conversation, as training
    sees it. Template errors (a bad role order, `raise_exception`) are ValueErrors: the
    caller's messages are at fault (a 400 when serving, a bad line when training)."""

    def __init__(self, source: str = DEFAULT_TEMPLATE, bos_token: str = "",
                 eos_token: str = ""):
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _Generation])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source = source
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        try:
            return self.template.render(messages=messages,
                                        add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token,
                                        **extra)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the chat template rejected these messages: {e}") from None


def load_template(hf_dir: str | None) -> ChatTemplate:
    """The template of a directory (an HF model's, or a jaxlm run's if it holds
    tokenizer_config.json or chat_template.jinja), else the built-in default."""
    config = {}
    path = os.path.join(hf_dir, "tokenizer_config.json") if hf_dir else ""
    if path and os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: serve the default one
        named = {t.get("name"): t.get("template") for t in source}
        source = named.get("default")
    jinja_file = os.path.join(hf_dir, "chat_template.jinja") if hf_dir else ""
    if not source and jinja_file and os.path.isfile(jinja_file):
        with open(jinja_file) as f:
            source = f.read()
    return ChatTemplate(source or DEFAULT_TEMPLATE, _token_text(config.get("bos_token")),
                        _token_text(config.get("eos_token")))


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of rendered chat text. The template already wrote any BOS, so special
    tokens are not added again (as transformers' apply_chat_template(tokenize=True));
    HFTokenizer only exposes encode() with them, hence the reach to its Tokenizer."""
    inner = getattr(tokenizer, "_tok", None)
    if inner is not None:
        return inner.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text)


def eos_id(tokenizer, template: ChatTemplate) -> int | None:
    """The id of the template's eos_token, for ending plain completions; None when the
    template names none or the tokenizer lacks it (the byte tokenizer has no specials)."""
    inner = getattr(tokenizer, "_tok", None)
    if inner is None or not template.eos_token:
        return None
    return inner.token_to_id(template.eos_token)


def save_template(template: ChatTemplate, folder: str) -> str:
    """Write the template with its bos/eos tokens as folder/tokenizer_config.json (the
    keys load_template reads), atomically: a fine-tuned run keeps the template it was
    trained with, for serving and further fine-tuning."""
    path = os.path.join(folder, "tokenizer_config.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"chat_template": template.source, "bos_token": template.bos_token,
                   "eos_token": template.eos_token}, f, indent=2)
    os.replace(tmp, path)
    return path
