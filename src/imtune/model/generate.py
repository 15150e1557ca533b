"""Batched generation with a run's chat template, stopping at end-of-turn.

`generate(model, tokenizer, renderer, prompts)` takes conversations (the messages before the answer) or raw strings
and returns the model's continuations, in order. Prompts are sorted by length and left-padded in batches; output is
cut at the first end-of-turn token or stop string (e.g. the next role tag) so no generation runs into a next turn."""
from __future__ import annotations

from dataclasses import dataclass

from imtune.data.templates import Renderer
from imtune.types import Message

# Text that starts a new turn in the built-in templates: generation stops there even if no eot token came.
STOP_STRINGS = ("<|user|>", "<|system|>", "<|assistant|>", "<|im_start|>", "### Instruction:", "### Response:")


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    batch_size: int = 8
    seed: int = 0


def prompt_text(renderer: Renderer, prompt: str | list[Message] | tuple[Message, ...]) -> str:
    if isinstance(prompt, str):
        return renderer.prompt([Message("user", prompt)])
    return renderer.prompt(list(prompt))


def stop_token_ids(tokenizer, renderer: Renderer) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for m in renderer.eot_markers:
        tid = tokenizer.convert_tokens_to_ids(m)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(ids)


def cut_at_stop(text: str, stops=STOP_STRINGS, eot_markers=()) -> str:
    cut = len(text)
    for s in (*stops, *eot_markers):
        i = text.find(s) if s else -1
        if i != -1:
            cut = min(cut, i)
    return text[:cut].strip()


def generate(model, tokenizer, renderer: Renderer, prompts: list, cfg: GenerationConfig = GenerationConfig(),
             raw: bool = False, progress: bool = False, answers=None) -> list[str]:
    """Continuations for `prompts` (each a str user message, a list of Messages, or with raw=True a ready prompt
    text). Greedy when cfg.temperature == 0. `answers` (imtune.evaluate.answers.Answers of this model): greedy answers
    already given are taken from it, new ones added and saved."""
    import torch

    texts = list(prompts) if raw else [prompt_text(renderer, p) for p in prompts]
    outputs: list[str] = [""] * len(texts)
    stops = stop_token_ids(tokenizer, renderer)
    kept = answers is not None and cfg.temperature == 0  # only greedy answers are a function of the prompt
    settings = {"max_new_tokens": cfg.max_new_tokens, "stops": stops, "eot": renderer.eot_markers}
    known = {i: answers.get(t, settings) for i, t in enumerate(texts)} if kept else {}
    known = {i: a for i, a in known.items() if a is not None}
    for i, a in known.items():
        outputs[i] = a
    order = sorted((i for i in range(len(texts)) if i not in known), key=lambda i: -len(texts[i]))
    device = next(model.parameters()).device
    pad_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    try:
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="generate", unit="batch")
        for idx in batches:
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            sample = cfg.temperature > 0
            if sample:  # transformers samples with the global RNG: seed it from our generator for reproducibility
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=sample,
                                     temperature=cfg.temperature if sample else None,
                                     top_p=cfg.top_p if sample else None, top_k=None,
                                     eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            for j, i in enumerate(idx):
                text = tokenizer.decode(new[j], skip_special_tokens=False)
                outputs[i] = cut_at_stop(text, STOP_STRINGS, renderer.eot_markers + [tokenizer.pad_token or ""])
    finally:
        tokenizer.padding_side = pad_side
        model.train(was_training)
    if kept:
        for i in order:
            answers.add(texts[i], settings, outputs[i])
        answers.save()
    return outputs
