"""Bounded Jinja rendering: a chat template (the model's own, or a user's file) is untrusted code.

`compile_bounded(jinja) -> BoundedTemplate`; `BoundedTemplate.render(limit_chars, seconds, **context) -> str`.
Jinja's sandbox (ImmutableSandboxedEnvironment, set up as transformers sets it up for apply_chat_template) already
keeps templates away from Python internals; it does not bound how long they run or how much they allocate. Here:

- **time**: every loop iteration (each `{% for %}` iterable is wrapped at compile time), every call (macros
  included) and every operator but `+` checks a deadline, so nested loops and recursion stop after `seconds` of
  this thread's CPU time (not wall time: on a loaded machine a 10 s wall deadline fired on an honest template at
  record 741,086 of a 1M-record file);
- **size**: `*` (str/list repetition), `**`, `+`, `%` (printf widths) and every call or filter are checked *before* they
  allocate (a repetition or width that would exceed the limit, `join` of too much) and `~`/`+` results after; the
  output is counted while it streams, so no string in a render exceeds about twice `limit_chars`;
- `range` keeps Jinja's sandbox limit (100,000 items); `lipsum` is removed.
Exceeding a bound raises TemplateLimit with the template line:
`TEMPLATE:LINE: rendering took longer than 5 s of CPU time`.
"""
from __future__ import annotations

import re
import threading
import time

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from imtune.types import UsageError

# Widths and precisions in printf-style (`%10.3f`) and str.format-style (`{:>10}`) format strings.
_WIDTHS = re.compile(r"%[-+ #0]*(\d*)(?:\.(\d+))?|\{[^{}]*?:[^{}]*?(\d+)(?:\.(\d+))?[^{}]*\}")


class TemplateLimit(UsageError):
    """A template ran too long or produced too much; `line` is the template line, when known."""

    def __init__(self, what: str, line: int | None = None):
        self.what, self.line = what, line
        super().__init__(what)


class _Budget(threading.local):
    deadline = float("inf")
    seconds = 0.0
    chars = 0


class _Bound(NodeTransformer):
    """Wrap every loop's iterable and every `~` concatenation in a call that checks the budget."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name("imtune_bounded_iter", "load"), [node.iter], [], None, None,
                               lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        return nodes.Call(nodes.Name("imtune_bounded_str", "load"), [node], [], None, None, lineno=node.lineno)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.budget = _Budget()
        self.globals.pop("lipsum", None)
        self.globals["imtune_bounded_iter"] = self._iterate
        self.globals["imtune_bounded_str"] = self._sized

    # -- the checks ----------------------------------------------------------------------------------------------
    def tick(self) -> None:
        if time.thread_time() > self.budget.deadline:
            raise TemplateLimit(f"rendering took longer than {self.budget.seconds:g} s of CPU time")

    def _too_big(self, n: int) -> None:
        if n > self.budget.chars:
            raise TemplateLimit(f"produced more than {self.budget.chars} characters")

    def _sized(self, value):
        if isinstance(value, (str, list, tuple, dict, bytes)):
            self._too_big(len(value))
        return value

    def _iterate(self, iterable):
        budget = self.budget
        for item in iterable:
            if time.thread_time() > budget.deadline:
                self.tick()
            yield item

    def _check_args(self, args, kwargs) -> None:
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool):
                self._too_big(abs(a))  # widths, counts, indents: each would allocate about that much

    def _check_format(self, fmt: str) -> None:
        for match in _WIDTHS.finditer(fmt):
            for digits in match.groups():
                if digits:
                    self._too_big(int(digits) if len(digits) < 19 else self.budget.chars + 1)

    # -- the sandbox's hooks ---------------------------------------------------------------------------------------
    def call_binop(self, context, operator, left, right):
        if operator == "+":  # the common case in chat templates: kept cheap (checked after, at most doubles)
            value = left + right
            if value.__class__ in (str, list) and len(value) > self.budget.chars:
                self._too_big(len(value))
            return value
        self.tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    self._too_big(len(seq) * max(n, 0))
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            self._too_big(int(right * abs(left).bit_length() / 3.3))  # about the digits of the result
        elif operator == "%" and isinstance(left, str):
            self._check_format(left)
        return self._sized(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        __self.tick()
        __self._check_args(args, kwargs)
        inner = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner, method = getattr(inner, "__self__", None), getattr(inner, "__name__", "")
        if isinstance(owner, str):  # what a str method would allocate, before it does
            if method in ("format", "format_map"):
                __self._check_format(owner)
            elif method == "join" and args:
                args = (list(args[0]), *args[1:])
                __self._too_big(sum(len(x) if isinstance(x, str) else 0 for x in args[0]))
            elif method == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
                __self._too_big(len(owner) + (len(owner) // max(len(args[0]), 1) + 1) * len(args[1]))
        return __self._sized(super().call(__context, __obj, *args, **kwargs))

    def _parse(self, source, name, filename):
        return _Bound().visit(super()._parse(source, name, filename))


def _bounded_filter(env: BoundedEnvironment, name: str, f):
    skip = 1 if hasattr(f, "jinja_pass_arg") else 0  # @pass_context and friends: the value is the second argument

    def bounded(*args, **kwargs):
        env.tick()
        env._check_args(args[skip + 1:], kwargs)
        value = args[skip] if len(args) > skip else None
        if name == "format" and isinstance(value, str):
            env._check_format(value)
        elif name == "join" and value is not None and not isinstance(value, str):
            value = list(value)
            env._too_big(sum(len(x) if isinstance(x, str) else 0 for x in value))
            args = (*args[:skip], value, *args[skip + 1:])
        return env._sized(f(*args, **kwargs))

    if hasattr(f, "jinja_pass_arg"):
        bounded.jinja_pass_arg = f.jinja_pass_arg
    return bounded


class BoundedTemplate:
    def __init__(self, env: BoundedEnvironment, template: jinja2.Template):
        self.env, self.template = env, template

    def render(self, limit_chars: int, seconds: float, **context) -> str:
        budget = self.env.budget
        budget.chars, budget.seconds, budget.deadline = limit_chars, seconds, time.thread_time() + seconds
        out, size = [], 0
        try:
            for piece in self.template.generate(**context):
                size += len(piece)
                if size > limit_chars:
                    self.env._too_big(size)
                out.append(piece)
        except TemplateLimit as e:
            raise TemplateLimit(e.what, _template_line(e)) from None
        except RecursionError:
            raise TemplateLimit("rendering recursed too deeply", None) from None
        finally:
            budget.deadline = float("inf")
        return "".join(out)


def _template_line(e: BaseException) -> int | None:
    """The template line where `e` was raised (Jinja rewrites tracebacks to name the template's lines)."""
    line, tb = None, e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def reference_environment() -> jinja2.Environment:
    """The environment transformers compiles chat templates in (its extensions, filters and globals), made once."""
    global _reference
    if _reference is None:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        _reference = _compile_jinja_template("").environment  # not a real template: its constant folding is unbounded
    return _reference


_reference = None


def compile_bounded(jinja: str) -> BoundedTemplate:
    """`jinja` compiled as transformers compiles chat templates (same extensions, filters and globals), bounded."""
    ref = reference_environment()
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                             extensions=[type(ext) for ext in ref.extensions.values()])
    for name, f in ref.filters.items():
        env.filters[name] = _bounded_filter(env, name, f)
    env.globals.update({k: v for k, v in ref.globals.items() if k != "lipsum"})
    return BoundedTemplate(env, env.from_string(jinja))
