"""Templates: Conversation -> Rendered (the exact training text + the character span of every message's content).

Built-in templates (`tulu`, `chatml`, `alpaca`) are rendered by small Python builders that know their spans by
construction; each also has an equivalent Jinja chat template that is saved with trained models. The tokenizer's own
chat template (`model`) and user Jinja files are rendered twice: once with sentinel strings in place of every content
to learn the template's skeleton, once with the real contents to check that the skeleton with the contents put back
is exactly what the template renders. Spans are then exact by construction; a template that rewrites content
(beyond stripping surrounding whitespace) is refused with a clear message rather than guessed at.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .template_bounds import TemplateLimit, compile_bounded
from .types import Conversation, Message, Rendered, Span, UsageError, Where

# Bounds on one render of a Jinja template (templates are untrusted code: see imtune.template_bounds).
RENDER_SECONDS = 10.0
RENDER_CHARS = 1_000_000  # output characters, or 10 x the conversation's content if that is more

# ----------------------------------------------------------------------------------------------------------------
# Jinja equivalents of the built-ins (saved as the chat template of trained models; also used for generation).
TULU_JINJA = (
    "{{ bos }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '<|system|>\n' + m['content'] + '\n' }}"
    "{% elif m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + '\n' }}"
    "{% else %}{{ '<|assistant|>\n' + m['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
CHATML_JINJA = (
    "{{ bos }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n")
ALPACA_JINJA = (
    "{{ bos }}{% set ns = namespace(seen=false) %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{% if not ns.seen %}{% set ns.seen = true %}{{ '" + ALPACA_PREAMBLE.replace("\n", "\\n") + "' }}{% endif %}"
    "{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + m['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)


class _Builder:
    """Appends text pieces and records the spans of content pieces."""

    def __init__(self):
        self.parts: list[str] = []
        self.spans: list[Span] = []
        self.pos = 0

    def add(self, text: str, cls: str | None = None, turn: int = -1) -> None:
        if cls is not None and text:
            self.spans.append(Span(self.pos, self.pos + len(text), cls, turn))
        self.parts.append(text)
        self.pos += len(text)


def _tulu(b: _Builder, msgs, bos: str, eos: str) -> None:
    b.add(bos)
    for i, m in enumerate(msgs):
        b.add(f"<|{m.role}|>\n")
        b.add(m.content, m.role, i)
        if m.role == "assistant":
            b.add(eos, "eot", i)
        b.add("\n")


def _chatml(b: _Builder, msgs, bos: str, eos: str) -> None:
    b.add(bos)
    for i, m in enumerate(msgs):
        b.add(f"<|im_start|>{m.role}\n")
        b.add(m.content, m.role, i)
        b.add("<|im_end|>", "eot" if m.role == "assistant" else None, i)
        b.add("\n")


def _alpaca(b: _Builder, msgs, bos: str, eos: str) -> None:
    b.add(bos)
    for i, m in enumerate(msgs):
        if m.role == "system":
            b.add(m.content, "system", i)
            b.add("\n\n")
        elif m.role == "user":
            if not any(x.role == "user" for x in msgs[:i]):
                b.add(ALPACA_PREAMBLE)
            b.add("### Instruction:\n")
            b.add(m.content, "user", i)
            b.add("\n\n")
        else:
            b.add("### Response:\n")
            b.add(m.content, "assistant", i)
            b.add(eos, "eot", i)
            b.add("\n\n")


@dataclass(frozen=True)
class Builtin:
    build: Callable
    jinja: str
    generation_prompt: str  # appended after the prompt messages when generating


# The registry of built-in templates. `model` (the tokenizer's own) and a path to a Jinja file are also accepted.
TEMPLATES: dict[str, Builtin] = {
    "tulu": Builtin(_tulu, TULU_JINJA, "<|assistant|>\n"),
    "chatml": Builtin(_chatml, CHATML_JINJA, "<|im_start|>assistant\n"),
    "alpaca": Builtin(_alpaca, ALPACA_JINJA, "### Response:\n"),
}

# End-of-turn markers recognised right after an assistant content in Jinja templates (plus the tokenizer's eos).
EOT_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|end_of_text|>",
               "<｜end▁of▁sentence｜>", "<|END_OF_TURN_TOKEN|>", "[/INST]")


def template_names() -> list[str]:
    return [*TEMPLATES, "model", "<path to a .jinja file>"]


def _bos_text(tokenizer) -> str:
    """The BOS text the built-ins start with: the tokenizer's BOS if (and only if) it adds one by itself."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or tokenizer.bos_token_id is None:
        return ""
    ids = tokenizer("a").input_ids
    return bos if ids and ids[0] == tokenizer.bos_token_id else ""


def _sentinel(i: int) -> str:
    return f"\ue000{i}\ue001"  # private-use characters: never in real data, never touched by templates


