"""The lm-evaluation-harness bridge: run lm-eval tasks on a model and report lm-eval's own per-task metrics.

    imtune bench harness --model M --tasks mmlu,arc_challenge [--include-path DIR] [--limit N] [--num-fewshot K]

The model goes to `lm_eval.simple_evaluate` as `model="hf"` with `model_args` pointing at a local directory (a
directory, a run directory's final/, the converted default model from imtune.model.models.prepare_default()) or a hub
id;
a `random:<size>` model, and any model already loaded (the Python API), go as an `HFLM(pretrained=model)`. Tasks come
from lm-eval's registry plus the YAML files under `--include-path` (your own tasks: `dataset_path: json` with
`dataset_kwargs: {data_files: ...}` reads a local file). Tasks that fetch hub datasets need network access.

`--tasks paper` expands to PAPER_TASKS: the lm-eval tasks of the Instruction Modelling paper (Shi et al., 2024),
as grouped in the authors' results script (src/get_results_group.py in github.com/ZhengxiangShi/InstructionModelling,
their `sft_eval` group), by the paper's six categories:
  language understanding and knowledge: mmlu, piqa, openbookqa, hellaswag, lambada
  multilinguality:                      lambada_multilingual, gpt3_translation_benchmarks (WMT14/16 and others)
  commonsense reasoning:                wsc273, winogrande, ai2_arc, coqa
  math and coding:                      gsm8k_cot (HumanEval: `imtune bench humaneval`, not lm-eval)
  few-shot learning:                    bbh_cot_fewshot
  safety and helpfulness:               truthfulqa_mc2, toxigen, hendrycks_ethics
The paper reports one metric a task (acc_norm for piqa, openbookqa, hellaswag and ai2_arc, f1 for coqa, ter for
translation, exact_match for gsm8k_cot and bbh, acc otherwise); the result keeps every metric lm-eval returns.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from pathlib import Path

from imtune.model import models
from imtune.report.render import md_cell
from imtune.tasks import make_options, write_outputs
from imtune.types import UsageError

HEADLINE = None  # lm-eval tasks each report their own metrics: no single headline number

PAPER_TASKS: tuple[str, ...] = (
    "mmlu", "piqa", "openbookqa", "hellaswag", "lambada",
    "lambada_multilingual", "gpt3_translation_benchmarks",
    "wsc273", "winogrande", "ai2_arc", "coqa",
    "gsm8k_cot",
    "bbh_cot_fewshot",
    "truthfulqa_mc2", "toxigen", "hendrycks_ethics",
)
TASK_GROUPS: dict[str, tuple[str, ...]] = {"paper": PAPER_TASKS}


@dataclass(frozen=True)
class Options:
    tasks: tuple[str, ...] = ()
    """lm-eval task or group names, or `paper`"""
    include_path: str | None = None
    """a folder of extra task YAML files"""
    num_fewshot: int | None = None
    """few-shot examples (default: each task's own)"""
    batch_size: int = 8
    apply_chat_template: bool = False
    """format prompts with the tokenizer's chat template (lm-eval's option)"""


def expand(tasks: tuple[str, ...] | list[str]) -> list[str]:
    names: list[str] = []
    for t in tasks:
        for name in TASK_GROUPS.get(t, (t,)):
            if name not in names:
                names.append(name)
    return names


def label(opts: Options) -> str:
    return "harness-" + "+".join(opts.tasks)[:80]


def _lm_for(model, tokenizer, batch_size: int):
    """(model, model_args) for simple_evaluate: a local directory or hub id as "hf", anything else as an HFLM."""
    if isinstance(model, str):
        src = models.resolve(model)
        if src.kind == "default":
            return "hf", {"pretrained": str(models.prepare_default()), "dtype": "auto"}
        if src.kind in ("dir", "hub"):
            return "hf", {"pretrained": src.path, "dtype": "auto"}
        tokenizer = models.load_tokenizer(model)
        model = models.load_model(model)
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), None


def evaluate(model, opts: Options, limit: int | None = None, tokenizer=None) -> dict:
    """lm-eval's results for the tasks of `opts` on `model` (a spec string, or a loaded model with its tokenizer)."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if not opts.tasks:
        raise UsageError("harness: give --tasks, e.g. --tasks arc_challenge,mmlu (or --tasks paper)")
    if opts.include_path and not Path(opts.include_path).is_dir():
        raise UsageError(f"--include-path {opts.include_path}: no such folder")
    names = expand(opts.tasks)
    manager = None
    if opts.include_path:  # tasks all of your own: skip indexing lm-eval's ~15,000 built-in ones (seconds)
        manager = TaskManager(include_path=opts.include_path, include_defaults=False)
        if not set(names) <= set(manager.all_tasks):
            manager = None
    manager = manager or TaskManager(include_path=opts.include_path)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5)
            raise UsageError(f"harness: unknown lm-eval task {name!r}"
                             + (f"; did you mean {', '.join(close)}?" if close else "")
                             + " (lm-eval --tasks list shows them all; `paper` is the IM paper's set)")
    lm, model_args = _lm_for(model, tokenizer, opts.batch_size)
    return simple_evaluate(model=lm, model_args=model_args, tasks=names, num_fewshot=opts.num_fewshot,
                           batch_size=opts.batch_size, limit=limit, task_manager=manager, log_samples=False,
                           apply_chat_template=opts.apply_chat_template,
                           device="cuda" if torch.cuda.is_available() else "cpu")


def summarize(raw: dict, opts: Options, limit: int | None) -> dict:
    """{"benchmark": "harness", "n": samples evaluated, "tasks": {task: {metric: value}}, ...} from lm-eval's output."""
    tasks = {}
    for task, metrics in raw.get("results", {}).items():
        tasks[task] = {k: v for k, v in metrics.items() if "," in k and isinstance(v, (int, float))}  # metric,filter
    counts = {t: int(c.get("effective", c.get("original", 0))) for t, c in raw.get("n-samples", {}).items()}
    return {"benchmark": "harness", "label": label(opts), "n": sum(counts.values()), "tasks": tasks,
            "n_per_task": counts, "options": {**asdict(opts), "tasks": list(opts.tasks)}, "limit": limit}


def markdown_table(result: dict) -> str:
    lines = ["| task | metric | value | stderr |", "|---|---|---:|---:|"]
    for task, metrics in result["tasks"].items():
        for name, value in metrics.items():
            if "_stderr" in name:
                continue
            metric, _, filt = name.partition(",")
            err = metrics.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
            shown = f"{metric}" + (f" ({filt})" if filt and filt != "none" else "")
            cells = f"| {md_cell(task)} | {md_cell(shown)} | {value:.4f} |"
            lines.append(f"{cells} {err:.4f} |" if isinstance(err, (int, float)) else f"{cells} |")
    return "\n".join(lines) + "\n"


def run_benchmark(model, tokenizer=None, limit: int | None = None, out_dir: Path | str | None = None,
                  model_name: str | None = None, **options) -> dict:
    """Evaluate and, with out_dir, write LABEL.json and LABEL.md there."""
    opts = make_options("harness", options)
    result = summarize(evaluate(model, opts, limit, tokenizer), opts, limit)
    result["model"] = model_name or (model if isinstance(model, str) else
                                     getattr(model.config, "name_or_path", "") or type(model).__name__)
    if out_dir is not None:
        result["files"] = write_outputs(result, None, Path(out_dir), markdown_table(result))
    return result
