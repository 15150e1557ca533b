"""Whether a chat template puts every message's content into its output verbatim, read from its syntax tree.

The Renderer (imtune.data.templates) learns a template's skeleton by rendering it around sentinel contents, and by
default renders every conversation a second time with its real contents to check that the skeleton with the contents
put back is exactly what the template renders. That check is needed only where the output could depend on the
contents other than by containing them. `contents_verbatim(jinja)` proves it cannot, for the plain templates most
models ship (SmolLM2's, ChatML-style ones), so the real render can be skipped: the text is the skeleton with the
contents put back, by construction. It says True only when all of these hold, else False (the check then runs):

- a message's content is read only as `m['content']` / `m.content` of a loop variable `m` of `{% for m in messages %}`
  (or of `messages[i]` with a constant i), and only as a direct part of an output `{{ ... }}`, joined by `+` or `~`
  alone (no filter, test, condition, call, `set`, macro, call or filter block, or `{% generation %}` around it);
- `messages` and its loop variables are used for nothing else than the loop, `messages|length`, and item or
  attribute reads with a constant key that is not a dict method (`role`, `tool_calls`, ...), which never reach the
  content; no name `messages` or loop variable is assigned; `loop` is read only for its counters and flags
  (`loop.nextitem`/`previtem` would reach another message);
- nothing in the template varies between renders (`strftime_now`, `lipsum`, `|random`) and no autoescape block.
tests/test_template_verbatim.py checks each refusal, and that texts are unchanged where it holds.
"""
from __future__ import annotations

from jinja2 import nodes

from imtune.data.template_bounds import reference_environment

_LOOP_FIELDS = frozenset({"index", "index0", "revindex", "revindex0", "first", "last", "length", "depth", "depth0"})
_VARYING_NAMES = frozenset({"strftime_now", "lipsum"})
_OUTPUT_PARENTS = (nodes.Template, nodes.For, nodes.If)  # where an output holding content may sit


def contents_verbatim(jinja: str) -> bool:
    """True when every message's content reaches the output of `jinja` unchanged and nothing else depends on it."""
    try:
        tree = reference_environment().parse(jinja)
    except Exception:  # a template that does not parse is rendered (and its error reported) the ordinary way
        return False
    try:
        return _proved(tree)
    except RecursionError:  # nested past the stack (a hostile template): rendered, and bounded, the ordinary way
        return False


def _proved(tree: nodes.Template) -> bool:
    loops = [f for f in tree.find_all(nodes.For) if _over_messages(f)]
    watched = {"messages"} | {f.target.name for f in loops}
    targets = {id(f.target) for f in loops}
    for n in tree.find_all(nodes.Name):
        if n.ctx in ("store", "param") and n.name in watched and id(n) not in targets:
            return False  # a loop variable or `messages` reassigned: its reads below prove nothing
    if any(True for _ in tree.find_all((nodes.EvalContextModifier, nodes.ScopedEvalContextModifier))):
        return False
    return _reads_ok(tree, [], watched)


def _over_messages(f: nodes.For) -> bool:
    return (isinstance(f.iter, nodes.Name) and f.iter.name == "messages" and isinstance(f.target, nodes.Name)
            and not f.recursive)


def _reads_ok(node: nodes.Node, parents: list[nodes.Node], watched: set[str]) -> bool:
    """Every read below `node` is one contents_verbatim allows (`parents`: the ancestors of `node`, outermost first)."""
    if isinstance(node, nodes.Name) and node.ctx == "load" and not _name_ok(node, parents, watched):
        return False
    if isinstance(node, (nodes.Filter, nodes.Test)) and node.name == "random":
        return False
    parents.append(node)
    try:
        return all(_reads_ok(child, parents, watched) for child in node.iter_child_nodes())
    finally:
        parents.pop()


def _name_ok(name: nodes.Name, parents: list[nodes.Node], watched: set[str]) -> bool:
    if name.name in _VARYING_NAMES:
        return False
    parent = parents[-1]
    if name.name == "loop":
        return isinstance(parent, nodes.Getattr) and parent.attr in _LOOP_FIELDS
    if name.name not in watched:
        return True
    if name.name == "messages":
        if isinstance(parent, nodes.For) and parent.iter is name:
            return True
        if isinstance(parent, nodes.Filter) and parent.node is name and parent.name == "length" and not parent.args:
            return True
        if not (isinstance(parent, nodes.Getitem) and parent.node is name and _constant_index(parent.arg)):
            return False
        return _message_read_ok(parent, parents[:-1])
    return _message_read_ok(name, parents)


def _constant_index(arg: nodes.Node) -> bool:
    if isinstance(arg, nodes.Neg):
        arg = arg.node
    return isinstance(arg, nodes.Const) and type(arg.value) is int


def _message_read_ok(message: nodes.Node, parents: list[nodes.Node]) -> bool:
    """`message` (one message) is read for a key: content only straight into an output, others only as values."""
    read = parents[-1]
    if isinstance(read, nodes.Getitem) and read.node is message and isinstance(read.arg, nodes.Const):
        key = read.arg.value
    elif isinstance(read, nodes.Getattr) and read.node is message:
        key = read.attr
    else:
        return False
    if not isinstance(key, str) or key.startswith("_") or hasattr(dict, key):
        return False  # m.get / m['items'] / m.values() would reach the content
    if key != "content":
        return True
    up = len(parents) - 2
    while up >= 0 and isinstance(parents[up], (nodes.Add, nodes.Concat)):
        up -= 1
    return (up >= 0 and isinstance(parents[up], nodes.Output)
            and all(isinstance(p, _OUTPUT_PARENTS) for p in parents[:up]))
