"""Chat templates for training: choose one, check it up front, and find the assistant tokens.

- A stage uses the model's own template; ``chat_template:`` sets or overrides it, either by name
  (a file ``configs/chat_templates/<name>.jinja``: ``chatml``, ``qwen2.5``, ``llama3``) or by the
  path of a Jinja file. The trained model's tokenizer carries the template it was trained with.
- A stage that renders chats on a model with no template (a base model) fails before any compute,
  naming the model and the setting that fixes it.
- Loss on assistant tokens only works with any template, also without ``{% generation %}`` markers
  (Qwen2.5, Llama 3 and most released chat models have none): each assistant turn's span is found by
  rendering the conversation's prefixes. The text before turn ``i`` is the render of ``messages[:i]``
  with the generation prompt; the turn ends where the render of ``messages[:i+1]`` ends. Both must be
  prefixes of the whole conversation's render (true of every template that renders a turn the same
  whatever follows it); a template that is not (one that drops earlier turns' reasoning, say) is
  refused with that reason rather than trained with a wrong mask. The tokens whose characters
  overlap a span (found through the fast tokenizer's offsets) carry the loss, the turn's end-of-turn
  token included, so the model learns to stop.
- Tools: a conversation with ``tools`` (a capability row's tool definitions) and structured assistant
  ``tool_calls`` is rendered by the template's own tool format (``apply_chat_template(tools=…)``:
  Qwen2.5's ``<tools>`` system block and ``<tool_call>`` JSON, say). A template with no tool format
  (one that never reads ``tools``) would drop them silently, so those get the text form instead
  (:func:`nexus_core.train.capabilities.tools_as_text`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nexus_core.config import repo_root
from nexus_core.errors import InputError

TEMPLATE_DIR = Path("configs") / "chat_templates"


def template_file(spec: str) -> Path:
    """The Jinja file a ``chat_template`` setting names: a shipped name or a path."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    shipped = repo_root() / TEMPLATE_DIR / f"{spec}.jinja"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in (repo_root() / TEMPLATE_DIR).glob("*.jinja"))
    raise InputError(f"chat_template {spec!r}: neither a file nor a shipped template ({', '.join(names)})")


def template_reads(cfg: Any, inputs: Any) -> list[Path]:
    """The template file a stage reads (for its cache key): its ``chat_template`` setting, if any."""
    spec = getattr(cfg, "chat_template", None)
    return [template_file(spec)] if spec else []


def model_has_template(path: str | Path) -> bool:
    """Whether a model directory's tokenizer carries a chat template (files only; nothing is loaded)."""
    p = Path(path)
    if (p / "chat_template.jinja").is_file() or (p / "chat_template.json").is_file():
        return True
    config = p / "tokenizer_config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text()).get("chat_template"))
    except (OSError, json.JSONDecodeError):
        return False


def no_template_error(model: str, where: str) -> InputError:
    """The up-front error for chat data on a model without a chat template."""
    return InputError(f"{where}: model {model} has no chat template (a base model?) and the stage renders chats; "
                      f"set chat_template: to a shipped name (chatml, qwen2.5, llama3) or a .jinja file, or set "
                      f"chat: false to train on plain text")


def check_template(cfg: Any, model_path: str | Path, where: str) -> None:
    """Fail before compute when a stage renders chats and neither its model nor its config has a template."""
    if cfg.chat_template:
        template_file(cfg.chat_template)
    elif not model_has_template(model_path):
        raise no_template_error(str(model_path), where)


def stage_tokenizer(cfg: Any, model_path: str | Path) -> Any:
    """The model's tokenizer with the stage's ``chat_template`` setting applied."""
    from nexus_core.models.io import load_tokenizer

    tok = load_tokenizer(model_path)
    if getattr(cfg, "chat_template", None):
        tok.chat_template = template_file(cfg.chat_template).read_text()
    return tok


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool, tools: Any) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         tools=tools)


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]], tools: Any = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (module docstring)."""
    full = _render(tokenizer, messages, False, tools)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = _render(tokenizer, messages[:i], True, tools) if i else ""
        end = _render(tokenizer, messages[: i + 1], False, tools)
        if not (full.startswith(start) and full.startswith(end) and len(end) > len(start)):
            raise InputError("chat template is not prefix-stable (rendering the conversation up to an assistant "
                             "turn does not give a prefix of the whole render), so the assistant tokens cannot be "
                             "found; set chat_template: to one that renders each turn the same whatever follows it, "
                             "or turn assistant_only_loss off")
        spans.append((len(start), len(end)))
    return full, spans


def supports_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template has a tool format (reads ``tools``, or is a set of named
    templates with a ``tool_use`` one)."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        return "tool_use" in template or any("tools" in t for t in template.values())
    return bool(template) and "tools" in template


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]], max_length: int, assistant_only: bool = True,
                tools: Any = None) -> dict[str, list[int]]:
    """``input_ids`` and ``assistant_masks`` (1 = in the loss) of one conversation, cut at ``max_length``;
    ``tools`` and structured tool calls through the template's tool format, or as text (module docstring)."""
    if (tools or any(m.get("tool_calls") for m in messages)) and not supports_tools(tokenizer):
        from nexus_core.train.capabilities import tools_as_text

        messages, tools = tools_as_text(messages, tools), None
    text, spans = assistant_spans(tokenizer, messages, tools)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])[:max_length]
    if not assistant_only:
        return {"input_ids": ids, "assistant_masks": [1] * len(ids)}
    # a token overlapping a span counts (a BPE merge may straddle the turn's first character)
    mask = [int(any(s < b and e > a for a, b in spans)) for s, e in enc["offset_mapping"][: len(ids)]]
    return {"input_ids": ids, "assistant_masks": mask}


def _renders_chats(train: Any, data: Any) -> bool:
    """Whether a stage config renders chats (sft on a plain ``text`` table does not)."""
    if not getattr(train, "chat", False) and train.method != "sft":
        return False
    if train.method == "sft" and data is not None:
        from nexus_core.train.data import layout, load_rows

        try:
            df, where = load_rows(data)
            cols = layout(df, "sft", where, "sft")
        except InputError:
            return False  # the contract check names the data's own problem
        return cols in (("messages",), ("capability",)) or (train.chat and cols != ("text",))
    return True


def queue_template_problems(stages: list[Any], base: Any, named: dict[str, Any], data: dict[str, Any]) -> list[str]:
    """Every stage of a queue that renders chats on a model with no chat template, found before the first
    stage trains. A stage's model carries the template its input model had, or the one the stage set;
    a model built at run time (the tiny base) has one. ``stages`` are the flow's stage entries (name,
    model, dataset, train); ``named`` maps model references to resolved refs."""
    has: dict[str, bool] = {"base": base is None or model_has_template(base.path)}
    has.update({spec: model_has_template(ref.path) for spec, ref in named.items()})
    current, problems = "base", []
    for s in stages:
        source = s.model or current
        if not s.train.chat_template and not has.get(source, True) and _renders_chats(s.train, data.get(s.dataset)):
            model = named[source].uri if source in named else f"stage {source}"
            if source == "base" and base is not None:
                model = base.uri
            problems.append(str(no_template_error(model, f"stages.{s.name}")))
        has[s.name] = bool(s.train.chat_template) or has.get(source, True)
        if s.train.method != "reward":  # a reward model is not the next stage's policy
            current = s.name
    return problems
