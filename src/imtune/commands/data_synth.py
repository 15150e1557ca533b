"""`imtune data synth --family F --n N --out FILE`: synthetic controlled data (imtune.data.synth) in the `messages`
format.

Writes the train split to FILE and, with --heldout H > 0, the held-out split next to it: `data.jsonl` ->
`data.heldout.jsonl` (any other name gets `.heldout.jsonl` appended). Prints both paths and the instruction/output
ratio reached, in words (the paper's convention)."""
from __future__ import annotations

from pathlib import Path

from imtune.console import say


def heldout_path(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix == ".jsonl":
        return out.with_suffix(".heldout.jsonl")
    return out.with_name(out.name + ".heldout.jsonl")


def add_arguments(p) -> None:
    from imtune.data.synth import FAMILIES

    p.add_argument("--family", required=True, metavar="F",
                   help="; ".join(f"{name}: {f.about} (default ratio {f.default_ratio:g})"
                                  for name, f in FAMILIES.items()))
    p.add_argument("--n", type=int, required=True, help="training examples")
    p.add_argument("--ratio", type=float, default=None,
                   help="target instruction/output length ratio in words; None: the family's default ratio")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same files")
    p.add_argument("--heldout", type=int, default=0, metavar="H", help="held-out examples, scored by exact match")
    p.add_argument("--out", required=True, metavar="FILE", help="train split (.jsonl); held-out: FILE.heldout.jsonl")


def run(args) -> int:
    from imtune import files
    from imtune.analysis.stats import dataset_stats
    from imtune.data.synth import family, synthesize, write_jsonl

    fam = family(args.family)
    for p in [args.out] + ([heldout_path(args.out)] if args.heldout else []):
        files.check_target(p)  # both before either is written
    train, heldout = synthesize(args.family, args.n, args.ratio, args.seed, args.heldout)
    target = fam.default_ratio if args.ratio is None else args.ratio
    out = write_jsonl(args.out, train, args.family, args.seed, "train")
    s = dataset_stats(train, unit="words")
    print(f"wrote {len(train):,} {args.family} train examples to {out}")
    if heldout:
        hp = write_jsonl(heldout_path(args.out), heldout, args.family, args.seed, "heldout")
        print(f"wrote {len(heldout):,} held-out examples to {hp} (score with imtune.evaluate.exact.exact_match)")
    print(f"instruction/output ratio (words): {s['ratio']:.3g} (target {target:g}); mean instruction "
          f"{s['instruction']['mean']:.1f} words, mean output {s['output']['mean']:.1f} words")
    if abs(s["ratio"] / target - 1) > 0.2:
        say(f"note: the {args.family} family cannot reach ratio {target:g}: its instructions have a floor (the "
            "task statement) and reverse a ceiling; the ratio above is the nearest it makes")
    return 0
