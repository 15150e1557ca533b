"""`imtune train [CONFIG.yaml] [--flags]`: one run directory (config, data stats, chat template, metrics,
checkpoints, final model). Every flag is a TrainConfig field (imtune.config); flags override CONFIG.yaml, which
overrides --preset. The plan (examples, tokens, steps, evaluations, estimated time and disk: imtune.train.cost) is
printed before the first step; `--dry-run` prints only that. Multi-GPU: `accelerate launch -m imtune.cli train ...` (see
configs/)."""
from __future__ import annotations

from imtune.config import add_train_arguments


def add_arguments(p) -> None:
    add_train_arguments(p)  # first: it SUPPRESSes the defaults of every action already added
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan of the run (examples, tokens, optimizer steps, evaluations) and its "
                        "estimated time and disk on this machine, then stop: no run directory is made")


def run(args) -> int:
    from imtune.config import TrainConfig
    from imtune.console import say
    from imtune.data.weights import loss_spec, weight_warnings
    from imtune.train.loop import dry_run, train

    cfg = TrainConfig.from_args(args)
    for w in weight_warnings(loss_spec(cfg.loss, cfg.prompt_weight, cfg.weights, cfg.last_turn_only)):
        say(w)
    if args.dry_run:
        say(dry_run(cfg).text())
        say("--dry-run: nothing trained, no run directory made")
        return 0
    path = train(cfg, plan=True)
    print(path)
    return 0
