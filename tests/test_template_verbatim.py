"""template_verbatim: a template is proved to put contents in verbatim only where nothing else reads them; where it
is, the Renderer skips the real render and its texts are still exactly what the template renders."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from helpers import conv, conversations
from imtune.data.template_verbatim import contents_verbatim
from imtune.data.templates import CHATML_JINJA, TULU_JINJA, Renderer

LOOP = "{% for m in messages %}X{% endfor %}"


def test_plain_templates_are_proved_verbatim(tok):
    assert contents_verbatim(tok.chat_template)  # SmolLM2's: messages[0]['role'], loop.first, + joins
    assert contents_verbatim(CHATML_JINJA) and contents_verbatim(TULU_JINJA)
    assert contents_verbatim("{% for m in messages %}{% if m.role == 'user' and loop.index0 < messages|length %}"
                             "{{ '<u>' ~ m.content ~ '</u>' }}{% else %}{{ m['content'] }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("body", [
    "{% if 'code' in m['content'] %}<code>{% endif %}{{ m['content'] }}",  # read in a condition
    "{{ m['content'] | trim }}",  # a filter
    "{{ m.content.upper() }}",  # a method
    "{{ m['content'][:10] }}",  # a slice
    "{{ m['content'] if loop.last else '' }}",  # a conditional expression
    "{% set c = m['content'] %}{{ c }}",  # assigned
    "{{ m.get('content') }}",  # a dict method reaches it
    "{% for k, v in m.items() %}{{ v }}{% endfor %}",
    "{% set key = 'content' %}{{ m[key] }}",  # a key not known from the text
    "{% with x = m %}{{ x.content | upper }}{% endwith %}",  # the message aliased
    "{% if loop.nextitem and 'x' in loop.nextitem['content'] %}N{% endif %}{{ m['content'] }}",  # another message
    "{% filter upper %}{{ m['content'] }}{% endfilter %}",  # a filter block around the output
    "{% autoescape true %}{{ m['content'] }}{% endautoescape %}",
    "{{ strftime_now('%d %b') }}{{ m['content'] }}",  # varies between renders
    "{{ [1, 2] | random }}{{ m['content'] }}",
])
def test_templates_that_could_change_content_are_not_proved(body):
    assert not contents_verbatim(LOOP.replace("X", body))


@pytest.mark.parametrize("jinja", [
    "{% macro show(x) %}{{ x.content }}{% endmacro %}{% for m in messages %}{{ show(m) }}{% endfor %}",
    "{% set out %}{% for m in messages %}{{ m['content'] }}{% endfor %}{% endset %}{{ out | upper }}",
    "{{ messages | tojson }}",
    "{% set messages = messages[1:] %}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    "{% for m in messages[1:] %}{{ m['content'] }}{% endfor %}",
    "{% for m in messages %}{% endfor %}{% for m in ['a'] %}{{ m }}{% endfor %}",  # the loop name reused
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] | trim }}{% endif %}",
    "{% for m in messages %}{{ m['content'] ",  # does not parse
    "{{ " + " + ".join(["'a'"] * 3000) + " }}",  # nested deeper than the syntax-tree walk can go: not proved, no error
])
def test_other_uses_of_the_messages_are_not_proved(jinja):
    assert not contents_verbatim(jinja)


def test_a_proved_template_renders_once_per_role_sequence(tok, monkeypatch):
    r = Renderer(None, tok)
    calls = []
    real = r._render_jinja
    monkeypatch.setattr(r, "_render_jinja", lambda *a: calls.append(a) or real(*a))
    texts = [r.render(c).text for c in (_conv("a", "b"), _conv("c", "d"), _conv("e", "f"))]
    assert len(calls) == 1  # the skeleton, not each conversation
    assert texts[1] == tok.apply_chat_template([{"role": "user", "content": "c"},
                                                {"role": "assistant", "content": "d"}], tokenize=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(c=conversations())
def test_a_proved_templates_texts_are_what_it_renders(tok, c):
    msgs = [{"role": m.role, "content": m.content} for m in c.messages]
    got = Renderer(None, tok).render(c)
    assert got.text == tok.apply_chat_template(msgs, tokenize=False)
    assert [got.text[s.start:s.end] for s in got.spans if s.cls != "eot"] == [m["content"] for m in msgs]


def _conv(user: str, assistant: str):
    return conv(("user", user), ("assistant", assistant))
