"""Advice on the loss mode for a data set, and the measurements behind it.

    the stats object (imtune.analysis.stats) ─▶ recommend ─▶ {mode, prompt_weight, reasons}

`recommend` keeps the IM paper's thresholds (RULE) and then says, for the data's ratio band, what imtune's own
measurements (EVIDENCE) found there: whether they agree with the advice, disagree, or decide nothing. A measurement is
cited only for data in the same ratio band (BANDS): one made on data unlike the user's is never offered as support.

EVIDENCE holds only runs on fair data: real data sets (../shared/data) and the fair synthetic families of
imtune.data.synth (every example's answer in its own instruction). Runs on `recall` (whose held-out answers only the
training instructions state) are an illustration, never evidence. Each entry names the exact command that reproduces
it; EVIDENCE.md has the tables, plots, machine and wall times.
"""
from __future__ import annotations

from dataclasses import dataclass

# The recommendation rule, all thresholds in one place (see `recommend`).
RULE = {
    "high_ratio": 0.5,  # instruction/output >= this: IM (Alpagasus-Dolly 0.64, Code Alpaca: largest IM gains)
    "low_ratio": 0.15,  # below this: IT (LIMA 0.094: IM gains small or negative)
    "small_n": 5000,  # between the two ratios: N <= this -> IM (few examples), else weighted
    "prompt_weight": 0.1,  # λ suggested for `weighted` (Huerta-Enochian & Ko 2024: 0.01–0.5 best on short outputs)
}
PRACTICAL = 0.02  # a difference below 2% of IT's loss decides nothing (as imtune.report.checks.PRACTICAL)
# The ratio bands of the rule (instruction/output in words): evidence speaks only for data in its own band.
BANDS = (("long outputs (ratio < 0.15)", 0.0, RULE["low_ratio"]),
         ("intermediate (0.15 <= ratio < 0.5)", RULE["low_ratio"], RULE["high_ratio"]),
         ("long instructions (ratio >= 0.5)", RULE["high_ratio"], float("inf")))


def band(ratio: float) -> str:
    return next(name for name, lo, hi in BANDS if lo <= ratio < hi)


@dataclass(frozen=True)
class Evidence:
    """One measured IM − IT comparison: held-out output loss (nats), final and best checkpoints, with 95% intervals
    (hierarchical paired bootstrap over seeds and examples, imtune.analysis.evidence)."""
    source: str  # what was measured: data, model, recipe, date
    command: str  # the exact `imtune ...` command that reproduces it
    data: str  # the data set: a file name under ../shared/data, or synth:FAMILY
    ratio_words: float  # instruction/output ratio of the training data, words (the paper's convention)
    n: int  # training examples
    seeds: int
    final: tuple[float, float, float]  # IM − IT (value, low, high), final models
    best: tuple[float, float, float]  # IM − IT at each run's best checkpoint (selected on validation data)
    it_final: float  # IT's held-out output loss, final (the scale of the difference)
    it_best: float  # IT's held-out output loss at its best checkpoints

    def verdict(self, which: str = "final") -> str | None:
        """'im' or 'it' when the interval excludes zero and the difference is at least PRACTICAL of IT's loss (the
        compare verdict's rule, imtune.report.checks), else None."""
        value, lo, hi = getattr(self, which)
        if abs(value) < PRACTICAL * getattr(self, "it_" + which):
            return None
        return "im" if hi < 0 else "it" if lo > 0 else None


DOLLY_N = ("imtune study --factor n --values 32,64 --data ../shared/data/train/alpagasus_dolly_3k.jsonl --limit 1000 "
           "--arms it,im --seeds 0,1,2 --model default --template chatml --max-length 512 --batch-size 2 --lr 1e-4 "
           "--epochs 3 --eval-every 6 --eval-train-sample 16 --threads 2 --no-progress --out dolly-n")
DOLLY_RATIO = ("imtune study --factor ratio --data ../shared/data/train/alpagasus_dolly_3k.jsonl --strata 2 --n 32 "
               "--heldout 36 --arms it,im --seeds 0,1,2 --model default --template chatml --max-length 512 "
               "--batch-size 2 --lr 1e-4 --epochs 3 --eval-every 6 --eval-train-sample 16 --threads 2 --no-progress "
               "--out dolly-ratio")
