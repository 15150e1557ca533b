"""Greedy answers kept per (weights, prompt, generation settings) in RUN/eval/answers.json: an evaluation repeated
with other settings (another --exact-match, --bleu-samples raised) does not generate again what the same weights
already answered.

    answers = Answers.of(RUN, model)        the answers RUN/eval/answers.json holds for these weights
    generate(..., answers=answers)          looks each prompt up first, generates the rest, then answers.save()

The weights are known by content (imtune.model.models.hash_weights: a retrained run, another seed or best/ never share
answers with final/). The settings are what decides a greedy answer besides the prompt text: max_new_tokens and the
stop tokens. Only greedy answers are kept (sampling is not a function of the prompt). An answer is the one the
model gave in the batch it was generated in; with other prompts beside it the padding differs and, in rare cases, so
could the last bits of a logit and with them a token: a cached answer is one the same weights gave, greedily."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from imtune import files
from imtune.model.models import hash_weights

FILE = Path("eval") / "answers.json"  # one JSON object: {"version": 1, "answers": [{"weights", "key", "output"}]}


class Answers:
    def __init__(self, run_dir: Path, weights: str, rows: list[dict]):
        self.run_dir, self.weights, self.rows = Path(run_dir), weights, rows
        self.known = {r["key"]: r["output"] for r in rows if r.get("weights") == weights}
        self.new = 0

    @classmethod
    def of(cls, run_dir: str | Path, model) -> Answers:
        h = hashlib.sha256()
        hash_weights(h, model)
        return cls(Path(run_dir), h.hexdigest()[:32], read_rows(Path(run_dir) / FILE))

    @staticmethod
    def key(prompt: str, settings: dict) -> str:
        return hashlib.sha256(json.dumps([settings, prompt], sort_keys=True).encode()).hexdigest()[:32]

    def get(self, prompt: str, settings: dict) -> str | None:
        return self.known.get(self.key(prompt, settings))

    def add(self, prompt: str, settings: dict, output: str) -> None:
        k = self.key(prompt, settings)
        if k not in self.known:
            self.known[k] = output
            self.rows.append({"weights": self.weights, "key": k, "output": output})
            self.new += 1

    def save(self) -> None:
        """Write the file again when answers were added (imtune.files: atomic, never through a link)."""
        if self.new:
            files.make_dirs(self.run_dir / FILE.parent, self.run_dir)
            files.write_json(self.run_dir / FILE, {"version": 1, "answers": self.rows}, self.run_dir, indent=None)
            self.new = 0


def read_rows(path: Path) -> list[dict]:
    """The file's answers; a damaged file (or entry) costs only its answers, which are generated again."""
    if path.is_symlink() or not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8")).get("answers")
    except (OSError, ValueError, AttributeError, RecursionError):
        return []
    return [r for r in rows if isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("weights", "key",
                                                                                                 "output"))] \
        if isinstance(rows, list) else []
