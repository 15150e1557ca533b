"""What imtune runs inside each sandbox: `python -I -S -c <this file's source>`, started by imtune.tasks.sandbox.
Standard library only. Its stdin holds {"role", "fds", "rlimits", "parts", ...} in marshal format (built in, so
nothing is imported to read it). Each role sets its rlimits, marks its descriptors close-on-exec, then runs sources:

  program   untrusted parts in order; after the last returns, copy the token from its pipe to the result pipe.
            A pass means only "the program returned": code that also checks itself can forge that, so trusted
            checks of model code go through the next two roles instead.
  function  the model's side of a checked run: run its parts, say "ready" (or why not), then answer calls to the
            function NAME, one per line, until the calls end. It holds its two pipes and nothing else of ours.
  check     the trusted side: run the setup parts (HumanEval: prompt, test) while the function loads, wait for its
            "ready", bind NAME to a proxy of the function, run the check; only if it returns, copy the token.

What crosses between function and check is one line of ASCII each way, a Python literal: the call is
`(args, kwargs)`, the reply `("ready",)`, `("ok", value)` or `("raised", class name, message)`. `literal` writes
values as such text, `parse` reads it back with ast.literal_eval and refuses anything but exact bool, int, float, str,
None and list/tuple/dict/set of them, so the checker only ever compares real builtins: no object with a custom __eq__,
__sub__ or __bool__, no str subclass, nothing that runs code when touched. On the function's side, subclasses of those
types (Counter, namedtuple, IntEnum) are written as their plain value and anything else is refused with a TypeError
that names it; that side is the model's and may send anything, so only `parse` in the checker is the boundary.
Infinite floats travel as 1e999; NaN cannot (no literal writes it). Arguments cross the same way, so the function
gets copies: what it changes in place the checker does not see, and a check that passes it anything but a literal
(a function, say) fails with a TypeError.

An exception raised by the function reaches the checker as the same builtin exception class with its message (a test
that expects ValueError still sees one). A class of the model's own, BaseException such as SystemExit, and
StopIteration / StopAsyncIteration arrive as FunctionError: the last two would otherwise end an iteration silently in
the checker (`all(map(candidate, cases))` would hold). A function that ends, closes its pipe or sends something
unreadable or too long raises FunctionError at the call.
"""
import ast
import builtins
import marshal
import os
import resource
import sys

LIMIT = 8 * 2**20  # bytes: the longest line either side reads
ALLOWED = "bool, int, float, str, None, and list, tuple, dict and set of them"


class FunctionError(Exception):
    """In the checker: the function failed in a way no builtin exception class names."""


def literal(value) -> str:
    """`value` as the ASCII text of a Python literal of plain builtins; a TypeError for anything else."""
    if value is None or value is True or value is False:
        return repr(value)
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        text = float.__repr__(value)
        if text == "nan":
            raise TypeError("NaN cannot be sent (no literal writes it)")
        return {"inf": "1e999", "-inf": "-1e999"}.get(text, text)
    if isinstance(value, str):
        return ascii(str.__str__(value))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in dict.items(value)) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if isinstance(value, tuple):
        items = [literal(v) for v in value]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if isinstance(value, set):
        return "{" + ", ".join(literal(v) for v in value) + "}" if value else "set()"
    raise TypeError(f"a value of type {type(value).__name__} cannot be sent: only {ALLOWED}")


def parse(text: str):
    """The value of the literal `text`, which came from the other process: ast.literal_eval runs no code, and a
    TypeError if anything in the value is not of an exact allowed type."""
    value = ast.literal_eval(text)
    todo = [value]
    while todo:
        item = todo.pop()
        kind = type(item)
        if kind in (list, tuple, set):
            todo.extend(item)
        elif kind is dict:
            todo.extend(item)
            todo.extend(item.values())
        elif kind not in (bool, int, float, str, type(None)):
            raise TypeError(f"a value of type {kind.__name__} cannot be received: only {ALLOWED}")
    return value


def send(file, message) -> None:
    file.write(literal(message).encode("ascii") + b"\n")
    file.flush()


