"""HF folders -> the Orbax PyTree directories the trainer initialises from.

    python -m spectron_jax.convert.to_orbax --hf-w2v-bert /data/w2v-bert-2.0 --out /ckpt/w2v_bert
    python -m spectron_jax.convert.to_orbax --hf-lm /data/gemma-3-270m --out /ckpt/gemma3_270m

The output holds the converted tree under the subtree name Spectron uses, `encoder` (w2v-BERT
2.0, `hf_w2v_bert`) or `decoder` (Gemma 3 / Llama / Qwen2, `hf_lm`), so a run takes them in
place of the recipe's stages 1 and 2 with

    train.init_checkpoints = {'/ckpt/w2v_bert': {'encoder': 'encoder'},
                              '/ckpt/gemma3_270m': {'decoder': 'decoder'}}

The model config must match the converted one (the gin model files of the stand-ins, e.g.
gin/models/gemma3_270m.gin, do); `load_subtrees` names any shape that differs. The config this
command read is printed and written beside the arrays (`converted_config.json`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

SUBTREE = {"w2v_bert": "encoder", "lm": "decoder"}


def convert(kind: str, folder: str, out: str, weight_dtype: str | None = None) -> dict[str, Any]:
    """Converts one HF folder; returns the converted config as a dict.

    Raises:
      FileExistsError: `out` exists and is not empty (nothing is overwritten).
      ValueError: `kind` is not "w2v_bert" or "lm".
    """
    import numpy as np
    import orbax.checkpoint as ocp

    if kind not in SUBTREE:
        raise ValueError(f"kind must be one of {sorted(SUBTREE)}, got {kind!r}")
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out")
    if kind == "w2v_bert":
        from spectron_jax.convert.hf_w2v_bert import load_hf_w2v_bert

        config, params = load_hf_w2v_bert(folder)
    else:
        from spectron_jax.convert.hf_lm import load_hf_lm

        config, params = load_hf_lm(folder, weight_dtype=weight_dtype)
    tree = {SUBTREE[kind]: params}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(out), tree)
    checkpointer.wait_until_finished()
    described = {
        "kind": kind,
        "source": os.path.abspath(folder),
        "subtree": SUBTREE[kind],
        "num_params": int(sum(np.size(x) for x in _leaves(params))),
        "config": dataclasses.asdict(config),
    }
    with open(os.path.join(out, "converted_config.json"), "w", encoding="utf-8") as f:
        json.dump(described, f, indent=2, default=str)
    return described


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    return [tree]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-w2v-bert", help="HF Wav2Vec2BertModel folder (safetensors)")
    src.add_argument("--hf-lm", help="HF Gemma 3 / Llama / Qwen2 folder (safetensors)")
    p.add_argument("--out", required=True, help="new Orbax directory")
    p.add_argument("--dtype", default=None, help="cast LM weights (e.g. bfloat16); default: kept")
    args = p.parse_args(argv)
    kind, folder = ("w2v_bert", args.hf_w2v_bert) if args.hf_w2v_bert else ("lm", args.hf_lm)
    try:
        described = convert(kind, folder, args.out, args.dtype)
    except (FileExistsError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"to_orbax: error: {err}", file=sys.stderr)
        return 2
    print(
        f"{described['subtree']}: {described['num_params']:,} parameters from {folder} -> "
        f"{args.out}\n  init with {{'{os.path.abspath(args.out)}': "
        f"{{'{described['subtree']}': '{described['subtree']}'}}}}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
