"""Evaluation of a model or run: the last stage of the flow.

- run.py    evaluate_run(RunDir) -> RunEval: a run's train and held-out loss and their gap, on its data read
            exactly as training read it (`imtune eval` and `imtune compare` both call it).
- loss.py   evaluate_loss: mean NLL / perplexity per token class (output = assistant+eot, instruction =
            user+system, and each class) and gap(): held-out − train, the paper's overfitting measure.
- bleu.py   generation_rows (answers for the prompts of a data set, with references) and memorisation_bleu:
            BLEU of greedy answers to training prompts against the training outputs (the paper's Table 2).
- judge.py  AlpacaEval 1.0 pairwise win rate judged by any OpenAI-compatible endpoint, both orders, cached.

Heavy imports (torch, transformers, sacrebleu) happen inside the functions that need them."""
from __future__ import annotations

from imtune.evaluate.bleu import bleu, generation_rows, memorisation_bleu, split_prompt
from imtune.evaluate.judge import head2head, judge_pairs, parse_ranking
from imtune.evaluate.loss import evaluate_loss, gap

__all__ = ["bleu", "evaluate_loss", "gap", "generation_rows", "head2head", "judge_pairs", "memorisation_bleu",
           "parse_ranking", "split_prompt"]
