"""Models: one LanguageModel built from a ModelConfig."""

from __future__ import annotations

from lmtk.models.transformer import LanguageModel, ModelConfig


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Round the vocabulary up so the embedding/head matmuls hit fast kernel shapes."""
    return multiple * -(-n // multiple)


def model_config(cfg_model, tokenizer_vocab: int) -> ModelConfig:
    """The ModelConfig of a composed `model` section, with the vocabulary taken from the tokenizer."""
    from lmtk.errors import UserError

    d = dict(cfg_model)
    if d.get("vocab_size") is None:
        d["vocab_size"] = padded_vocab(tokenizer_vocab)
    elif d["vocab_size"] < tokenizer_vocab:
        raise UserError(
            f"model.vocab_size={d['vocab_size']} is smaller than the tokenizer's vocabulary ({tokenizer_vocab}); "
            "leave model.vocab_size unset to take it from the tokenizer"
        )
    return ModelConfig.from_dict(d)


def build_model(cfg: ModelConfig) -> LanguageModel:
    return LanguageModel(cfg)


__all__ = ["LanguageModel", "ModelConfig", "build_model", "model_config", "padded_vocab"]
