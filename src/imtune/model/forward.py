"""Batch -> hidden states: the one forward pass of the decoder, for every caller.

Training (imtune.model.objective.Objective, and its KL reference pass) and evaluation (imtune.evaluate.loss) call
`hidden_states`; the loss (imtune.model.loss) turns its output into Σw·nll with `lm_head`'s weight, so full logits [B,
T, V] never exist. Keeping one function here is what keeps packed examples apart for every caller:

- Packed rows (attention_mask None, position_ids restarting at 0 per example, see imtune.data.pack): transformers splits
  a row into examples from position_ids. sdpa / eager / flex build a block-diagonal causal mask per row
  (masking_utils.find_packed_sequence_indices), so several rows are fine. The flash kernels (flash_attention_2/3/4,
  hub kernels such as kernels-community/flash-attn2: whatever transformers' is_flash_attention_requested calls
  flash) take varlen boundaries from position_ids ONLY for a batch of one row (_is_packed_sequence returns False
  for batch_size > 1): with several rows each row would be one causal sequence and its examples would attend to
  each other. So for flash the B rows are laid end to end as one row [1, B·T] (the same blocks: a padded tail
  restarts at 0 and is a block of its own) and the boundaries are handed over explicitly as cu_seq_lens_q/k and
  max_length_q/k (transformers' FlashAttentionKwargs, computed once per forward by its own
  prepare_fa_kwargs_from_position_ids instead of once per layer). tests/test_forward.py spies on the attention
  kernel and checks that every example sees only itself.
- use_cache=False always: a KV cache (llama's config says use_cache=True) makes transformers skip the packed-sequence
  detection, and attention would cross examples.
- Padded rows (attention_mask given) go as they are, for every kernel.
"""
from __future__ import annotations

import torch


def unwrap(model):
    """The *ForCausalLM inside DDP / peft wrappers (peft's LoRA layers stay injected, so they still run)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder(model):
    """The transformer body (embeddings -> final norm) of a causal LM, under any DDP / peft wrapper."""
    base = unwrap(model)
    return base.get_decoder() if hasattr(base, "get_decoder") else base.model


def lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of the output embedding; tied to the input embedding when the model ties."""
    head = unwrap(model).get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def embed(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings [B, T, H] of input_ids [B, T] (NEFTune adds its noise to these)."""
    return unwrap(model).get_input_embeddings()(input_ids)


def flat_for_attention(model) -> bool:
    """Whether packed rows must go end to end as one row: the model's attention kernel is a flash kind."""
    from transformers.utils.generic import is_flash_attention_requested

    return is_flash_attention_requested(unwrap(model).config)


def hidden_states(model, embeds: torch.Tensor, position_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final (post-norm) hidden states [B, T, H] of input embeddings embeds [B, T, H] (from `embed`), without logits.

    position_ids [B, T] restart at 0 for every example; attention_mask [B, T] for padded rows, None for packed ones.
    Calls the decoder (model.model for llama-likes) directly: a DDP wrapper's forward and peft methods that edit the
    inputs (prompt tuning) do not run; imtune.model.objective wraps the whole loss in one module for DDP/FSDP instead.
    Models whose *ForCausalLM.forward scales or softcaps logits (gemma2, cohere) are not covered."""
    B, T, H = embeds.shape
    kw = {}
    if attention_mask is None and B > 1 and flat_for_attention(model):
        from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

        embeds, position_ids = embeds.reshape(1, B * T, H), position_ids.reshape(1, B * T)
        (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids)
        kw = dict(cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=int(max_q), max_length_k=int(max_k))
    out = decoder(model)(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask,
                         use_cache=False, **kw)
    return out.last_hidden_state.reshape(B, T, -1)  # [B, T, H]


def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T] long: a batch-unique id per example (a new id wherever position_ids is 0, as collate makes
    them). A packed row's padded tail gets an id of its own; its weights are 0."""
    return (position_ids.reshape(-1) == 0).cumsum(0).reshape(position_ids.shape) - 1
