"""Templates: built-ins render exactly what their Jinja equivalents render, spans are exact, Jinja templates
(the model's own, user files) are located by sentinels, and bad templates get clear errors."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from helpers import SIMPLE, conversations
from imtune.data.templates import TEMPLATES, Renderer
from imtune.types import Conversation, Message, UsageError, Where


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


def test_kept_skeletons_change_nothing(tok, tmp_path):
    """A Renderer keeps the skeleton (the template around sentinels) per role sequence. Whatever the template, each
    conversation renders as a fresh Renderer renders it — the same text and spans, or the same refusal — including a
    template whose text depends on the content (which the sentinels cannot show: refused) seen between ones it fits."""
    f = tmp_path / "looks.jinja"
    f.write_text("{% for m in messages %}{% if 'code' in m['content'] %}<code>{% endif %}{{ m['role'] }}: "
                 "{{ m['content'] }}\n{% endfor %}")
    plain = Conversation((Message("user", "say hi"), Message("assistant", "hi")))
    code = Conversation((Message("user", "write code"), Message("assistant", "print(1)")))
    other = Conversation((Message("system", "be brief"), Message("user", "and"), Message("assistant", "ok")))

    def outcome(r, c):
        try:
            got = r.render(c)
            return got.text, [(s.start, s.end, s.cls, s.turn) for s in got.spans]
        except UsageError as e:
            return str(e)

    for template in (str(f), "chatml", None):
        kept = Renderer(template, tok)
        for c in (plain, code, plain, other, code, other):
            assert outcome(kept, c) == outcome(Renderer(template, tok), c), (template, c)
    assert "changes message content" in outcome(Renderer(str(f), tok), code)
    assert outcome(Renderer(str(f), tok), plain)[0] == "user: say hi\nassistant: hi\n"


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

    from imtune.data import templates

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


ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


@pytest.mark.parametrize("record, prompt", [
    ({"instruction": "Add the numbers.", "input": "2 and 3\n\nplease", "output": "5"}, ALPACA_WITH_INPUT),
    ({"instruction": "Say hi.", "input": "", "output": "Hi!"}, ALPACA_NO_INPUT),
    ({"instruction": "Say hi.", "output": "Hi!"}, ALPACA_NO_INPUT)])
def test_alpaca_is_the_stanford_prompt_with_and_without_input(tok, record, prompt):
    from imtune.data.formats import to_conversation

    conv, problems = to_conversation(record, Where("a.json", 1), "alpaca", {})
    assert not problems
    r = Renderer("alpaca", tok)
    rendered = r.render(conv)
    assert rendered.text == prompt.format(**record) + record["output"] + tok.eos_token + "\n\n"
    expected = [(record["instruction"], "user", 0)] + ([(record["input"], "user", 0)] if record.get("input") else [])
    assert spans_text(rendered) == expected + [(record["output"], "assistant", 1), (tok.eos_token, "eot", 1)]
    assert r.prompt(conv.messages[:1]) == prompt.format(**record)
    # the Jinja saved with a run renders the same, given the input; a run's template is recognised as the built-in
    m = conv.messages[0]
    as_dict = {"role": "user", "content": m.content, **({"input": m.input} if m.input is not None else {})}
    assert r._render_jinja([as_dict], True) == prompt.format(**record)
    tok2 = tok.__class__.from_pretrained(tok.name_or_path)
    tok2.chat_template = r.jinja
    assert Renderer(None, tok2).render(conv).text == rendered.text


SMOL_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
PLAIN = Conversation((Message("user", "Hi"), Message("assistant", "Hello")))


def test_the_models_default_system_prompt_is_found(tok):
    r = Renderer(None, tok)
    assert r.injected == SMOL_DEFAULT
    assert r.render(PLAIN).text.startswith(f"<|im_start|>system\n{SMOL_DEFAULT}<|im_end|>\n")
    note = r.system_note([PLAIN], 100)
    assert note["tokens_each"] == 21 and note["share"] == 0.21 and "system prompt" in note["line"]
    assert Renderer("chatml", tok).injected is None


def test_system_prompt_none_leaves_the_default_out_and_serving_matches(tok):
    r = Renderer(None, tok, "none")
    text = r.render(PLAIN).text
    assert SMOL_DEFAULT not in text and text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi")
    tok2 = tok.__class__.from_pretrained(tok.name_or_path)
    tok2.chat_template = r.jinja  # what a run saves: requests without a system message render as training did
    assert tok2.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                    tokenize=False) == text
    assert Renderer("chatml", tok, "none").render(PLAIN).text == Renderer("chatml", tok).render(PLAIN).text


@pytest.mark.parametrize("template", [None, "chatml", "tulu"])
def test_system_prompt_text_is_a_system_message_and_records_keep_their_own(tok, template):
    hostile = "Be brief. {% raise %} {{ x }} #} %} '\" \\n"
    r = Renderer(template, tok, hostile)
    rendered = r.render(PLAIN)
    assert spans_text(rendered)[0] == (hostile, "system", 0)
    own = Conversation((Message("system", "Mine."), *PLAIN.messages))
    assert spans_text(r.render(own))[0] == ("Mine.", "system", 0)
    tok2 = tok.__class__.from_pretrained(tok.name_or_path)
    tok2.chat_template = r.jinja
    assert Renderer(None, tok2).render(PLAIN).text == rendered.text  # the saved template inserts the same text


def test_system_prompt_none_is_refused_when_the_template_cannot_leave_it_out(tok, tmp_path):
    f = tmp_path / "stubborn.jinja"
    f.write_text("{% for m in messages %}{% if loop.first and (m['role'] != 'system' or not m['content']) %}"
                 "{{ '<|im_start|>system\\nDEFAULT<|im_end|>\\n' }}{% endif %}{% if m['content'] %}"
                 "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}")
    assert Renderer(str(f), tok).injected == "DEFAULT"
    with pytest.raises(UsageError, match="--system-prompt none: template .* writes its default system prompt"):
        Renderer(str(f), tok, "none")
