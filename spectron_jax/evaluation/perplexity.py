"""The paper's continuation metric: log-perplexity of the ASR transcript of generated speech under
GPT-2, with both models read from local folders the user provides (nothing is downloaded).

    generated log-mel --vocoder--> waveform --LocalAsr--> text --LocalLm--> mean NLL per token

`LocalAsr` wraps any `transformers` speech-recognition checkpoint saved with `save_pretrained`
(e.g. a local copy of `openai/whisper-small` or `facebook/wav2vec2-base-960h`); `LocalLm` any
causal LM (the paper: `gpt2`). Both are loaded with `local_files_only=True`.
"""

from __future__ import annotations

import math
import os

import numpy as np


def require_local_model_dir(path: str | os.PathLike | None, what: str, flag: str) -> str:
    """Checks that `path` is a local `save_pretrained` folder; the error says what to pass."""
    if not path:
        raise ValueError(f"{what} needs {flag}: a local folder written by save_pretrained")
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"{flag} {path}: no config.json there; expected a local transformers model folder "
            "(save_pretrained output); models are never downloaded at evaluation time"
        )
    return path


class LocalAsr:
    """A local `transformers` ASR model: float32[S] waveform -> text."""

    def __init__(self, model_dir: str | os.PathLike):
        from transformers import pipeline

        model_dir = require_local_model_dir(model_dir, "ASR transcription", "--asr-dir")
        self._pipe = pipeline(
            "automatic-speech-recognition", model=model_dir, device="cpu", local_files_only=True
        )
        self.sample_rate = int(self._pipe.feature_extractor.sampling_rate)

    def transcribe(self, waveform: np.ndarray, sample_rate: int) -> str:
        """Text of a mono float32[S] waveform (resampled to the model's rate when they differ)."""
        if waveform.size == 0:
            return ""
        if sample_rate != self.sample_rate:
            from spectron_jax.audio.io import resample

            waveform = resample(waveform, sample_rate, self.sample_rate)
        raw = np.asarray(waveform, np.float32)
        out = self._pipe({"raw": raw, "sampling_rate": self.sample_rate})
        return str(out["text"]).strip()


class LocalLm:
    """A local causal LM (GPT-2 in the paper) that scores text."""

    def __init__(self, model_dir: str | os.PathLike):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = require_local_model_dir(model_dir, "Log-perplexity", "--lm-dir")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()

    def log_perplexity(self, text: str, context: str = "") -> float:
        """Mean negative log-likelihood (nats per token) of `text`'s tokens given `context`.

        The sequence starts with the tokenizer's BOS (GPT-2: <|endoftext|>) so that the first
        token is scored too; `context` tokens condition but are not scored. NaN for empty text.
        A sequence longer than the LM's context keeps its last tokens (context dropped first).
        """
        import torch

        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        ctx_ids = tok(context, add_special_tokens=False)["input_ids"] if context else []
        txt_ids = tok((" " if context else "") + text, add_special_tokens=False)["input_ids"]
        if not txt_ids:
            return math.nan
        prefix = ([start] if start is not None else []) + list(ctx_ids)
        if not prefix:  # No BOS and no context: the first token cannot be scored.
            prefix, txt_ids = txt_ids[:1], txt_ids[1:]
            if not txt_ids:
                return math.nan
        ids = prefix + list(txt_ids)
        n_prefix = len(prefix)
        limit = getattr(self.model.config, "n_positions", None) or getattr(
            self.model.config, "max_position_embeddings", None
        )
        if limit and len(ids) > limit:
            # Keep the last `limit` tokens: the context shrinks first, then the text's start.
            cut = len(ids) - limit
            ids, n_prefix = ids[cut:], max(n_prefix - cut, 1)
        ids = torch.tensor([ids])
        with torch.no_grad():
            logits = self.model(ids).logits[0].float()
        logp = torch.log_softmax(logits[:-1], dim=-1)  # position t predicts token t + 1
        targets = ids[0, 1:]
        scored = logp[torch.arange(len(targets)), targets][n_prefix - 1 :]
        return float(-scored.mean())
