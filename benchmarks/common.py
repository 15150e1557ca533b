"""What every benchmark shares: the machine description, paired timing that alternates the sides, ratio statistics,
and running one measurement in a fresh subprocess (for peak memory and clean thread settings).

Every figure against a peer is a ratio of two timings taken in the same repeat, next to each other; the order of the
sides flips every repeat (A B, B A, A B, ...), so a slow drift in machine load falls on both sides alike. Reported as
min / median / max over the repeats.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The shared data folder beside the checkout; IMTUNE_SHARED_DATA points elsewhere (a GPU machine gets a copy).
SHARED = Path(os.environ.get("IMTUNE_SHARED_DATA") or ROOT.parent / "shared" / "data")
LIMA = SHARED / "train" / "lima.jsonl"
PY = sys.executable


# The default tokenizer's chat template with {% generation %} around each assistant content and its <|im_end|>.
# Renders exactly the same text as the original (asserted in check_same_work).
GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def lima_subset(name: str, max_length: int, pick) -> str:
    """A JSONL of the LIMA records that `pick(examples)` keeps (a set of record indices), from the examples whose
    rendering with the default template fits in max_length tokens; written once to the temp folder as `name`."""
    import tempfile

    out = Path(tempfile.gettempdir()) / name
    if out.exists():
        return str(out)
    from imtune.data.prepare import prepare_examples
    from imtune.data.weights import loss_spec

    keep = pick(prepare_examples(str(LIMA), fresh_tokenizer(), loss_spec("it"), max_length=max_length).examples)
    lines = [line for i, line in enumerate(LIMA.read_text(encoding="utf-8").splitlines()) if i in keep]
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return str(out)


def fresh_tokenizer(chat_template: str | None = None):
    """The default tokenizer, loaded anew (an empty BPE cache), optionally with another chat template."""
    from transformers import AutoTokenizer

    from imtune.model.models import default_dir, prepare_default

    prepare_default(verbose=False)
    tok = AutoTokenizer.from_pretrained(default_dir())
    tok.pad_token = tok.pad_token or tok.eos_token
    if chat_template:
        tok.chat_template = chat_template
    return tok


@dataclass(frozen=True)
class Spread:
    """min / median / max of a list of numbers."""

    values: tuple[float, ...]

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    def fmt(self, spec: str = ".2f", unit: str = "") -> str:
        return f"{self.median:{spec}}{unit} ({self.min:{spec}} – {self.max:{spec}})"

    def as_dict(self) -> dict:
        return {"min": self.min, "median": self.median, "max": self.max, "values": list(self.values)}


def alternate(sides: dict, repeats: int, setup=None) -> dict[str, list[float]]:
    """Time each side `repeats` times, alternating the order every repeat. sides: name -> fn(state) -> None, where
    state = setup(name) is built outside the timer (e.g. a freshly loaded tokenizer). Returns name -> seconds."""
    names = list(sides)
    out: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        for n in (names if i % 2 == 0 else names[::-1]):
            state = setup(n) if setup else None
            t = time.perf_counter()
            sides[n](state)
            out[n].append(time.perf_counter() - t)
    return out


def ratios(num: list[float], den: list[float]) -> Spread:
    """Per-repeat ratios num[i] / den[i] (paired: both taken in the same repeat)."""
    return Spread(tuple(a / b for a, b in zip(num, den)))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine() -> dict:
    import torch

    flags = cpu_flags()
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "isa": ", ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__, "gpu": torch.cuda.is_available(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for p in ("torch", "transformers", "tokenizers", "datasets", "accelerate", "trl", "numpy"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = "absent"
    return out


def load() -> tuple[float, float, float]:
    return os.getloadavg()


@contextmanager
def scratch(prefix: str):
    """A temporary directory this benchmark makes and removes when it is done: its runs write models (a
    preparation cache with the converted default model ~0.5 GB, the demo ~2.6 GB), which used to stay in /tmp."""
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_child(script: str, args: dict, timeout: float = 600, env: dict | None = None) -> dict:
    """Run `python benchmarks/<script> --child JSON` in a fresh process; it prints one JSON line last. Adds the
    child's peak resident memory (ru_maxrss of the child: Linux reports KiB) as peak_rss_mib."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    e = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", **(env or {})}
    p = subprocess.run([PY, str(Path(__file__).parent / script), "--child", json.dumps(args)], capture_output=True,
                       text=True, timeout=timeout, env=e, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{script} {args} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    # RUSAGE_CHILDREN's ru_maxrss is the max over all waited-for children, so only a child that set a new record
    # is measured exactly here; children report their own VmHWM too (preferred, see child_peak_rss_mib).
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out.setdefault("peak_rss_mib", (after / 1024) if after > before else None)
    return out


def child_peak_rss_mib() -> float:
    """This process's own peak resident set (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_main(fn) -> None:
    """Entry point of a benchmark script run by run_child: parse the JSON args, call fn(**args), print its JSON."""
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        out = fn(**json.loads(sys.argv[2]))
        out["child_peak_rss_mib"] = child_peak_rss_mib()
        print(json.dumps(out))
        sys.exit(0)
