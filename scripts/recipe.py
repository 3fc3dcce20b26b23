"""The training recipe at tiny scale in one command, and its ablation grid.

    # Stages 1-3 (CTC encoder, text LM, Spectron from both), ~35 min on 2 CPU cores:
    python scripts/recipe.py stages --work /tmp/recipe

    # The grid of stage-3 variants on eSpeak counting (and the FSDD run), each trained, then
    # judged (`spectron eval --judges`); writes docs/results/ablations.md, loss curves, samples:
    python scripts/recipe.py grid --work /tmp/recipe --results docs/results

Every step is a subprocess of the project's own entry points (`python -m spectron_jax.train`,
`spectron eval`), so each one is also a command a user can run alone (they are printed). A step
whose output exists is skipped, so an interrupted grid resumes where it stopped; the training
runs resume from their checkpoints by themselves.

The variants (stage 3 = gin/recipe/stage3_spectron.gin):

| variant | what changes |
|---|---|
| full | nothing: frozen stage-1 encoder, stage-2 LM, acoustic prompt, stop head |
| no_primer | `primer_frames` 0: the paper's layout, the voice only through the prefix |
| no_ce | CE weight 0 (the paper's "without CE" ablation) |
| no_derivatives | L_f and L_t off (the paper's "without derivative losses") |
| random_lm | the decoder starts from random weights (direct initialisation) |
| encoder_trained | the stage-1 encoder trained with the rest instead of frozen |
| r1 | reduction factor 1 instead of 2 |
| no_transcript | trained and tested without the prompt transcript (no "chain of thought") |
| gaussian | the MELLE-style gaussian frame head instead of the regression post-net |
| energy_distance | the SLED-style energy-distance frame head instead of the regression post-net |
| fsdd | full, trained and tested on FSDD counting (6 real speakers) |

Knowledge retention (docs/RECIPE.md): full, random_lm and no_transcript are also decoded on the
spoken counting the stage-3 speech never says (`spectron_counting_down`,
`spectron_counting_past_22`, tasks/counting_knowledge.py), where only what the stage-2 LM read
can give the answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE3_GIN = "gin/recipe/stage3_spectron.gin"
STAGE3_FSDD_GIN = "gin/recipe/stage3_spectron_fsdd.gin"
SPEECH = ("spectron_synthetic_counting", "validation_unseen_voices")
FSDD = ("spectron_fsdd_counting", "test")
KNOWLEDGE = (("spectron_counting_down", "validation"), ("spectron_counting_past_22", "validation"))
NO_TRANSCRIPT = "_no_transcript"
STAGE_STEPS = {"stage1": 600, "stage2": 1000, "stage3": 500}  # TRAIN_STEPS of their gin files.


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    says: str
    overrides: tuple[str, ...] = ()
    eval_on: tuple[tuple[str, str], ...] = (SPEECH,)
    knowledge: tuple[tuple[str, str], ...] = ()  # Judged without the (slow) judges.
    gin_file: str = STAGE3_GIN


# The order the grid runs them in: what the recipe's claims need first, the slowest (r1) last.
ORDER = (
    "full",
    "no_primer",
    "fsdd",
    "random_lm",
    "no_ce",
    "no_derivatives",
    "no_transcript",
    "encoder_trained",
    "gaussian",
    "energy_distance",
    "r1",
)


def variants(stage1: str, stage2: str) -> list[Variant]:
    """The grid, in `ORDER`; `stage1` / `stage2` are the checkpoints dirs of stages 1 and 2."""
    encoder_only = f"{{'{stage1}': {{'encoder': 'params/encoder'}}}}"
    grid = [
        Variant("full", "the recipe", knowledge=KNOWLEDGE),
        Variant("no_primer", "no acoustic prompt", ("PRIMER_FRAMES=0",)),
        Variant("no_ce", "no CE loss", ("spectron.loss_config.ce_weight=0.0",)),
        Variant(
            "no_derivatives",
            "no L_f, L_t",
            (
                "spectron.loss_config.freq_delta_weight=0.0",
                "spectron.loss_config.time_delta_weight=0.0",
            ),
        ),
        Variant(
            "random_lm",
            "random-init LM",
            (f"train.init_checkpoints={encoder_only}",),
            knowledge=KNOWLEDGE,
        ),
        Variant(
            "encoder_trained",
            "encoder trained, not frozen",
            ("spectron.spectron_config.encoder_frozen=False",),
        ),
        Variant("r1", "reduction factor 1", ("spectron.spectron_config.reduction_factor=1",)),
        *(
            Variant(head, f"{head} frame head", (f"spectron.spectron_config.frame_head='{head}'",))
            for head in ("gaussian", "energy_distance")
        ),
        Variant(
            "no_transcript",
            "no prompt transcript",
            (f"MIXTURE_OR_TASK_NAME='{SPEECH[0]}{NO_TRANSCRIPT}'",),
            ((SPEECH[0] + NO_TRANSCRIPT, SPEECH[1]),),
            tuple((task + NO_TRANSCRIPT, split) for task, split in KNOWLEDGE),
        ),
        Variant("fsdd", "the recipe on FSDD", (), (FSDD,), gin_file=STAGE3_FSDD_GIN),
    ]
    return sorted(grid, key=lambda v: ORDER.index(v.name))


def _gin_flags(overrides: list[str] | tuple[str, ...]) -> list[str]:
    return [f"--gin.{o}" for o in overrides]


def run(cmd: list[str], log_path: str) -> None:
    """Runs one step, its output to `log_path`; prints the command and its wall time."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    minutes = (time.time() - start) / 60
    print(f"  -> exit {code} after {minutes:.1f} min (log: {log_path})", flush=True)
    if code:
        raise SystemExit(f"step failed (exit {code}); see {log_path}")


