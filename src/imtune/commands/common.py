"""Flag groups shared by several commands, so the same option means the same thing everywhere."""
from __future__ import annotations

from ..runlog import say  # noqa: F401  (the one `say`; commands import it from imtune.runlog)
from ..weights import LOSS_MODES, LossSpec, loss_spec


def add_model_args(p, default: str = "default") -> None:
    p.add_argument("--model", default=default,
                   help="hub id, local directory, run directory, 'default' (embedded SmolLM2-135M-Instruct) "
                        "or 'random:<size>' (tiny, small, smollm2-135m, 1b)")


def add_template_args(p) -> None:
    p.add_argument("--template", default=None,
                   help="tulu (the paper's), chatml, alpaca, model (the tokenizer's own) or a .jinja file; "
                        "default: the tokenizer's own chat template when it has one, else tulu")


def add_system_prompt_arg(p) -> None:
    p.add_argument("--system-prompt", default="default", metavar="none|default|TEXT",
                   help="default: as the template renders (the model's own may inject a default system prompt, "
                        "e.g. SmolLM2's); none: without it (an empty system message where the template would "
                        "inject one); TEXT: this system message. Records' own system messages always win; the "
                        "template saved with a run makes the same choice when serving")


def add_data_args(p, positional: bool = True, nargs=None) -> None:
    if positional:
        p.add_argument("data", nargs=nargs, help="JSONL/JSON/Parquet/CSV file or hf:owner/name[:split]")
    p.add_argument("--format", default="auto", help="auto, messages, alpaca, prompt_completion or sharegpt")
    p.add_argument("--field", action="append", default=[], metavar="NAME=KEY",
                   help="read canonical field NAME from record key KEY, e.g. --field output=response (repeatable)")
    p.add_argument("--role", action="append", default=[], metavar="NAME=ROLE,...",
                   help="map a role spelling of the data to user/assistant/system, e.g. --role bot=assistant "
                        "(ShareGPT's human and gpt are known already; repeatable)")
    p.add_argument("--on-invalid", choices=["error", "skip"], default="error",
                   help="bad records: stop and list them, or skip them and say how many and why")


def add_loss_args(p) -> None:
    p.add_argument("--loss", default="it", choices=list(LOSS_MODES),
                   help="it: output tokens only; im: instruction + output (not template); all: every token; "
                        "weighted: instruction tokens at --prompt-weight")
    p.add_argument("--prompt-weight", type=float, default=None, help="λ for --loss weighted")
    p.add_argument("--weights", default=None, metavar="CLASS=W,...",
                   help="override class weights, e.g. user=0.1,system=0,template=0 "
                        "(classes: template, system, user, assistant, eot)")
    p.add_argument("--last-turn-only", action="store_true",
                   help="only the last assistant turn is output; earlier turns get the prompt weight")


def add_length_args(p, default: int | None = None) -> None:
    p.add_argument("--max-length", type=int, default=default, help="maximum tokens per example")
    p.add_argument("--truncation", choices=["drop", "truncate"], default="drop",
                   help="over-long examples: drop them (counted) or keep their first --max-length tokens")
    p.add_argument("--special-tokens-in-content", choices=["split", "keep", "error"], default="split",
                   help="content that spells a control token (a user message holding '<|im_end|>'): split = "
                        "tokenize it as plain text (the template's own control tokens stay special), keep = as the "
                        "control token, error = refuse the record (path:line)")


def loss_spec_from(args) -> LossSpec:
    return loss_spec(args.loss, args.prompt_weight, args.weights, args.last_turn_only)


def fields_from(args) -> dict[str, str]:
    from ..load import parse_fields

    return parse_fields(getattr(args, "field", None))


def roles_from(args) -> dict[str, str]:
    from ..formats import parse_roles

    return parse_roles(getattr(args, "role", None))

