"""The data half of the flow in one call: load -> formats -> validate -> template -> weights.

`prepare_examples` is what train, eval, stats and inspect call; it returns the examples plus everything a person
should be told about what happened to their data (skipped records, truncations, examples without weight).
Tokenisation goes through a disk cache (imtune.cache): unchanged data with the same template and tokenizer is never
tokenized twice, whatever the loss mode."""
from __future__ import annotations

from dataclasses import dataclass

from .formats import Understood
from .templates import Renderer
from .types import Conversation, Problem, Rendered, TokenizedExample
from .weights import LossSpec, TokenizeReport, check_truncation, gc_paused, weigh


@dataclass
class Prepared:
    examples: list[TokenizedExample]
    report: TokenizeReport
    renderer: Renderer
    conversations: list[Conversation]
    rendered: list[Rendered]
    load_skipped: list[Problem]
    cache: str = "off"  # "hit" (no tokenizer call), "miss" (tokenized and stored) or "off"
    understood: Understood | None = None  # how the file was read (None for conversations given in code)

    def system_note(self) -> dict:
        """The system prompt the template adds (or --system-prompt sets), and its share of the tokens."""
        return self.renderer.system_note(self.conversations, sum(len(e) for e in self.examples))

    def notes(self) -> list[str]:
        """What a person should be told about how their data was read: format, field mapping, system prompt."""
        return [*(self.understood.lines() if self.understood else []), self.system_note()["line"]]

    def summary(self) -> str:
        s = self.report.summary()
        if self.load_skipped:
            s = f"{len(self.load_skipped)} invalid records skipped; " + s
        return s


def load(data: str | list[Conversation], format: str = "auto", fields: dict | None = None,
         on_invalid: str = "error", limit: int | None = None,
         roles: dict | None = None) -> tuple[list[Conversation], list[Problem]]:
    convs, skipped, _ = _load(data, format, fields, on_invalid, limit, roles)
    return convs, skipped


def _load(data, format, fields, on_invalid, limit, roles) -> tuple[list[Conversation], list[Problem],
                                                                    Understood | None]:
    if isinstance(data, (list, tuple)):
        return list(data)[:limit] if limit else list(data), [], None
    from .load import load_conversations

    res = load_conversations(data, format=format, fields=fields, on_invalid=on_invalid, roles=roles)
    convs = res.conversations
    return (convs[:limit] if limit else convs), res.skipped, res.understood


def prepare_examples(data: str | list[Conversation], tokenizer, spec: LossSpec, template: str | None = None,
                     max_length: int | None = None, truncation: str = "drop", format: str = "auto",
                     fields: dict | None = None, on_invalid: str = "error", limit: int | None = None,
                     cache: bool = True, roles: dict | None = None, system_prompt: str = "default") -> Prepared:
    """Data (a path/hub spec or conversations) -> tokenized, weighted examples. Tokenizes once, in one batch, or
    not at all when the cache holds these rendered texts for this tokenizer (cache=False: always tokenize)."""
    from .cache import encode_cached

    check_truncation(truncation)  # before any work
    convs, skipped, understood = _load(data, format, fields, on_invalid, limit, roles)
    renderer = Renderer(template, tokenizer, system_prompt)
    rendered = [renderer.render(c) for c in convs]
    with gc_paused():  # token lists, offsets and examples: millions of small objects, no reference cycles
        encoded, status = encode_cached(rendered, tokenizer, cache)
        examples, report = weigh(encoded, rendered, spec, max_length, truncation,
                                 on_empty="error" if on_invalid == "error" else "skip")
    return Prepared(examples, report, renderer, convs, rendered, skipped, status, understood)