def train(gin_file: str, model_dir: str, overrides: list[str], steps: int) -> None:
    """`python -m spectron_jax.train`, skipped when its checkpoint of step `steps` exists."""
    if os.path.isdir(os.path.join(model_dir, "checkpoints", str(steps))):
        print(f"= {model_dir}: done (checkpoint {steps} exists)")
        return
    os.makedirs(model_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "spectron_jax.train", f"--gin_file={gin_file}"]
    cmd += _gin_flags([f"MODEL_DIR='{model_dir}'", *overrides])
    run(cmd, os.path.join(model_dir, "train.log"))


def pretrained_stages(stage1: str, stage2: str) -> list[str]:
    """The gin overrides that point stage 3 at the model dirs of stages 1 and 2."""
    return [
        f"STAGE1_CHECKPOINTS='{stage1}/checkpoints'",
        f"STAGE2_CHECKPOINTS='{stage2}/checkpoints'",
    ]


def stages(work: str) -> tuple[str, str, str]:
    """Stages 1, 2 and 3 into `work`/stage{1,2,3}; returns their model dirs."""
    s1, s2, s3 = (os.path.join(work, f"stage{i}") for i in (1, 2, 3))
    train("gin/recipe/stage1_encoder_ctc.gin", s1, [], STAGE_STEPS["stage1"])
    train("gin/recipe/stage2_text_lm.gin", s2, [], STAGE_STEPS["stage2"])
    train(STAGE3_GIN, s3, pretrained_stages(s1, s2), STAGE_STEPS["stage3"])
    return s1, s2, s3


def evaluate(model_dir: str, task: str, split: str, max_examples: int, judged: bool = True) -> dict:
    """`spectron eval` (`--judges` when `judged`) on one split; returns its metrics.json."""
    out = os.path.join(model_dir, "judged" if judged else "eval", f"{task}.{split}")
    path = os.path.join(out, "metrics.json")
    if not os.path.exists(path):
        os.makedirs(out, exist_ok=True)
        cmd = [sys.executable, "-m", "spectron_jax.cli", "eval", "--checkpoint"]
        cmd += [os.path.join(model_dir, "checkpoints"), "--task", task, "--split", split]
        cmd += ["--out", out, "--max-examples", str(max_examples), "--num-samples", "2"]
        if judged:
            cmd += ["--judges", "--asr-words", "numbers"]
        run(cmd, os.path.join(out, "eval.log"))
    with open(path, encoding="utf-8") as f:
        return json.load(f)


