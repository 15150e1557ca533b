"""Flag groups shared by several commands, so the same option means the same thing everywhere. Flags that are also
TrainConfig fields take their help from the field (imtune.config), where it is written once."""
from __future__ import annotations

import argparse

from imtune.config import field_help
from imtune.console import say  # noqa: F401  (the one `say`; commands import it from imtune.rundir.log)
from imtune.data.weights import LOSS_MODES, LossSpec, loss_spec


class CommaList(argparse.Action):
    """A list flag that takes commas, spaces or both (`--seeds 0,1`, `--seeds 0 1`, `--prompt-weights 0.1, 0.5`) and
    stores one comma-separated string, as the commands parse it."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs="+", **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, ",".join(v.strip(",") for v in values if v.strip(",")))


def ray_plan(args):
    """--executor ray [--ray-address A] [--cpus-per-run C] [--gpus-per-run G] -> a RayPlan
    (imtune.experiments.ray_jobs);
    --executor local: None."""
    from imtune.experiments.ray_jobs import RayPlan
    from imtune.types import UsageError

    if args.executor == "local":
        if args.ray_address or args.gpus_per_run is not None or args.cpus_per_run is not None:
            raise UsageError("--ray-address, --gpus-per-run and --cpus-per-run are for --executor ray")
        return None
    return RayPlan(address=args.ray_address, cpus_per_run=1.0 if args.cpus_per_run is None else args.cpus_per_run,
                   gpus_per_run=0.0 if args.gpus_per_run is None else args.gpus_per_run)


def add_jobs_arg(p) -> None:
    """--jobs of compare, sweep and study (imtune.experiments.jobs), and the Ray executor's flags
    (imtune.experiments.ray_jobs)."""
    p.add_argument("--executor", choices=["local", "ray"], default="local", type=str.lower,
                   help="where the grid of runs trains: here (one after another, or --jobs side by side), or every "
                        "run a Ray task (--out must be on storage every node sees)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="--executor ray: a running cluster (auto, or HEAD:6379); default: a local Ray instance")
    p.add_argument("--cpus-per-run", type=float, default=None, metavar="C", help="--executor ray: CPUs per run (1)")
    p.add_argument("--gpus-per-run", type=float, default=None, metavar="G",
                   help="--executor ray: GPUs per run (0); Ray places the run and sets CUDA_VISIBLE_DEVICES")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N runs side by side, each in its own process with cores/N torch threads, output in "
                        "RUN/train.log (evaluations still run one after another); for machines where one run cannot "
                        "use every core (2-core CPU, 135M model: 166 s per pair of runs against ~205 s one after "
                        "another); 1: one after another")


def add_loss_samples_arg(p) -> None:
    """--loss-samples N|all (compare, sweep): the training examples whose final output loss is the train side of the
    gap."""
    def value(text: str) -> int | str:
        if text == "all":
            return text
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"expected a number >= 1 or 'all', not {text!r}")
        return int(text)

    p.add_argument("--loss-samples", type=value, default=None, metavar="N|all",
                   help="the train side of the gap: the final model's output loss on a fixed sample of N training "
                        "examples, or all of them, scored after training (default: the trainer's own fixed sample, "
                        "--eval-train-sample, as it scored it at the last step; no second pass)")


def add_grid_args(p, what: str = "the comparison") -> None:
    """--keep and --dry-run of compare, sweep and study."""
    p.add_argument("--keep", default="both", type=str.lower, choices=["final", "best", "both", "none"],
                   help="which models of each run stay on disk once it is evaluated: final/, best/ (the checkpoint "
                        "selected on validation; final/ when there is none), both, or none (metrics and evaluations "
                        "only; the report is the same). A re-run never retrains or re-evaluates a run for a removed "
                        "model (default: both)")
    p.add_argument("--dry-run", action="store_true",
                   help=f"print the plan of {what} (runs, examples, tokens, steps, evaluations, generations) and its "
                        "estimated time and disk on this machine, then stop before training")


def add_model_args(p, default: str = "default") -> None:
    p.add_argument("--model", default=default, help=field_help("model"))


def add_template_args(p) -> None:
    p.add_argument("--template", default=None, help=field_help("template"))


def add_system_prompt_arg(p) -> None:
    p.add_argument("--system-prompt", default="default", metavar="none|default|TEXT", help=field_help("system_prompt"))


def add_data_args(p, positional: bool = True, nargs=None) -> None:
    if positional:
        p.add_argument("data", nargs=nargs, help="JSONL/JSON/Parquet/CSV file or hf:owner/name[:split]")
    p.add_argument("--format", default="auto", help=field_help("format"))
    p.add_argument("--field", action="append", default=[], metavar="NAME=KEY[|KEY2]", help=field_help("fields"))
    p.add_argument("--role", action="append", default=[], metavar="NAME=ROLE,...", help=field_help("roles"))
    p.add_argument("--on-invalid", choices=["error", "skip"], default="error", help=field_help("on_invalid"))


def add_loss_args(p) -> None:
    p.add_argument("--loss", default="it", choices=list(LOSS_MODES), help=field_help("loss"))
    p.add_argument("--prompt-weight", type=float, default=None, help=field_help("prompt_weight"))
    p.add_argument("--weights", default=None, metavar="CLASS=W,...", help=field_help("weights"))
    p.add_argument("--last-turn-only", action="store_true", help=field_help("last_turn_only"))


def add_length_args(p, default: int | None = None) -> None:
    p.add_argument("--max-length", type=int, default=default, help=field_help("max_length"))
    p.add_argument("--truncation", choices=["drop", "truncate"], default="drop", help=field_help("truncation"))
    p.add_argument("--special-tokens-in-content", choices=["split", "keep", "error"], default="split",
                   help=field_help("special_tokens_in_content"))


def loss_spec_from(args) -> LossSpec:
    return loss_spec(args.loss, args.prompt_weight, args.weights, args.last_turn_only)


def fields_from(args) -> dict[str, str]:
    from imtune.data.load import parse_fields

    return parse_fields(getattr(args, "field", None))


def roles_from(args) -> dict[str, str]:
    from imtune.data.formats import parse_roles

    return parse_roles(getattr(args, "role", None))

