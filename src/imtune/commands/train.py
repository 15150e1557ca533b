"""`imtune train [CONFIG.yaml] [--flags]`: one run directory (config, data stats, chat template, metrics,
checkpoints, final model). Every flag is a TrainConfig field (imtune.config); flags override CONFIG.yaml, which
overrides --preset. Multi-GPU: `accelerate launch -m imtune.cli train ...` (see configs/)."""
from __future__ import annotations

from ..config import add_train_arguments


def add_arguments(p) -> None:
    add_train_arguments(p)


def run(args) -> int:
    from ..config import TrainConfig
    from ..runlog import say
    from ..train import train
    from ..weights import loss_spec, weight_warnings

    cfg = TrainConfig.from_args(args)
    for w in weight_warnings(loss_spec(cfg.loss, cfg.prompt_weight, cfg.weights, cfg.last_turn_only)):
        say(w)
    path = train(cfg)
    print(path)
    return 0