KNOWLEDGE_LENGTHS = (
    "{'prompt_features': 128, 'prompt_transcript': 8, "
    "'continuation_transcript': 8, 'continuation_frames': 128}"
)


def teacher_forced(model_dir: str, task: str, split: str, overrides: list[str]) -> dict:
    """`python -m spectron_jax.train --mode=eval` on one split: the teacher-forced metrics
    (given the audio and the true transcript), e.g. `accuracy_continuation`."""
    path = os.path.join(model_dir, "eval", f"teacher_forced.{task}.{split}.json")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cmd = [sys.executable, "-m", "spectron_jax.train", "--mode=eval"]
        cmd += [f"--gin_file={STAGE3_GIN}", "--gin_file=runs/eval.gin"]
        cmd += _gin_flags(
            [
                *overrides,
                f"MODEL_DIR='{model_dir}'",
                f"MIXTURE_OR_TASK_NAME='{task}'",
                f"EVAL_SPLIT='{split}'",
                f"TASK_FEATURE_LENGTHS={KNOWLEDGE_LENGTHS}",
                "BATCH_SIZE=16",
                f"evaluate_checkpoint.output_json='{path}'",
            ]
        )
        run(cmd, path.replace(".json", ".log"))
    with open(path, encoding="utf-8") as f:
        return json.load(f)["metrics"]


# Columns of the table: (heading, figure of `spectron eval`, format).
COLUMNS = (
    ("transcript WER", "transcript_wer", "{:.3f}"),
    ("text exact", "continuation_text_accuracy", "{:.2f}"),
    ("DTW-L1", "dtw_l1", "{:.3f}"),
    ("ASR acc gen", "judge_word_accuracy_generated_vs_reference", "{:.2f}"),
    ("ASR acc ref", "judge_word_accuracy_reference_audio", "{:.2f}"),
    ("spk own", "judge_speaker_sim_generated", "{:.3f}"),
    ("spk other", "judge_speaker_sim_other_speaker", "{:.3f}"),
    ("spk ref", "judge_speaker_sim_reference", "{:.3f}"),
    ("gap", "judge_speaker_gap", "{:.3f}"),
    ("real gap", "judge_speaker_gap_reference", "{:.3f}"),
    ("vocoded real gap", "judge_speaker_gap_reference_vocoded", "{:.3f}"),
    ("gap ratio", "judge_speaker_gap_ratio", "{:.2f}"),
    ("len err (frames)", "length_error_frames_mae", "{:.1f}"),
)


def table_rows(name: str, task_split: str, figures: dict) -> str:
    cells = [name, task_split]
    for _, key, fmt in COLUMNS:
        value = figures.get(key)
        cells.append(fmt.format(value) if isinstance(value, (int, float)) else "-")
    return "| " + " | ".join(cells) + " |"


def per_speaker(metrics: dict) -> dict[str, dict[str, float]]:
    """Per-speaker means of the judged figures (the FSDD table)."""
    keys = ("judge_word_accuracy_generated_vs_reference", "judge_speaker_sim_generated")
    keys += ("judge_speaker_sim_other_speaker", "judge_speaker_sim_reference")
    out: dict[str, dict[str, list[float]]] = {}
    for r in metrics["examples"]:
        spk = out.setdefault(str(r.get("speaker_id")), {k: [] for k in keys})
        for k in keys:
            if isinstance(r.get(k), (int, float)):
                spk[k].append(float(r[k]))
    return {
        s: {k: sum(v) / len(v) for k, v in figs.items() if v} | {"n": len(figs[keys[0]])}
        for s, figs in sorted(out.items())
    }


