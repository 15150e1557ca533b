"""Generations against references, and memorisation as BLEU (the paper's Table 2 measure).

A conversation splits into a prompt (every message before the last assistant message) and a reference (that
message). `generation_rows` generates an answer for each prompt with the run's chat template; `bleu` scores
answers against references with sacrebleu (4-gram BLEU, 13a tokenisation): corpus BLEU and the mean of
sentence BLEUs. `memorisation_bleu` does both on the *training* conversations with greedy decoding: a model that
memorised its training outputs reproduces them, so higher BLEU = more memorisation."""
from __future__ import annotations

from dataclasses import replace

from imtune.model.generate import GenerationConfig, generate
from imtune.types import Conversation, Message


def split_prompt(conv: Conversation) -> tuple[tuple[Message, ...], str | None]:
    """(messages before the last assistant message, its content); no assistant message: (all messages, None)."""
    msgs = conv.messages
    for i in range(len(msgs) - 1, -1, -1):
        if msgs[i].role == "assistant":
            return msgs[:i], msgs[i].content
    return msgs, None


def instruction_of(prompt: tuple[Message, ...]) -> str:
    """The last user message of a prompt (what a judge is shown as the instruction)."""
    return next((m.content for m in reversed(prompt) if m.role == "user"), "")


def generation_rows(model, tokenizer, renderer, conversations: list[Conversation],
                    cfg: GenerationConfig = GenerationConfig(), limit: int | None = None,
                    progress: bool = False, answers=None) -> list[dict]:
    """One row per conversation: index, source, instruction, prompt (messages), output, reference (or None).
    `answers`: imtune.evaluate.answers.Answers of this model (greedy answers given before are not generated again)."""
    convs = list(conversations)[:limit] if limit else list(conversations)
    convs = [c for c in convs if any(m.role == "user" for m in split_prompt(c)[0])]
    splits = [split_prompt(c) for c in convs]
    outputs = generate(model, tokenizer, renderer, [p for p, _ in splits], cfg, progress=progress, answers=answers)
    return [{"index": c.source.index, "source": str(c.source), "instruction": instruction_of(p),
             "prompt": [{"role": m.role, "content": m.content} for m in p], "output": out, "reference": ref}
            for c, (p, ref), out in zip(convs, splits, outputs)]


def bleu(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU and mean sentence BLEU (0-100) of hypotheses against one reference each."""
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return {"n": 0, "corpus_bleu": None, "sentence_bleu_mean": None, "sentence_bleu": [], "signature": ""}
    metric = BLEU(max_ngram_order=4)
    corpus = metric.corpus_score(hypotheses, [references])
    sentence = BLEU(max_ngram_order=4, effective_order=True)
    scores = [sentence.sentence_score(h, [r]).score for h, r in zip(hypotheses, references)]
    return {"n": len(hypotheses), "corpus_bleu": corpus.score, "sentence_bleu_mean": sum(scores) / len(scores),
            "sentence_bleu": scores, "signature": str(metric.get_signature())}


def memorisation_bleu(model, tokenizer, renderer, conversations: list[Conversation], limit: int | None = None,
                      gen_cfg: GenerationConfig = GenerationConfig(), progress: bool = False, answers=None) -> dict:
    """BLEU of greedy generations for training prompts against the training outputs.

    Returns {"n", "corpus_bleu", "sentence_bleu_mean", "sentence_bleu", "signature", "rows"} (rows: what
    `generation_rows` gives, each with its sentence BLEU)."""
    cfg = replace(gen_cfg, temperature=0.0)  # memorisation is measured on the model's most likely answer
    rows = [r for r in generation_rows(model, tokenizer, renderer, conversations, cfg, limit, progress, answers)
            if r["reference"] is not None]
    result = bleu([r["output"] for r in rows], [r["reference"] for r in rows])
    for r, s in zip(rows, result["sentence_bleu"]):
        r["bleu"] = s
    result["rows"] = rows
    return result