class Renderer:
    """A template bound to a tokenizer. `render(conv)` for training text and spans; `prompt(msgs)` for generation."""

    def __init__(self, template: str | None, tokenizer):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token or ""
        self.bos = _bos_text(tokenizer)
        name = template or ("model" if getattr(tokenizer, "chat_template", None) else "tulu")
        self.builtin: Builtin | None = None
        if name in TEMPLATES:
            self.builtin = TEMPLATES[name]
            self.jinja = self.builtin.jinja.replace("{{ bos }}", f"{{{{ '{self.bos}' }}}}" if self.bos else "")
        elif name == "model":
            jinja = getattr(tokenizer, "chat_template", None)
            if not jinja or not isinstance(jinja, str):
                raise UsageError("--template model: this tokenizer has no chat template; valid templates: "
                                 + ", ".join(template_names()))
            self.jinja = jinja
        elif name.endswith((".jinja", ".j2", ".jinja2")) or Path(name).is_file():
            p = Path(name)
            if not p.is_file():
                raise UsageError(f"{name}: template file not found")
            self.jinja = p.read_text(encoding="utf-8")
        else:
            raise UsageError(f"unknown template {name!r}; valid: {', '.join(template_names())}")
        self.name = name
        self._compiled = None
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        specials |= {t.content if hasattr(t, "content") else str(t)
                     for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
        self.eot_markers = sorted({m for m in EOT_MARKERS if m in specials} | ({self.eos} if self.eos else set()),
                                  key=len, reverse=True)

    # -- Jinja ---------------------------------------------------------------------------------------------------
    def _render_jinja(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if self._compiled is None:
            self._compiled = compile_bounded(self.jinja)
        tok = self.tokenizer
        kw = {k: v for k, v in (getattr(tok, "special_tokens_map", {}) or {}).items() if isinstance(v, str)}
        kw.update(bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
        chars = max(RENDER_CHARS, 10 * sum(len(m["content"]) for m in messages))
        try:
            return self._compiled.render(chars, RENDER_SECONDS, messages=messages,
                                         add_generation_prompt=add_generation_prompt, **kw)
        except TemplateLimit as e:
            where = f"{self.name}:{e.line}" if e.line else self.name
            raise TemplateLimit(f"{where}: {e.what}; a chat template must not loop or allocate without bound "
                                "(use --template tulu|chatml|alpaca, or fix the template)", e.line) from None

    def _render_spans_jinja(self, conv: Conversation) -> tuple[str, list[Span]]:
        msgs = conv.messages
        try:
            skeleton = self._render_jinja([{"role": m.role, "content": _sentinel(i)} for i, m in enumerate(msgs)],
                                          False)
            real = self._render_jinja([{"role": m.role, "content": m.content} for m in msgs], False)
        except TemplateLimit as e:
            raise TemplateLimit(f"{e} (rendering {conv.source})", e.line) from None
        except Exception as e:  # Jinja's raise_exception() and template bugs alike
            raise UsageError(f"{conv.source}: template {self.name!r} cannot render this conversation: {e}") from None
        # Split the skeleton at the sentinels: pieces[k] is template text, order[k] the message after it.
        pieces, order, rest = [], [], skeleton
        while True:
            starts = [(rest.find(_sentinel(i)), i) for i in range(len(msgs)) if _sentinel(i) in rest]
            if not starts:
                pieces.append(rest)
                break
            at, i = min(starts)
            if i in order:
                raise UsageError(f"{conv.source}: template {self.name!r} repeats message {i}'s content; "
                                 "imtune cannot assign its tokens one class")
            pieces.append(rest[:at])
            order.append(i)
            rest = rest[at + len(_sentinel(i)):]
        for strip in (False, True):
            contents = [msgs[i].content.strip() if strip else msgs[i].content for i in order]
            text = pieces[0] + "".join(c + p for c, p in zip(contents, pieces[1:]))
            if text == real:
                break
        else:
            raise UsageError(f"{conv.source}: template {self.name!r} changes message content while rendering, so "
                             "imtune cannot locate it exactly; use --template tulu|chatml|alpaca or a template that "
                             "inserts content verbatim")
        spans, pos = [], len(pieces[0])
        for k, (i, c) in enumerate(zip(order, contents)):
            role = msgs[i].role
            spans.append(Span(pos, pos + len(c), role, i))
            pos += len(c)
            after = pieces[k + 1]
            if role == "assistant":
                lead = len(after) - len(after.lstrip())
                for m in self.eot_markers:
                    if after.startswith(m, lead):
                        spans.append(Span(pos + lead, pos + lead + len(m), "eot", i))
                        break
            pos += len(after)
        return text, spans

    # -- public --------------------------------------------------------------------------------------------------
    def render(self, conv: Conversation) -> Rendered:
        if self.builtin is not None:
            b = _Builder()
            self.builtin.build(b, conv.messages, self.bos, self.eos)
            text, spans = "".join(b.parts), b.spans
        else:
            text, spans = self._render_spans_jinja(conv)
        spans = [s for s in spans if s.end > s.start]
        return Rendered(text, tuple(spans), conv.source, len(conv.messages))

    def prompt(self, messages: list[Message] | tuple[Message, ...]) -> str:
        """The text a model continues to answer the last user message (generation prompt included)."""
        if self.builtin is not None:
            b = _Builder()
            self.builtin.build(b, list(messages), self.bos, self.eos)
            return "".join(b.parts) + self.builtin.generation_prompt
        return self._render_jinja([{"role": m.role, "content": m.content} for m in messages], True)


def render_all(convs, renderer: Renderer) -> list[Rendered]:
    return [renderer.render(c) for c in convs]