def loss_curves(model_dirs: dict[str, str], path: str) -> None:
    """train/spec (L_s) and train/ce against the step for every variant, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    tags = ("train/spec", "train/ce")
    fig, axes = plt.subplots(1, len(tags), figsize=(11, 4))
    for name, model_dir in model_dirs.items():
        acc = event_accumulator.EventAccumulator(
            os.path.join(model_dir, "tensorboard"),
            size_guidance={"tensors": 0},  # every point
        )
        acc.Reload()
        for ax, tag in zip(axes, tags, strict=True):
            if tag in acc.Tags()["tensors"]:
                events = acc.Tensors(tag)
                values = [float(tf.make_ndarray(e.tensor_proto)) for e in events]
                ax.plot([e.step for e in events], values, label=name)
    for ax, tag in zip(axes, tags, strict=True):
        ax.set_xlabel("step")
        ax.set_title(tag)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def copy_samples(variant: str, judged_dir: str, results: str) -> list[str]:
    """The first sample (PNG + WAV) of a judged split into results/samples/<variant>/."""
    src = os.path.join(judged_dir, "samples")
    if not os.path.isdir(src):
        return []
    dst = os.path.join(results, "samples", variant)
    os.makedirs(dst, exist_ok=True)
    names = sorted(os.listdir(src))[:2]
    for n in names:
        shutil.copy(os.path.join(src, n), os.path.join(dst, n))
    return [os.path.join("samples", variant, n) for n in names]


def grid(args: argparse.Namespace) -> None:
    if args.stage1 and args.stage2:  # Pretrained stages given: the grid trains stage 3 only.
        s1, s2 = args.stage1, args.stage2
    else:
        s1, s2, _ = stages(args.work)
    chosen = set(args.variants.split(",")) if args.variants else None
    rows, knowledge, dirs, speakers, samples = [], [], {}, {}, {}
    for v in variants(f"{s1}/checkpoints", f"{s2}/checkpoints"):
        if chosen is not None and v.name not in chosen:
            continue
        model_dir = os.path.join(args.work, "grid", v.name)
        overrides = [*pretrained_stages(s1, s2), *v.overrides]
        if args.steps:
            overrides.append(f"TRAIN_STEPS={args.steps}")
        if v.name != "full":  # The judged evaluation below measures them; no in-run evaluators.
            overrides.append("train.evaluators=[]")
        train(v.gin_file, model_dir, overrides, args.steps or STAGE_STEPS["stage3"])
        dirs[v.name] = model_dir
        for task, split in v.eval_on:
            metrics = evaluate(model_dir, task, split, args.max_examples)
            rows.append(table_rows(f"{v.name} ({v.says})", f"{task}:{split}", metrics["metrics"]))
            if task == FSDD[0]:
                speakers[v.name] = per_speaker(metrics)
            judged = os.path.join(model_dir, "judged", f"{task}.{split}")
            samples[v.name] = copy_samples(v.name, judged, args.results)
        for task, split in v.knowledge:
            metrics = evaluate(model_dir, task, split, 10_000, judged=False)
            forced = teacher_forced(model_dir, task, split, overrides)
            knowledge.append(knowledge_row(v.name, task, split, metrics, forced))
    os.makedirs(args.results, exist_ok=True)
    loss_curves(dirs, os.path.join(args.results, "ablation_loss_curves.png"))
    write_table(args, rows, knowledge, speakers, samples)


def knowledge_row(
    name: str, task: str, split: str, metrics: dict, forced: dict | None = None
) -> str:
    """Free-running text on a knowledge set (the transcript, the first number, both numbers) and
    the teacher-forced continuation token accuracy (`forced`: given the true transcript)."""
    from spectron_tasks.number_text import parse_numbers

    examples = metrics["examples"]
    first = [
        parse_numbers(r["hyp_continuation"])[:1] == parse_numbers(r["continuation_text"])[:1]
        for r in examples
    ]
    both = [bool(r.get("continuation_exact")) for r in examples]
    heard = [r.get("transcript_wer", 1.0) == 0.0 for r in examples]
    both_heard = [b for b, h in zip(both, heard, strict=True) if h]
    cells = [
        name,
        f"{task}:{split}",
        str(len(examples)),
        f"{sum(heard) / len(examples):.2f}" if "no_transcript" not in task else "-",
        f"{sum(first) / len(examples):.2f}",
        f"{sum(both) / len(examples):.2f}",
        f"{sum(both_heard) / len(both_heard):.2f}"
        if both_heard and "no_transcript" not in task
        else "-",
        f"{forced['accuracy_continuation']:.2f}" if forced else "-",
    ]
    return "| " + " | ".join(cells) + " |"


def write_table(args, rows, knowledge, speakers, samples) -> None:
    lines = [
        "# Ablation grid of the tiny recipe (generated by scripts/recipe.py grid)",
        "",
        f"Each variant: gin/recipe/stage3_spectron.gin + its overrides, judged by `spectron eval "
        f"--judges --asr-words numbers --max-examples {args.max_examples}` (speech stopped by "
        "the model's stop head). Columns: the prompt transcript's WER; the text continuation's "
        "exact match; DTW-L1 of the generated vs the reference log-mel; the judge ASR's word "
        "accuracy on the generated and on the reference continuation audio; the judge speaker "
        "encoder's cosine, prompt vs its own generated continuation (own), vs another speaker's "
        "generated continuation (other), vs its reference continuation (ref); the gap own - "
        "other, the same gap of the real continuations (recorded, and through Griffin-Lim: the "
        "ceiling of a perfect log-mel), generated / recorded gap; |generated - reference| "
        "length in frames.",
        "",
        "| variant | split | " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|" + "---|" * (len(COLUMNS) + 2),
        *rows,
        "",
        "![loss curves](ablation_loss_curves.png)",
        "",
        "## Knowledge retention: spoken counting the stage-3 speech never says",
        "",
        "Free-running text (greedy), all examples of the set: the prompt transcript exact, the "
        "first continuation number right, both right, and both right among the examples whose "
        "transcript is exact (a hearing error is not missing knowledge); and teacher-forced "
        "(`--mode=eval`, given the audio and the true prompt transcript) the continuation's "
        "token accuracy, which measures the LM knowledge without the hearing.",
        "",
        "| variant | set | n | transcript exact | first number | both | both, heard right "
        "| teacher-forced continuation acc |",
        "|---|---|---|---|---|---|---|---|",
        *knowledge,
        "",
    ]
    for name, figs in speakers.items():
        lines += [
            f"## {name}: per speaker",
            "",
            "| speaker | n | ASR acc gen | own | other | ref |",
        ]
        lines += ["|---|---|---|---|---|---|"]
        for spk, f in figs.items():
            cells = [
                f.get(k, float("nan"))
                for k in (
                    "judge_word_accuracy_generated_vs_reference",
                    "judge_speaker_sim_generated",
                    "judge_speaker_sim_other_speaker",
                    "judge_speaker_sim_reference",
                )
            ]
            lines.append(f"| {spk} | {f['n']} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
        lines.append("")
    lines += ["## Samples", ""]
    for name, files in samples.items():
        lines.append(f"- {name}: " + ", ".join(f"[{os.path.basename(f)}]({f})" for f in files))
    with open(os.path.join(args.results, "ablations.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(args.results, 'ablations.md')}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("stages", help="stages 1-3 of the recipe")
    st.add_argument("--work", default="/tmp/recipe")
    gr = sub.add_parser("grid", help="stage-3 variants, judged, into a Markdown table")
    gr.add_argument("--work", default="/tmp/recipe")
    gr.add_argument("--results", default=os.path.join(ROOT, "docs", "results"))
    gr.add_argument("--stage1", default=None, help="a finished stage-1 model dir")
    gr.add_argument("--stage2", default=None, help="a finished stage-2 model dir")
    gr.add_argument("--variants", default=None, help="comma-separated subset")
    gr.add_argument("--steps", type=int, default=None, help="TRAIN_STEPS of every variant")
    gr.add_argument("--max-examples", type=int, default=40)
    args = p.parse_args(argv)
    if args.command == "stages":
        stages(args.work)
    else:
        grid(args)


if __name__ == "__main__":
    main()
