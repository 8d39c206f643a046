"""Hugging Face transformers -> ONNX: the torch dynamo exporter on a wrapper that returns the
model's main output (logits, else last_hidden_state), with dynamic batch and sequence axes.

Tokenization stays in Python: the tokenizer is saved beside ``model.onnx`` (``tokenizer/``)."""
from __future__ import annotations

import os

import numpy as np

from .._deps import need
from ._common import UnsupportedModel
from .torch import export_module

MODEL_DIR = "model"


def model_dir(src: str) -> str:
    d = os.path.join(src, MODEL_DIR)
    return d if os.path.isdir(d) else src


def load(src: str):
    need("torch", "torch", "exporting a transformers checkpoint")
    transformers = need("transformers", "hf", "exporting a transformers checkpoint")
    d = model_dir(src)
    config = transformers.AutoConfig.from_pretrained(d, local_files_only=True)
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel
    model = cls.from_pretrained(d, local_files_only=True).eval()
    tokenizer = None
    if any(os.path.exists(os.path.join(d, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(d, local_files_only=True)
    return model, tokenizer


def inputs_of(model) -> list[str]:
    import inspect
    params = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in params and getattr(model.config, "type_vocab_size", 0):
        names.append("token_type_ids")
    return names


def _wrapper(model, names):
    torch = need("torch", "torch")

    class Main(torch.nn.Module):
        """Takes the token tensors positionally and returns one tensor (ONNX outputs are tensors)."""

        def __init__(self):
            super().__init__()
            self.model = model

        def main(self, tensors):
            out = self.model(**dict(zip(names, tensors)), return_dict=True)
            for key in ("logits", "last_hidden_state"):
                if key in out and out[key] is not None:
                    return out[key]
            return next(iter(out.values()))

    # torch.export matches dynamic_shapes to named parameters, so no *args here
    class Two(Main):
        def forward(self, input_ids, attention_mask):
            return self.main((input_ids, attention_mask))

    class Three(Main):
        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.main((input_ids, attention_mask, token_type_ids))

    return (Three if len(names) == 3 else Two)().eval()


def main_output_name(model) -> str:
    return "logits" if type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification",
                                                      "ForMaskedLM", "ForCausalLM", "ForMultipleChoice")) \
        else "last_hidden_state"


def tokenize(tokenizer, texts, names):
    enc = tokenizer(list(texts), padding=True, truncation=True, return_tensors="np")
    return {n: np.asarray(enc[n], dtype=np.int64) if n in enc else np.zeros_like(enc["input_ids"], dtype=np.int64)
            for n in names}


def convert(src: str, sample, opset: int | None):
    """(onnx model, native(feeds) -> {output: array}, the sample's feeds, tokenizer)."""
    torch = need("torch", "torch")
    model, tokenizer = load(src)
    names = inputs_of(model)
    if sample is None:
        rng = np.random.default_rng(0)
        vocab = int(getattr(model.config, "vocab_size", 100))
        ids = rng.integers(0, vocab, size=(3, 9), dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        feeds["attention_mask"][0, -3:] = 0
        if "token_type_ids" in names:
            feeds["token_type_ids"] = np.zeros_like(ids)
    elif isinstance(sample, dict):
        feeds = {n: np.asarray(sample[n], dtype=np.int64) for n in names if n in sample}
        if "attention_mask" not in feeds:
            feeds["attention_mask"] = np.ones_like(feeds["input_ids"])
        if "token_type_ids" in names and "token_type_ids" not in feeds:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    else:
        if tokenizer is None:
            raise UnsupportedModel("sample= holds texts but this checkpoint has no tokenizer: pass token ids "
                                   "as {'input_ids': ..., 'attention_mask': ...}")
        feeds = tokenize(tokenizer, sample, names)
    wrapped = _wrapper(model, names)
    batch = torch.export.Dim("batch", min=1)
    limit = int(getattr(model.config, "max_position_embeddings", 512) or 512)
    seq = torch.export.Dim("sequence", min=1, max=limit)
    # trace with a shape unlike the sample's so nothing specialises on it
    trace = tuple(torch.ones(2, 7, dtype=torch.int64) for _ in names)
    out_name = main_output_name(model)
    proto = export_module(wrapped, trace, tuple({0: batch, 1: seq} for _ in names), names, [out_name], opset,
                          f"the transformers model {type(model).__name__}")

    def native(f: dict) -> dict:
        with torch.no_grad():
            out = wrapped(*(torch.from_numpy(np.asarray(f[n], dtype=np.int64)) for n in names))
        return {out_name: out.numpy()}

    return proto, native, feeds, tokenizer
