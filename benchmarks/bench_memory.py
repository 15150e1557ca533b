"""Peak resident memory of one training step at sequence length 2048 with the 49,152-token vocabulary.

Both sides train one optimizer step on the same packed row of ~2048 real tokens (LIMA conversations, taken in file
order while they fit; one micro-batch of one packed row, padding-free on TRL's side) of the same random llama, loss
on assistant tokens. Each side runs in a fresh process. The process's high-water mark (VmHWM) is reset through
/proc/self/clear_refs right before the step, so `step_peak_mib` is the peak resident memory DURING the step (model,
optimizer state and everything else resident included); `process_peak_mib` is the whole process's peak.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import GENERATION_TEMPLATE, child_main, child_peak_rss_mib, fresh_tokenizer, lima_subset  # noqa: E402


def one_row(max_length: int) -> str:
    """A JSONL of the first LIMA conversations whose lengths sum to at most max_length (one packed row)."""
    def pick(examples) -> set[int]:
        keep, used = set(), 0
        for e in examples:
            if used + len(e) <= max_length:
                keep.add(e.source.index)
                used += len(e)
        return keep

    return lima_subset(f"imtune-bench-lima-row{max_length}.jsonl", max_length, pick)


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_imtune(model: str, data: str, max_length: int, threads: int, chunk_size: int = 1024,
               log_class_losses: bool = True) -> dict:
    import torch

    torch.set_num_threads(threads)
    from imtune.config import TrainConfig
    from imtune.train.loop import fit, setup

    cfg = TrainConfig(model=model, data=data, max_length=max_length, batch_size=1, max_steps=1, packing=True,
                      loss="it", output_dir=tempfile.mkdtemp(prefix="imtune-bench-mem-"), progress=False,
                      threads=threads, chunk_size=chunk_size, log_class_losses=log_class_losses)
    run = setup(cfg)
    tokens = sum(run.lengths)
    before = rss_mib()
    reset = reset_peak()
    fit(run)
    run.log.close()
    return {"side": "imtune", "tokens": tokens, "rss_before_mib": before, "step_peak_mib": child_peak_rss_mib(),
            "reset_ok": reset, "chunk_size": chunk_size}


def run_trl(model: str, data: str, max_length: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import datasets
    from trl import SFTConfig, SFTTrainer

    from imtune.model.models import load_model

    datasets.disable_progress_bars()
    records = [json.loads(line) for line in Path(data).read_text(encoding="utf-8").splitlines() if line.strip()]
    ds = datasets.Dataset.from_list([{"messages": r["messages"]} for r in records])
    net = load_model(model, dtype=torch.float32, seed=42, attn_implementation="sdpa")
    net.config.use_cache = False
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="trl-bench-mem-"), max_steps=1, per_device_train_batch_size=1,
                     max_length=max_length, packing=True, assistant_only_loss=True, learning_rate=2e-5,
                     save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=42, disable_tqdm=True,
                     logging_steps=1, dataloader_num_workers=0)
    trainer = SFTTrainer(model=net, args=args, train_dataset=ds, processing_class=fresh_tokenizer(GENERATION_TEMPLATE))
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    before = rss_mib()
    reset = reset_peak()
    trainer.train()
    return {"side": "trl", "tokens": tokens, "rows": len(trainer.train_dataset), "rss_before_mib": before,
            "step_peak_mib": child_peak_rss_mib(), "reset_ok": reset}


def main(side: str, **kw) -> dict:
    return run_imtune(**kw) if side == "imtune" else run_trl(**kw)


if __name__ == "__main__":
    child_main(main)
    a = json.loads(sys.argv[1])
    print(json.dumps(main(**a), indent=1))
