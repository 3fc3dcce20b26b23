"""Builds the tiny default SentencePiece model, `spectron_jax/assets/tiny_spm.model`.

    python scripts/build_tiny_vocab.py [--vocab_size 1000] [--data_dir ../shared/data]

Corpus: every counting run of the synthetic and FSDD tasks (number words 0-99), plus the
LLaMA-Questions questions and answers and the LJSpeech-subset transcripts where `data_dir` has
them (the script says which it found). Unigram model, byte fallback (so any UTF-8 answer encodes),
ids pad = 0, eos = 1, unk = 2, bos = 3. Deterministic: one thread, no sentence sampling or
shuffling, so the same corpus gives the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import sys

import sentencepiece as spm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(REPO, "spectron_jax", "assets", "tiny_spm.model")
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(REPO), "shared", "data")


def counting_lines(max_number: int = 99, max_run: int = 8) -> list[str]:
    """Every counting run of 1..max_run numbers below max_number + 1, in words."""
    from spectron_tasks.synthetic_counting import number_words

    lines = []
    for start in range(max_number + 1):
        for length in range(1, max_run + 1):
            if start + length - 1 <= max_number:
                lines.append(" ".join(number_words(n) for n in range(start, start + length)))
    return lines


def shared_data_lines(data_dir: str) -> tuple[list[str], list[str]]:
    """(lines, names of the sources found) from LLaMA-Questions and the LJSpeech subset."""
    from spectron_tasks.llama_questions import read_questions

    lines, found = [], []
    qa_dir = os.path.join(data_dir, "llama_questions")
    if os.path.isdir(qa_dir):
        for q in read_questions(qa_dir):
            lines += [q.question, q.answer]
        found.append("llama_questions")
    lj = os.path.join(data_dir, "ljspeech_subset", "metadata.csv")
    if os.path.isfile(lj):
        with open(lj, encoding="utf-8", newline="") as f:
            lines += [row["text"] for row in csv.DictReader(f)]
        found.append("ljspeech_subset")
    return lines, found


def build(vocab_size: int, data_dir: str, output: str) -> str:
    extra, found = shared_data_lines(data_dir)
    lines = counting_lines() + extra
    print(f"corpus: {len(lines)} lines; shared data found: {found or 'none'} in {data_dir}")
    # Trained from memory into memory: no temporary path ends up in the model's trainer spec.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # The corpus is small; fewer pieces are fine.
        character_coverage=1.0,
        byte_fallback=True,
        # No NFKC table (it is ~240 KB of the file); texts are NFC-normalised when read.
        normalization_rule_name="identity",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=3,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    blob = model.getvalue()
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "wb") as f:
        f.write(blob)
    sp = spm.SentencePieceProcessor(model_file=output)
    digest = hashlib.sha256(blob).hexdigest()[:16]
    print(f"wrote {output}: {len(blob)} bytes, {sp.get_piece_size()} pieces, sha256 {digest}")
    print("example:", sp.encode("seventeen eighteen twenty one", out_type=str))
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab_size", type=int, default=1000)
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--output", default=OUTPUT)
    args = parser.parse_args(argv)
    build(args.vocab_size, args.data_dir, args.output)


if __name__ == "__main__":
    sys.exit(main())
