"""Record -> Conversation for every format: detection, field maps, role mapping, alpaca input joining."""
import pytest

from imtune.data.formats import CANONICAL_FIELDS, FORMATS, detect, to_conversation
from imtune.types import Where

HERE = Where("t.jsonl", 3, 2)


def convert(record, format, fields=None):
    conversation, problems = to_conversation(record, HERE, format, fields or {})
    assert not problems, [str(p) for p in problems]
    assert conversation.source == HERE
    return [(m.role, m.content) for m in conversation.messages]


def problems(record, format, fields=None):
    conversation, found = to_conversation(record, HERE, format, fields or {})
    assert conversation is None
    return [str(p) for p in found]


def test_registry_lists_the_four_formats():
    assert list(FORMATS) == ["messages", "sharegpt", "alpaca", "prompt_completion"]
    assert {"instruction", "input", "output", "prompt", "completion", "messages", "conversations",
            "role", "content", "from", "value", "system"} == set(CANONICAL_FIELDS)


def test_messages_multi_turn_keeps_order_system_anywhere_and_repeated_roles():
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "And?"},
        {"role": "user", "content": "Well?"},
        {"role": "system", "content": "Mid-way note."},
        {"role": "assistant", "content": "Bye", "name": "ignored extra key"},
        {"role": "user", "content": "ends on a user turn"},
    ]}
    assert convert(record, "messages") == [
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "And?"), ("user", "Well?"),
        ("system", "Mid-way note."), ("assistant", "Bye"), ("user", "ends on a user turn")]


def test_messages_as_json_text_in_a_cell():
    record = {"messages": '[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]'}
    assert convert(record, "messages") == [("user", "q"), ("assistant", "a")]


