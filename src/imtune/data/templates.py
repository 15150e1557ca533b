"""Templates: Conversation -> Rendered (the exact training text + the character span of every message's content).

Built-in templates (`tulu`, `chatml`, `alpaca`) are rendered by small Python builders that know their spans by
construction; each also has an equivalent Jinja chat template that is saved with trained models. The tokenizer's own
chat template (`model`) and user Jinja files are rendered twice: once with sentinel strings in place of every content
to learn the template's skeleton, once with the real contents to check that the skeleton with the contents put back
is exactly what the template renders. Spans are then exact by construction; a template that rewrites content
(beyond stripping surrounding whitespace) is refused with a clear message rather than guessed at.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imtune.data.template_bounds import TemplateLimit, compile_bounded
from imtune.data.template_verbatim import contents_verbatim
from imtune.types import Conversation, Message, Rendered, Span, UsageError

# Bounds on one render of a Jinja template (templates are untrusted code: see imtune.data.template_bounds).
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
# The Stanford Alpaca prompts (PROMPT_DICT in tatsu-lab/stanford_alpaca's train.py): one preamble for records with
# an input, one without; the input gets its own "### Input:" section.
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.\n\n")
# A user message may carry `input` (alpaca): then its content is instruction + "\n\n" + input.
ALPACA_JINJA = (
    "{{ bos }}{% set ns = namespace(seen=false) %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{% set has_input = m['input'] is defined and m['input'] is not none %}"
    "{% if not ns.seen %}{% set ns.seen = true %}"
    "{% if has_input %}{{ '" + ALPACA_PREAMBLE_INPUT.replace("\n", "\\n") + "' }}"
    "{% else %}{{ '" + ALPACA_PREAMBLE.replace("\n", "\\n") + "' }}{% endif %}{% endif %}"
    "{% if has_input %}{{ '### Instruction:\n' + m['content'][:(m['content'] | length) - (m['input'] | length) - 2]"
    " + '\n\n### Input:\n' + m['input'] + '\n\n' }}"
    "{% else %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}{% endif %}"
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
                b.add(ALPACA_PREAMBLE if m.input is None else ALPACA_PREAMBLE_INPUT)
            b.add("### Instruction:\n")
            b.add(m.instruction, "user", i)
            b.add("\n\n")
            if m.input is not None:
                b.add("### Input:\n")
                b.add(m.input, "user", i)
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


SKELETONS = 256  # role sequences whose skeleton a Renderer keeps (then it starts over)


def _sentinel(i: int) -> str:
    return f"\ue000{i}\ue001"  # private-use characters: never in real data, never touched by templates


class Renderer:
    """A template bound to a tokenizer. `render(conv)` for training text and spans; `prompt(msgs)` for generation."""

    def __init__(self, template: str | None, tokenizer, system_prompt: str | None = "default"):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token or ""
        self.bos = _bos_text(tokenizer)
        name = template or ("model" if getattr(tokenizer, "chat_template", None) else "tulu")
        self.builtin: Builtin | None = None
        if name in TEMPLATES:
            self.builtin = TEMPLATES[name]
            self.jinja = self._bound(self.builtin)
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
        if self.builtin is None:  # a built-in's own Jinja (a run trained with it): its builder, exact spans included
            self.builtin = next((b for b in TEMPLATES.values() if self._bound(b) == self.jinja), None)
        self.name = name
        self._compiled = None
        self._skeletons: dict[tuple[str, ...], str] = {}  # roles -> the template rendered around sentinels
        self._verbatim: bool | None = None  # contents_verbatim(self.jinja), found when first needed
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        specials |= {t.content if hasattr(t, "content") else str(t)
                     for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
        self.eot_markers = sorted({m for m in EOT_MARKERS if m in specials} | ({self.eos} if self.eos else set()),
                                  key=len, reverse=True)
        self.system_prompt = "default" if system_prompt is None else system_prompt
        self.injected, self._system_turn = self._find_default_system()
        self._check_system_prompt()
        if self.system_prompt != "default" and (self.injected is not None or self.system_prompt != "none"):
            # the template saved with a run (and used to serve it) makes the same choice for requests without one
            self.jinja = _system_wrapper(self.system_message()) + self.jinja
            self._compiled, self._skeletons, self._verbatim = None, {}, None

    def _bound(self, builtin: Builtin) -> str:
        """A built-in's Jinja with this tokenizer's BOS text written in."""
        return builtin.jinja.replace("{{ bos }}", f"{{{{ '{self.bos}' }}}}" if self.bos else "")

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
        """The text and the exact span of every message: the template rendered once with the real contents and once
        around sentinels (the skeleton, which a template that does not look at contents renders alike for every
        conversation with the same roles: it is kept per role sequence). The text must equal the skeleton with the
        contents put back, or nothing is assumed: a kept skeleton that does not fit is rendered again, and a fresh one
        that does not fit is an error. Where the template provably puts contents in verbatim and reads them for
        nothing else (template_verbatim), the real render is skipped: the text is the skeleton with the contents."""
        msgs = conv.messages
        roles = tuple(m.role for m in msgs)
        if self._verbatim is None:
            self._verbatim = contents_verbatim(self.jinja)
        try:
            real = (None if self._verbatim else
                    self._render_jinja([{"role": m.role, "content": m.content} for m in msgs], False))
            kept = self._skeletons.get(roles)
            found = self._spans(kept, real, conv) if kept is not None else None
            if found is None:
                skeleton = self._render_jinja([{"role": r, "content": _sentinel(i)} for i, r in enumerate(roles)],
                                              False)
                found = self._spans(skeleton, real, conv)
                if len(self._skeletons) >= SKELETONS:
                    self._skeletons.clear()
                self._skeletons[roles] = skeleton
        except TemplateLimit as e:
            raise TemplateLimit(f"{e} (rendering {conv.source})", e.line) from None
        except UsageError:
            raise
        except Exception as e:  # Jinja's raise_exception() and template bugs alike
            raise UsageError(f"{conv.source}: template {self.name!r} cannot render this conversation: {e}") from None
        if found is None:
            raise UsageError(f"{conv.source}: template {self.name!r} changes message content while rendering, so "
                             "imtune cannot locate it exactly; use --template tulu|chatml|alpaca or a template that "
                             "inserts content verbatim")
        return found

    def _spans(self, skeleton: str, real: str | None, conv: Conversation) -> tuple[str, list[Span]] | None:
        """(text, spans) when `real` is `skeleton` with each message's content (stripped or not) in place of its
        sentinel (real None: the template is known to put them in unchanged); None when it is not."""
        msgs = conv.messages
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
            if real is None or text == real:
                break
        else:
            return None
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

    # -- system prompt -------------------------------------------------------------------------------------------
    def _find_default_system(self) -> tuple[str | None, tuple[str, str] | None]:
        """(the system prompt the template injects when a conversation has none, or None; the text around a system
        message's content, (before, after), or None). Found by rendering sentinels with and without a system
        message: without one, the text before the user's content is before + INJECTED + after + the user header."""
        if self.builtin is not None:
            b = _Builder()
            self.builtin.build(b, [Message("system", _sentinel(0))], self.bos, self.eos)
            before, _, after = "".join(b.parts).partition(_sentinel(0))
            return None, (before.removeprefix(self.bos), after)
        try:
            plain = self._render_jinja([{"role": "user", "content": _sentinel(1)},
                                        {"role": "assistant", "content": _sentinel(2)}], False)
            sys_ = self._render_jinja([{"role": "system", "content": _sentinel(0)},
                                       {"role": "user", "content": _sentinel(1)},
                                       {"role": "assistant", "content": _sentinel(2)}], False)
        except Exception:  # noqa: BLE001 - a template that refuses system messages (or these ones) injects none
            return None, None
        if _sentinel(0) not in sys_ or _sentinel(1) not in plain:
            return None, None
        a, _, rest = sys_.partition(_sentinel(0))
        between = rest.partition(_sentinel(1))[0]  # close of the system turn + the user header
        p = plain.partition(_sentinel(1))[0]
        lead = len(between) - len(between.lstrip())
        close = next((between[:lead + len(m)] for m in self.eot_markers if between.startswith(m, lead)), "")
        close += between[len(close):][:len(between[len(close):]) - len(between[len(close):].lstrip())]
        turn = (a.removeprefix(self.bos), close)
        if len(p) > len(a) + len(between) and p.startswith(a) and p.endswith(between):
            return p[len(a):len(p) - len(between)], turn
        return None, turn

    def system_message(self) -> str:
        """The content of the system message --system-prompt inserts ('' for none)."""
        return "" if self.system_prompt == "none" else self.system_prompt

    def _check_system_prompt(self) -> None:
        if self.system_prompt in ("default", "") or self.injected is None or self.system_prompt != "none":
            if self.system_prompt == "":
                raise UsageError("--system-prompt: give none, default or a text")
            return
        text = self._render_jinja([{"role": "system", "content": ""}, {"role": "user", "content": _sentinel(1)}],
                                  False)
        if self.injected in text:
            raise UsageError(f"--system-prompt none: template {self.name!r} writes its default system prompt "
                             "even when a conversation starts with an empty system message, so imtune cannot "
                             "leave it out; use --system-prompt TEXT or another --template")

    def with_system(self, messages) -> tuple[Message, ...]:
        """The messages --system-prompt renders: a system message first unless they start with one (none: an empty
        one, only where the template would inject its default; default: unchanged)."""
        messages = tuple(messages)
        if self.system_prompt == "default" or (messages and messages[0].role == "system"):
            return messages
        if self.system_prompt == "none" and self.injected is None:
            return messages
        return (Message("system", self.system_message()), *messages)

    def system_note(self, conversations, total_tokens: int) -> dict:
        """What the system prompt costs: which text, in how many examples, tokens each, share of all tokens."""
        n = sum(1 for c in conversations if not c.messages or c.messages[0].role != "system")
        return self.system_note_counts(n, len(conversations), total_tokens)

    def system_note_counts(self, n: int, n_conversations: int, total_tokens: int, n_counted: int | None = None) -> dict:
        """system_note from counts (a stream measures them as it goes): `n` of `n_conversations` have no system
        message of their own; `n_counted` of them are among the examples `total_tokens` counts (default: all n)."""
        if self.system_prompt in ("default", "none") and self.injected is None:
            line = f"system prompt: none added (template {self.name} injects none; records' own system messages kept)"
            return {"mode": self.system_prompt, "text": None, "examples": 0, "tokens_each": 0, "share": 0.0,
                    "line": line}
        content = self.injected if self.system_prompt == "default" else self.system_message()
        before, after = self._system_turn or ("", "")
        each = len(self.tokenizer(before + content + after, add_special_tokens=False).input_ids)
        share = (n if n_counted is None else n_counted) * each / total_tokens if total_tokens else 0.0
        cost = f"{each} tokens each with its markers, {share:.1%} of all tokens"
        if self.system_prompt == "default":
            line = (f"system prompt: template {self.name} adds its default system prompt {content!r} to {n:,} of "
                    f"{n_conversations:,} examples ({cost}; no loss under it/im/weighted, loss under all); "
                    "--system-prompt none|TEXT changes it")
        elif self.system_prompt == "none":
            line = (f"system prompt: none (--system-prompt none): an empty system message replaces the template's "
                    f"default in {n:,} of {n_conversations:,} examples ({cost})")
        else:
            line = (f"system prompt: {content!r} (--system-prompt) added to {n:,} of {n_conversations:,} "
                    f"examples that have none ({cost})")
        return {"mode": "default" if self.system_prompt == "default" else
                ("none" if self.system_prompt == "none" else "text"),
                "text": content, "examples": n, "tokens_each": each, "share": share, "line": line}

    # -- public --------------------------------------------------------------------------------------------------
    def render(self, conv: Conversation) -> Rendered:
        if self.system_prompt != "default":
            conv = Conversation(self.with_system(conv.messages), conv.source)
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
        messages = self.with_system(messages)
        if self.builtin is not None:
            b = _Builder()
            self.builtin.build(b, list(messages), self.bos, self.eos)
            return "".join(b.parts) + self.builtin.generation_prompt
        return self._render_jinja([{"role": m.role, "content": m.content} for m in messages], True)


def _system_wrapper(content: str) -> str:
    """Jinja that puts a system message first when a conversation has none (prefixed to a template saved with a
    run, so serving makes the --system-prompt choice training made). Braces, % and # are written as escapes so
    no text can end the tag."""

    literal = json.dumps(content)
    for ch in "{}%#":
        literal = literal.replace(ch, f"\\u{ord(ch):04x}")
    return ("{%- if messages and messages[0]['role'] != 'system' %}{%- set messages = [{'role': 'system', "
            f"'content': {literal}}}] + messages %}}{{%- endif %}}")


def render_all(convs, renderer: Renderer) -> list[Rendered]:
    return [renderer.render(c) for c in convs]

