"""Templates: built-ins render exactly what their Jinja equivalents render, spans are exact, Jinja templates
(the model's own, user files) are located by sentinels, and bad templates get clear errors."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imtune.templates import TEMPLATES, Renderer
from imtune.types import Conversation, Message, UsageError, Where

from test_weights import SIMPLE, conversations


def spans_text(r):
    return [(r.text[s.start:s.end], s.cls, s.turn) for s in r.spans]


@pytest.mark.parametrize("name", list(TEMPLATES))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=conversations())
def test_builtin_builder_matches_its_jinja(tok, name, c):
    r = Renderer(name, tok)
    assert r.render(c).text == r._render_jinja([{"role": m.role, "content": m.content} for m in c.messages], False)
    prompt_msgs = c.messages[:-1]
    assert r.prompt(prompt_msgs) == r._render_jinja([{"role": m.role, "content": m.content} for m in prompt_msgs],
                                                    True)


@pytest.mark.parametrize("name", ["tulu", "chatml", "alpaca", "model"])
def test_spans_are_exact(tok, name):
    r = Renderer(name, tok).render(SIMPLE)
    assert spans_text(r) == [("Be brief.", "system", 0), ("What is 2+2?", "user", 1), ("4", "assistant", 2),
                             ("<|im_end|>", "eot", 2), ("And 3+3?", "user", 3), ("6, obviously.", "assistant", 4),
                             ("<|im_end|>", "eot", 4)]


def test_tulu_is_the_papers_format(tok):
    c = Conversation((Message("user", "Hi"), Message("assistant", "Hello!")))
    assert Renderer("tulu", tok).render(c).text == "<|user|>\nHi\n<|assistant|>\nHello!<|im_end|>\n"


def test_default_is_the_tokenizers_own_template(tok):
    assert Renderer(None, tok).name == "model"


def test_user_jinja_file_and_trimming_template(tok, tmp_path):
    # A Llama-2-like template: trims content and closes assistant turns with " " + eos.
    f = tmp_path / "llama2.jinja"
    f.write_text("{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] | trim + ' [/INST]' }}"
                 "{% else %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}")
    c = Conversation((Message("user", "  Hi there "), Message("assistant", "Hello! ")))
    r = Renderer(str(f), tok).render(c)
    assert r.text == "[INST] Hi there [/INST] Hello! <|im_end|>"
    assert spans_text(r) == [("Hi there", "user", 0), ("Hello!", "assistant", 1), ("<|im_end|>", "eot", 1)]


def test_template_that_rewrites_content_is_refused(tok, tmp_path):
    f = tmp_path / "upper.jinja"
    f.write_text("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    c = Conversation((Message("user", "hi"), Message("assistant", "yo")), Where("d.jsonl", 7, 6))
    with pytest.raises(UsageError, match=r"d.jsonl:7: template .* changes message content"):
        Renderer(str(f), tok).render(c)


def test_template_exception_names_the_record(tok, tmp_path):
    f = tmp_path / "strict.jinja"
    f.write_text("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                 "{% endif %}{{ m['content'] }}{% endfor %}")
    c = Conversation((Message("system", "s"), Message("user", "u"), Message("assistant", "a")), Where("d.jsonl", 3, 2))
    with pytest.raises(UsageError, match="d.jsonl:3: template .* cannot render this conversation: no system role"):
        Renderer(str(f), tok).render(c)


def test_unknown_template_lists_valid_ones(tok):
    with pytest.raises(UsageError, match="unknown template 'tuluu'; valid: tulu, chatml, alpaca, model"):
        Renderer("tuluu", tok)
    with pytest.raises(UsageError, match="template file not found"):
        Renderer("missing.jinja", tok)


# Hostile templates: each would loop for minutes or allocate hundreds of megabytes without the bounds.
HOSTILE = {
    "nested_loops": ("{% for m in messages %}\n{% for i in range(3000) %}{% for j in range(100000) %}{% endfor %}"
                     "{% endfor %}{% endfor %}", 2, "rendering took longer than 0.5 s"),
    "macro_fan_out": ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}\n\n{{ f(22) }}",
                      1, "rendering took longer than 0.5 s"),
    "string_multiplication": ("{{ messages[0]['content'] }}\n{{ 'x' * 300000000 }}", 2,
                              "produced more than 1000000 characters"),
    "list_multiplication": ("{{ ([messages] * 300000000) | length }}", 1, "produced more than 1000000 characters"),
    "doubling": ("{% set ns = namespace(s='ab') %}\n{% for i in range(28) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                 2, "produced more than 1000000 characters"),
    "format_width": ("{{ '%300000000s' % 'x' }}{{ '{:>300000000}'.format('x') }}", 1,
                     "produced more than 1000000 characters"),
    "padding_filter": ("{{ 'x' | center(300000000) }}", 1, "produced more than 1000000 characters"),
    "output_flood": ("{% for i in range(100) %}{% for j in range(1000) %}" + "x" * 100 + "{% endfor %}{% endfor %}",
                     None, "produced more than 1000000 characters"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_template_is_stopped_with_its_line(tok, tmp_path, monkeypatch, name):
    import tracemalloc

    from imtune import templates

    source, line, what = HOSTILE[name]
    monkeypatch.setattr(templates, "RENDER_SECONDS", 0.5)
    f = tmp_path / f"{name}.jinja"
    f.write_text(source)
    c = Conversation((Message("user", "hi"), Message("assistant", "yo")), Where("d.jsonl", 7, 6))
    r = Renderer(str(f), tok)
    where = f"{f}:{line}" if line else str(f)
    tracemalloc.start()
    try:
        with pytest.raises(UsageError) as e:
            r.render(c)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(e.value).startswith(f"{where}: {what}") and "(rendering d.jsonl:7)" in str(e.value)
    assert peak < 50 * 2**20  # never near the hundreds of megabytes asked for
    with pytest.raises(UsageError, match=what):  # generation prompts are bounded alike
        r.prompt(c.messages[:1])


def test_bounded_rendering_matches_transformers(tok):
    msgs = [{"role": m.role, "content": m.content} for m in SIMPLE.messages]
    r = Renderer("model", tok)
    assert r._render_jinja(msgs, False) == tok.apply_chat_template(msgs, tokenize=False)
    assert r._render_jinja(msgs[:2], True) == tok.apply_chat_template(msgs[:2], tokenize=False,
                                                                      add_generation_prompt=True)