CODE_ALPACA = ("imtune compare --data ../shared/data/train/code_alpaca_2k.json --on-invalid skip --limit 102 "
               "--heldout-fraction 0.686 --arms it,im,weighted:0.1 --seeds 0,1,2 --model default --template chatml "
               "--batch-size 1 --max-length 512 --lr 1e-4 --epochs 3 --eval-every 6 --eval-train-sample 8 "
               "--bleu-samples 0 --keep none --threads 2 --no-progress --out code-alpaca")
GSM8K = ("imtune compare --data ../shared/data/train/gsm8k_train.jsonl --format alpaca --field instruction=question "
         "--field output=answer --limit 102 --heldout-fraction 0.686 --arms it,im --seeds 0,1,2 --model default "
         "--template chatml --batch-size 2 --max-length 512 --lr 1e-4 --epochs 3 --eval-every 7 --eval-train-sample 8 "
         "--bleu-samples 0 --keep none --threads 2 --no-progress --out gsm8k")
LIMA = ("imtune compare --data ../shared/data/train/lima.jsonl --truncation truncate --limit 102 "
        "--heldout-fraction 0.686 --arms it,im --seeds 0,1,2 --model default --template chatml --batch-size 4 "
        "--max-length 256 --lr 1e-4 --epochs 3 --eval-every 8 --eval-train-sample 8 --bleu-samples 0 --keep none "
        "--threads 2 --no-progress --out lima")