def receive(file):
    """The next message on `file`, parsed; FunctionError if it ended, is too long or is not a literal."""
    line = file.readline(LIMIT + 1)
    if not line.endswith(b"\n"):
        raise FunctionError("the reply is too long" if len(line) > LIMIT
                            else "the function's process ended before it replied")
    try:
        return parse(line.decode("ascii"))
    except Exception as e:
        raise FunctionError(f"an unreadable reply ({type(e).__name__}: {e})"[:500]) from None


def raised(error: BaseException) -> tuple[str, str, str]:
    try:
        text = str(error)
    except BaseException:
        text = "?"
    return "raised", str(type(error).__name__), text[:1000]


def as_exception(name: str, text: str) -> Exception:
    """In the checker: the exception the function raised, as the builtin class of that name where it is an ordinary
    Exception, else FunctionError."""
    cls = getattr(builtins, name, None)
    if (isinstance(cls, type) and issubclass(cls, Exception)
            and not issubclass(cls, (StopIteration, StopAsyncIteration))):
        try:
            return cls(text)
        except Exception:
            pass
    return FunctionError(f"{name}: {text}")


def answer(message):
    """In the checker: the value of a reply to a call, or the exception it reports."""
    if type(message) is tuple and len(message) == 2 and message[0] == "ok":
        return message[1]
    if (type(message) is tuple and len(message) == 3 and message[0] == "raised"
            and type(message[1]) is str and type(message[2]) is str):
        raise as_exception(message[1], message[2])
    raise FunctionError("a reply that is neither a value nor an exception")


def proxy(calls, replies):
    """In the checker: a function whose calls run in the function's process."""
    def candidate(*args, **kwargs):
        send(calls, (args, kwargs))
        return answer(receive(replies))
    return candidate


def run(parts, namespace, label: str) -> None:
    for i, source in enumerate(parts):
        exec(compile(source, f"<{label} part {i}>", "exec"), namespace)


def serve(source: dict, calls, replies) -> None:
    """The function role, after its limits are set: load, say ready, answer calls until they end."""
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        run(source["parts"], namespace, "program")
        if source["name"] not in namespace:
            raise NameError(f"name {source['name']!r} is not defined")
        function = namespace[source["name"]]
        send(replies, ("ready",))
    except BaseException as e:
        send(replies, raised(e))
        os._exit(1)
    while True:
        line = calls.readline(LIMIT + 1)
        if not line.endswith(b"\n"):
            os._exit(0)
        args, kwargs = parse(line.decode("ascii"))
        try:
            text = literal(("ok", function(*args, **kwargs)))
        except BaseException as e:
            text = literal(raised(e))
        replies.write(text.encode("ascii") + b"\n")
        replies.flush()


def check(source: dict, calls, replies) -> None:
    """The check role, after its limits are set: returns only if the check passed."""
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    run(source["parts"], namespace, "test")
    hello = receive(replies)
    if hello != ("ready",):
        answer(hello)  # raises what the function's loading raised
        raise FunctionError("the function did not say it was ready")
    namespace[source["name"]] = proxy(calls, replies)
    run([source["check"]], namespace, "check")


def main(job: dict) -> None:
    """Run one role as `job` says (role, fds, rlimits, its sources); the token moves only if the role returned."""
    read, write, exit_ = os.read, os.write, os._exit  # taken before any untrusted code runs (program role)
    for fd in job["fds"]:
        os.set_inheritable(fd, False)
    for name, value in job["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    try:
        if job["role"] == "function":
            calls, replies = job["fds"]
            serve(job, os.fdopen(calls, "rb"), os.fdopen(replies, "wb"))  # does not return
        elif job["role"] == "check":
            token_fd, result_fd, calls, replies = job["fds"]
            check(job, os.fdopen(calls, "wb"), os.fdopen(replies, "rb"))
        else:
            token_fd, result_fd = job["fds"]
            run(job["parts"], {"__name__": "__main__", "__builtins__": builtins}, "program")
    except BaseException as e:
        try:
            _, name, text = raised(e)
            sys.stderr.write(f"{name}: {text}".replace("\n", " ") + "\n")
            sys.stderr.flush()
        finally:
            exit_(1)
    write(result_fd, read(token_fd, 64))
    exit_(0)


if __name__ == "__main__":
    main(marshal.loads(sys.stdin.buffer.read()))
