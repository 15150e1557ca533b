"""What a comparison, a sweep and a study hand to their reports and terminal views, typed: their files as frozen
records.

    CompareResult   compare.json: settings, data, arms, evidence, verdict, versions, time, memory
      ArmResult       one arm: spec, name, overrides, its runs and their mean over seeds (`results`)
        RunResult       one seed's run: seed, run directory (relative to COMPARE_DIR), its scores (`results`)
      Evidence        the paired intervals (imtune.experiments.aggregate): reference arm, method, per measure:
        Measure         label, better, each arm's value and its difference to the reference (Interval), per seed
    SweepResult     sweep.json: per λ (SweepRow) the held-out loss final and best (Estimate), the Recommendation
    StudyResult     study.json: per value of the factor (StudyRow) the arms' difference (Estimate), the trends

`from_json(obj)` checks the shape of what it reads (the file may come from elsewhere: a file is hostile input) and
raises ValueError saying what is wrong; report.runs.read_record is the one reader of these files and adds the path.
`to_json()` gives back the object the file holds, key for key, so a written file reads back equal.
Modules: compare.py (compare.json), scores.py (a run's or an arm's Scores: Loss, BestScore, Bleu, ExactMatch,
BenchScore), grids.py (sweep.json, study.json).
"""

from imtune.results.compare import (
           VERSION,
           VERSIONS,
           ArmResult,
           CompareResult,
           Evidence,
           Interval,
           Measure,
           RunResult,
           Verdict,
)
from imtune.results.grids import Estimate, Recommendation, StudyResult, StudyRow, SweepResult, SweepRow
from imtune.results.scores import BenchScore, BestScore, Bleu, ExactMatch, Loss, Scores

__all__ = ["ArmResult", "BenchScore", "BestScore", "Bleu", "CompareResult", "Estimate", "Evidence", "ExactMatch",
           "Interval", "Loss", "Measure", "Recommendation", "RunResult", "Scores", "StudyResult", "StudyRow",
           "SweepResult", "SweepRow", "VERSION", "VERSIONS", "Verdict"]
