"""Where is the prompt's voice lost? A speaker-identity probe at each stage of a checkpoint.

    python scripts/probe_speaker.py --checkpoint /tmp/stage3_spectron/checkpoints \
      [--task spectron_synthetic_counting --split validation --max-examples 200]

For every example of the split (eSpeak `validation`: 10 voices, ~20 utterances each) it takes
one vector per stage of the model and asks how well a nearest-class-mean classifier, fitted on
half of the utterances and tested on the other half, tells the speaker from it (chance = 1 /
number of speakers):

- `prompt log-mel`: mean and std over time of the prompt's log-mel (what the encoder hears);
- `encoder prefix`: the mean of the decoder prefix (connector(encoder(prompt))) over its slots;
- `reference continuation`: mean and std of the real continuation's log-mel (the target);
- `generated continuation`: the same of the free-running generated continuation.

Every vector is standardised per dimension (statistics of the fitting half) and compared by
cosine. The voice can only be kept if the prefix carries it; a prefix that does but a
generation that does not shows a decoder that does not use it. Prints a Markdown table.
"""

from __future__ import annotations

import argparse

import numpy as np


def nearest_mean_accuracy(vectors: np.ndarray, labels: list[str]) -> float:
    """float[N, D], N labels -> accuracy on the odd-indexed examples of each class, fitted on the
    even-indexed ones (per-dimension standardisation from the fitting half, cosine)."""
    labels_arr = np.asarray(labels)
    fit = np.zeros(len(labels), bool)
    for name in sorted(set(labels)):
        idx = np.flatnonzero(labels_arr == name)
        fit[idx[::2]] = True
    mu, sd = vectors[fit].mean(0), vectors[fit].std(0) + 1e-6
    z = (vectors - mu) / sd
    z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-9
    names = sorted(set(labels_arr[fit]))
    means = np.stack([z[fit & (labels_arr == n)].mean(0) for n in names])
    means /= np.linalg.norm(means, axis=1, keepdims=True) + 1e-9
    guess = np.asarray(names)[np.argmax(z[~fit] @ means.T, axis=1)]
    return float(np.mean(guess == labels_arr[~fit]))


def _stats(frames: np.ndarray) -> np.ndarray:
    return np.concatenate([frames.mean(0), frames.std(0)])


def probe(checkpoint: str, task: str, split: str, max_examples: int) -> dict[str, float]:
    import jax

    import spectron_tasks  # noqa: F401 - registers the tasks
    from spectron_jax import inference
    from spectron_jax.evaluation import runner
    from spectron_jax.network import Spectron

    loaded = inference.load_model_for_inference(checkpoint)
    config = loaded.model.config
    examples = runner.load_examples(task, split, max_examples)
    speakers = [ex["speaker_id"] for ex in examples]
    options = runner.EvalOptions(batch_size=16)
    _, generations = runner.decode_examples(loaded, examples, options)
    module = Spectron(config)
    vectors: dict[str, list[np.ndarray]] = {
        "prompt log-mel": [],
        "encoder prefix": [],
        "reference continuation": [],
        "generated continuation": [],
    }
    encode = jax.jit(lambda p, f, m: module.apply({"params": p}, f, m, method=Spectron.encode))
    for ex, gen in zip(examples, generations, strict=True):
        prompt = ex["prompt_features"][: int(ex["prompt_length"])]
        prefix, mask = encode(loaded.params, prompt[None], np.ones((1, len(prompt)), np.int32))
        prefix, mask = np.asarray(prefix[0]), np.asarray(mask[0]) > 0
        vectors["encoder prefix"].append(prefix[mask].mean(0))
        if config.encoder_front_end == "log_mel":
            vectors["prompt log-mel"].append(_stats(prompt))
        reference = ex["continuation_frames"][: int(ex["continuation_length"])]
        vectors["reference continuation"].append(_stats(reference))
        frames = gen.frames if len(gen.frames) else np.zeros_like(reference[:1])
        vectors["generated continuation"].append(_stats(frames))
    return {
        stage: nearest_mean_accuracy(np.stack(v), speakers) for stage, v in vectors.items() if v
    } | {"chance": 1.0 / len(set(speakers)), "examples": float(len(examples))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, help="repeatable")
    p.add_argument("--task", default="spectron_synthetic_counting")
    p.add_argument("--split", default="validation")
    p.add_argument("--max-examples", type=int, default=200)
    args = p.parse_args()
    results = {c: probe(c, args.task, args.split, args.max_examples) for c in args.checkpoint}
    stages = [k for k in next(iter(results.values())) if k not in ("chance", "examples")]
    print(f"speaker probe on {args.task}:{args.split} (nearest class mean, half fitted)")
    print("| checkpoint | " + " | ".join(stages) + " | chance |")
    print("|" + "---|" * (len(stages) + 2))
    for c, r in results.items():
        cells = [f"{r.get(s, float('nan')):.2f}" for s in stages]
        print(f"| {c} | " + " | ".join(cells) + f" | {r['chance']:.2f} |")


if __name__ == "__main__":
    main()