EVIDENCE: tuple[Evidence, ...] = (
    Evidence(source="the demo's comparison with 3 seeds: SmolLM2-135M-Instruct, fair synthetic 'lookup' data (every "
                    "answer in its own instruction; data: imtune data synth --family lookup --n 8 --ratio 30 --seed 0 "
                    "--heldout 44 --out synth/lookup.jsonl), 12 steps at lr 1.5e-4, 31 test examples (2026-12-07)",
             command="imtune compare --data synth/lookup.jsonl --eval-data synth/lookup.heldout.jsonl --arms it,im "
                     "--model default --template chatml --epochs 1.5 --lr 0.00015 --lr-schedule constant "
                     "--warmup-ratio 0 --no-packing --max-length 256 --batch-size 1 --eval-every 4 "
                     "--eval-train-sample 0 --bleu-samples 0 --exact-match 44 --max-new-tokens 8 --loss-samples 8 "
                     "--seeds 0,1,2 --out runs/demo3",
             data="synth:lookup", ratio_words=30.6, n=8, seeds=3,
             final=(-0.6817, -0.9663, -0.4176), best=(-0.3748, -0.8559, 0.0638), it_final=1.7192, it_best=1.3719),
    Evidence(source="imtune study --factor n, value 32: SmolLM2-135M-Instruct on AlpaGasus-Dolly 3k (first 1,000 "
                    "records, 100 held out: 30 validation, 70 test), 29 training examples, 3 epochs at lr 1e-4, "
                    "12 steps (2026-12-06)",
             command=DOLLY_N,
             data="alpagasus_dolly_3k.jsonl", ratio_words=0.58, n=29, seeds=3,
             final=(-0.0030, -0.0064, 0.0006), best=(-0.0058, -0.0128, 0.0002), it_final=2.4740, it_best=2.4701),
    Evidence(source="the same study, value 64: 61 training examples, 24 steps (2026-12-07); the final difference's "
                    "interval excludes zero but it is -0.19% of the loss (undecided by the 2% rule)",
             command=DOLLY_N,
             data="alpagasus_dolly_3k.jsonl", ratio_words=0.51, n=61, seeds=3,
             final=(-0.0047, -0.0093, -0.0004), best=(-0.0021, -0.0061, 0.0020), it_final=2.4655, it_best=2.4376),
    Evidence(source="imtune study --factor ratio, stratum 1 of 2 (per-example ratios 0.008-0.548; its 32 training "
                    "examples 0.158): SmolLM2-135M-Instruct on AlpaGasus-Dolly 3k, 31 training examples, 3 epochs at "
                    "lr 1e-4, 15 steps, 25 test examples (fewer than the verdict's 30) (2026-12-07)",
             command=DOLLY_RATIO,
             data="alpagasus_dolly_3k.jsonl", ratio_words=0.158, n=31, seeds=3,
             final=(-0.0019, -0.0066, 0.0030), best=(-0.0002, -0.0039, 0.0038), it_final=2.8320, it_best=2.8276),
    Evidence(source="the same study, stratum 2 of 2 (per-example ratios 0.548-220; its training examples 1.55): 28 "
                    "training examples, 9 steps, 25 test examples; every run still improving at its last evaluation "
                    "(a budget too short for the overfitting regime) (2026-12-07)",
             command=DOLLY_RATIO,
             data="alpagasus_dolly_3k.jsonl", ratio_words=1.55, n=28, seeds=3,
             final=(-0.0017, -0.0131, 0.0086), best=(-0.0034, -0.0135, 0.0059), it_final=1.6879, it_best=1.6896),
    Evidence(source="imtune compare on Code Alpaca 2k: SmolLM2-135M-Instruct, the first 102 records (70 held out: 21 "
                    "validation, 49 test), 32 training examples, 3 epochs at lr 1e-4, 18 steps; every run 1-2.4% past "
                    "its held-out minimum; the final difference's interval excludes zero but it is -1.6% of the loss "
                    "(undecided by the 2% rule) (2026-12-07)",
             command=CODE_ALPACA,
             data="code_alpaca_2k.json", ratio_words=0.73, n=32, seeds=3,
             final=(-0.0119, -0.0185, -0.0056), best=(-0.0070, -0.0148, 0.0015), it_final=0.7365, it_best=0.7210),
    Evidence(source="imtune compare on GSM8K train: SmolLM2-135M-Instruct, the first 102 records (70 held out: 21 "
                    "validation, 49 test), 32 training examples, 3 epochs at lr 1e-4, 21 steps; every run 0.6-3.2% "
                    "past its held-out minimum; the final difference's interval excludes zero but it is -1.1% of the "
                    "loss (undecided by the 2% rule) (2026-12-07)",
             command=GSM8K,
             data="gsm8k_train.jsonl", ratio_words=0.93, n=32, seeds=3,
             final=(-0.0103, -0.0159, -0.0052), best=(0.0025, -0.0062, 0.0100), it_final=0.9436, it_best=0.9231),
    Evidence(source="imtune compare on LIMA: SmolLM2-135M-Instruct, the first 102 records (70 held out: 21 "
                    "validation, 49 test), 31 training examples cut to 256 tokens, 3 epochs at lr 1e-4, 24 steps "
                    "(2026-12-07)",
             command=LIMA,
             data="lima.jsonl", ratio_words=0.172, n=31, seeds=3,
             final=(-0.0110, -0.0143, -0.0077), best=(-0.0087, -0.0120, -0.0052),
             it_final=2.9159, it_best=2.8990),
)


def evidence_for(ratio: float | None, mode: str) -> str:
    """One sentence: what imtune's measurements in this ratio band found, and whether that agrees with `mode`."""
    if ratio is None or ratio <= 0:
        return "no imtune measurement to check this advice against (the ratio is undefined)"
    here = band(ratio)
    near = [e for e in EVIDENCE if band(e.ratio_words) == here]
    if not near:
        where = "; ".join(f"{e.data} (ratio {e.ratio_words:.3g})" for e in EVIDENCE) or "none yet"
        return (f"no imtune measurement in this ratio band, {here} (measured on: {where}): the advice rests on the "
                "paper alone here")
    parts = []
    for e in near:
        found = {w: e.verdict(w) for w in ("final", "best")}
        said = []
        for which, v in found.items():
            val, lo, hi = getattr(e, which)
            verdict = ("agrees with this advice" if v == mode else "decides nothing (the interval includes zero, or "
                       f"the difference is below {PRACTICAL:.0%} of the loss)" if v is None
                       else f"disagrees with this advice (it favours {v})")
            scale = getattr(e, "it_" + which)
            said.append(f"{which} {val:+.3f} ({val / scale:+.1%}; 95% interval {lo:+.3f} to {hi:+.3f}) — {verdict}")
        parts.append(f"{e.data}, ratio {e.ratio_words:.3g}, N = {e.n}, {e.seeds} seeds: IM − IT held-out output "
                     f"loss " + "; ".join(said))
    return f"measured by imtune in this ratio band ({here}): " + " | ".join(parts)