def test_sharegpt_roles_map_to_ours():
    record = {"conversations": [
        {"from": "system", "value": "sys"}, {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
        {"from": "user", "value": "q2"}, {"from": "assistant", "value": "a2"}]}
    assert convert(record, "sharegpt") == [
        ("system", "sys"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]


def test_sharegpt_unknown_role_lists_the_valid_ones():
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}
    assert problems(record, "sharegpt") == [
        "t.jsonl:3: conversations[1].from: unknown role 'bot'; use one of system, human, user, gpt, assistant; "
        "or map it with --role bot=ROLE (ROLE: user, assistant or system)"]


@pytest.mark.parametrize("extra, user", [
    ("ctx", "do it\n\nctx"),
    ("", "do it"),  # empty input: no separator
    ("  \n", "do it"),  # whitespace-only input counts as none
    (None, "do it"),  # null input
])
def test_alpaca_joins_a_non_empty_input_after_a_blank_line(extra, user):
    record = {"instruction": "do it", "output": "done"}
    if extra is not None or user:
        record["input"] = extra
    assert convert(record, "alpaca") == [("user", user), ("assistant", "done")]


def test_alpaca_without_input_key_and_with_system():
    assert convert({"instruction": "i", "output": "o", "system": "s"}, "alpaca") == [
        ("system", "s"), ("user", "i"), ("assistant", "o")]
    assert convert({"instruction": "i", "output": "o", "system": ""}, "alpaca") == [("user", "i"), ("assistant", "o")]


def test_prompt_completion():
    assert convert({"prompt": "p", "completion": "c"}, "prompt_completion") == [("user", "p"), ("assistant", "c")]


def test_field_map_applies_to_every_canonical_name_including_nested_ones():
    assert convert({"question": "q", "answer": "a"}, "prompt_completion",
                   {"prompt": "question", "completion": "answer"}) == [("user", "q"), ("assistant", "a")]
    assert convert({"instruction": "i", "context": "c", "response": "r"}, "alpaca",
                   {"input": "context", "output": "response"}) == [("user", "i\n\nc"), ("assistant", "r")]
    record = {"chat": [{"speaker": "user", "text": "q"}, {"speaker": "assistant", "text": "a"}]}
    assert convert(record, "messages", {"messages": "chat", "role": "speaker", "content": "text"}) == [
        ("user", "q"), ("assistant", "a")]
    record = {"turns": [{"who": "human", "says": "q"}, {"who": "gpt", "says": "a"}]}
    assert convert(record, "sharegpt", {"conversations": "turns", "from": "who", "value": "says"}) == [
        ("user", "q"), ("assistant", "a")]


def test_problems_name_the_key_the_record_actually_uses():
    assert problems({"instruction": "i", "response": ""}, "alpaca", {"output": "response"}) == [
        "t.jsonl:3: response: empty text; fill it in or remove the record"]
    assert problems({"instruction": "i"}, "alpaca") == [
        "t.jsonl:3: output: missing (format alpaca); the record has fields instruction; "
        "map one with --field output=NAME"]


@pytest.mark.parametrize("record, fields, expected", [
    ({"messages": [], "id": 1}, {}, "messages"),
    ({"conversations": []}, {}, "sharegpt"),
    ({"instruction": "", "input": "", "output": ""}, {}, "alpaca"),
    ({"prompt": "", "completion": ""}, {}, "prompt_completion"),
    ({"question": "", "answer": ""}, {"prompt": "question", "completion": "answer"}, "prompt_completion"),
    ({"instruction": "", "response": ""}, {"output": "response"}, "alpaca"),
    ({"chat": []}, {"messages": "chat"}, "messages"),
    ({"messages": [], "instruction": "", "output": ""}, {}, "messages"),  # registry order breaks ties
    ({"instruction": ""}, {}, None),  # alpaca needs output too
    ({"question": "", "answer": ""}, {}, None),
    ([1, 2], {}, None),
])
def test_detect_uses_the_identifying_fields_through_the_field_map(record, fields, expected):
    assert detect(record, fields) == expected


def test_messages_accept_sharegpt_role_names_and_turns():
    named = {"messages": [{"role": "system", "content": "s"}, {"role": "human", "content": "q"},
                          {"role": "gpt", "content": "a"}]}
    assert convert(named, "messages") == [("system", "s"), ("user", "q"), ("assistant", "a")]
    turns = {"messages": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert convert(turns, "messages") == [("user", "q"), ("assistant", "a")]


def test_role_map_adds_spellings():
    from imtune.data.formats import parse_roles

    roles = parse_roles(["bot=assistant, person=user", "narrator=system"])
    assert roles == {"bot": "assistant", "person": "user", "narrator": "system"}
    record = {"messages": [{"role": "narrator", "content": "n"}, {"role": "person", "content": "q"},
                           {"role": "bot", "content": "a"}]}
    conversation, found = to_conversation(record, HERE, "messages", {}, roles)
    assert not found and [m.role for m in conversation.messages] == ["system", "user", "assistant"]
    sharegpt = {"conversations": [{"from": "person", "value": "q"}, {"from": "bot", "value": "a"}]}
    conversation, found = to_conversation(sharegpt, HERE, "sharegpt", {}, roles)
    assert not found and [m.role for m in conversation.messages] == ["user", "assistant"]


@pytest.mark.parametrize("text, message", [("bot", "expected NAME=ROLE"), ("bot=robot", "ROLE one of system"),
                                           ("bot=user,bot=assistant", "mapped twice")])
def test_bad_role_maps_are_usage_errors(text, message):
    from imtune.data.formats import parse_roles
    from imtune.types import UsageError

    with pytest.raises(UsageError, match=message):
        parse_roles(text)


def test_what_was_understood_names_format_mapping_and_ignored_fields(tmp_path):
    import json

    from imtune.data.load import load_conversations

    rows = [{"instruction": "Sum", "input": "1 2", "output": "3", "response": "3", "id": 1},
            {"instruction": "Hi", "input": "", "output": "Hello", "response": "Hello there", "id": 2}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows))
    u = load_conversations(str(path)).understood
    assert u.line() == ("format: alpaca (detected) — instruction + input → user, output → assistant; "
                        "ignored fields: response, id")
    assert u.notes == ("response differs from output in 1 of the 2 records that have both; output was used and "
                       "response ignored (to train on response: --field output=response)",)
    u = load_conversations(str(path), format="alpaca", fields={"output": "response"}).understood
    assert u.line().startswith("format: alpaca (given) — instruction + input → user, response → assistant; "
                               "ignored fields: output")
    assert "leave out --field output=response" in u.notes[0]
    assert u.as_dict()["ignored_fields"] == ["output", "id"]


def test_understood_for_list_formats(tmp_path):
    import json

    from imtune.data.load import load_conversations

    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}],
                                "source": "x"}) + "\n")
    u = load_conversations(str(path), roles={"bot": "assistant"}).understood
    assert u.line() == ("format: messages (detected) — messages[].from/.value → one message each (human → user, "
                        "gpt → assistant); roles bot → assistant; ignored fields: source")