def recommend(stats: dict) -> dict:
    """Advice on the loss mode from the instruction/output ratio in words (`ratio_words`, else `ratio`) and the
    number of examples N. RULE holds the numbers:

    - ratio >= RULE["high_ratio"] (0.5)                 -> `im`: instructions are long next to outputs, the regime
      where the IM paper found its largest gains (Alpagasus-Dolly, ratio 0.64; Code Alpaca);
    - ratio <  RULE["low_ratio"] (0.15)                 -> `it`: long outputs, where IM gained little or lost (LIMA,
      ratio 0.094); the instruction tokens are a small share of the loss anyway;
    - in between, N <= RULE["small_n"] (5,000)          -> `im`: few examples, IM's second factor (the
      Superficial Alignment Hypothesis setting: IM regularises against overfitting the few outputs);
    - in between, N >  RULE["small_n"]                  -> `weighted` with λ = RULE["prompt_weight"] (0.1):
      Huerta-Enochian & Ko (2024) found small prompt-loss weights (0.01–0.5) best on short-completion data.

    The rule is advice from two published results, not a guarantee: compare arms on your data (`imtune compare`)."""
    # The thresholds come from the paper's word counts, so the rule reads the ratio in words whatever the unit.
    ratio, n = stats.get("ratio_words", stats.get("ratio")), stats["n_examples"]
    unit = "words" if "ratio_words" in stats else stats.get("unit", "tokens")
    hi, lo, small = RULE["high_ratio"], RULE["low_ratio"], RULE["small_n"]
    r = "undefined (no output)" if ratio is None else f"{ratio:.3g}"
    few = n <= small
    n_text = f"N = {n:,} {'<=' if few else '>'} {small:,} ({'few' if few else 'many'} examples)"
    reasons = [f"instruction/output length ratio = {r} in {unit} (IM thresholds: >= {hi} im, < {lo} it)"
               + (f"; {stats['ratio']:.3g} in tokens" if stats.get("unit") == "tokens" and stats.get("ratio") else "")]
    if ratio is None or ratio >= hi:
        mode, weight = "im", None
        reasons.append("instructions are long relative to outputs: the IM paper's largest gains were on such data "
                       "(Alpagasus-Dolly ratio 0.64, Code Alpaca)")
    elif ratio < lo:
        mode, weight = "it", None
        reasons.append("outputs are long relative to instructions: on LIMA-like data (ratio 0.094) IM gained little "
                       "or lost; instruction tokens would add only a small share of the loss")
    elif few:
        mode, weight = "im", None
        reasons.append(n_text + ": IM helps most with few training examples (Superficial Alignment Hypothesis)")
    else:
        mode, weight = "weighted", RULE["prompt_weight"]
        reasons.append(n_text + f" and an intermediate ratio: a small prompt weight λ = {weight} "
                                "(Huerta-Enochian & Ko 2024 found 0.01–0.5 best for short-completion data)")
    share = stats.get("supervised_share")
    if share:
        su = stats.get("share_unit", "tokens")
        reasons.append(f"{su} carrying loss: it {share['it']:.1%}, im {share['im']:.1%}"
                       + (f" (IM trains on x{share['im'] / share['it']:.2f} as many)" if share["it"] else ""))
    reasons.append(evidence_for(ratio, mode))
    return {"mode": mode, "prompt_weight": weight, "reasons": reasons,
            "note": "advice from the instruction/output ratio and N, not a guarantee: compare arms on your data"}


