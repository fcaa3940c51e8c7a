"""Choosing a recipe by lesion-grouped k-fold cross-validation on the development set.

    python -m ml.cv --data ../shared/data/ham10000 --out <folder> --recipes v2-student v2-student-sog v1 \\
        [--folds 3] [--epochs 3]

The development set is the shipped split's train and validation parts; its test part is never read.
Lesions (not images) are dealt into ``folds`` parts, stratified by diagnosis. For each recipe and
fold a model is trained on the other folds (``ml.train``, the recipe's own settings, with the
epoch count given here for every recipe alike) and scored on the held-out fold with the balanced
rule. One fold of one recipe is one unit of work, written to ``<out>/<recipe>/fold<k>.json`` when
done: an interrupted run continues where it stopped (a fold in progress resumes from its last
epoch). ``<out>/summary.md`` has the table: recipe, mean ± sd over folds, minutes per epoch.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from ml import data as ds
from ml.recipe import RECIPES, parse_args
from ml.train import train


def lesion_folds(samples: list[ds.Sample], folds: int, seed: int) -> list[list[ds.Sample]]:
    """``folds`` parts with no lesion in two, each class's lesions dealt round-robin after a seeded shuffle."""
    by_lesion, by_class = ds.group_lesions(samples)
    rng = random.Random(seed)
    parts: list[list[ds.Sample]] = [[] for _ in range(folds)]
    for dx in sorted(by_class):
        lesions = sorted(by_class[dx])
        rng.shuffle(lesions)
        for i, lesion in enumerate(lesions):
            parts[i % folds].extend(by_lesion[lesion])
    return [sorted(part, key=lambda s: s.image_id) for part in parts]


def run_fold(data: str, out: Path, recipe: str, fold: int, parts: list[list[ds.Sample]], epochs: int) -> dict[str, Any]:
    done = out / recipe / f"fold{fold}.json"
    if done.is_file():
        result: dict[str, Any] = json.loads(done.read_text())
        return result
    workdir = out / recipe / f"fold{fold}.work"
    args = ["--data", data, "--out", str(out / recipe / f"fold{fold}"), "--workdir", str(workdir)]
    config = parse_args([*args, "--recipe", recipe, "--epochs", str(epochs), "--resume"])
    held = parts[fold]
    rest = [s for i, part in enumerate(parts) if i != fold for s in part]
    train(config, ds.Split(train=rest, val=held, test=[]))
    history = json.loads((workdir / "history.json").read_text())
    last = history[-1]
    result = {
        "recipe": recipe,
        "fold": fold,
        "epochs": epochs,
        "train_images": len(rest),
        "held_images": len(held),
        "held_lesions": len({s.lesion_id for s in held}),
        "balanced_accuracy": last["val_balanced_accuracy"],
        "accuracy": last["val_accuracy"],
        "minutes_per_epoch": last["minutes"] / len(history),
    }
    done.write_text(json.dumps(result, indent=2))
    return result


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    by_recipe: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_recipe[r["recipe"]].append(r)
    for recipe, runs in by_recipe.items():
        bacc = [r["balanced_accuracy"] for r in runs]
        acc = [r["accuracy"] for r in runs]
        rows.append(
            {
                "recipe": recipe,
                "folds": len(runs),
                "balanced_accuracy_mean": statistics.mean(bacc),
                "balanced_accuracy_sd": statistics.stdev(bacc) if len(bacc) > 1 else 0.0,
                "accuracy_mean": statistics.mean(acc),
                "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "minutes_per_epoch": statistics.mean(r["minutes_per_epoch"] for r in runs),
                "per_fold": bacc,
            }
        )
    return sorted(rows, key=lambda row: -row["balanced_accuracy_mean"])


def table(rows: list[dict[str, Any]], epochs: int, folds: int) -> str:
    lines = [
        f"Lesion-grouped {folds}-fold cross-validation on the development set (train + validation of the "
        f"shipped split; its test part never read), {epochs} epochs per fold, balanced rule, no distillation.",
        "",
        "| recipe | folds | balanced accuracy (mean ± sd) | accuracy (mean ± sd) | minutes per epoch |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['recipe']} | {row['folds']} | {row['balanced_accuracy_mean']:.3f} ± "
            f"{row['balanced_accuracy_sd']:.3f} | {row['accuracy_mean']:.3f} ± {row['accuracy_sd']:.3f} | "
            f"{row['minutes_per_epoch']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ml.cv", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="folder for fold results and the summary")
    p.add_argument("--recipes", nargs="+", default=["v2-student", "v2-student-sog"], choices=sorted(RECIPES))
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--fold-seed", type=int, default=7)
    args = p.parse_args(argv)
    split = ds.SHIPPED_SPLIT.apply(ds.read_dataset(args.data))
    parts = lesion_folds(split.train + split.val, args.folds, args.fold_seed)
    out = Path(args.out)
    results = []
    # Fold-major: every recipe gets fold 0 before any gets fold 1, so a cut-short run still compares.
    for fold in range(args.folds):
        for recipe in args.recipes:
            results.append(run_fold(args.data, out, recipe, fold, parts, args.epochs))
            rows = summarise(results)
            (out / "summary.json").write_text(json.dumps(rows, indent=2))
            (out / "summary.md").write_text(table(rows, args.epochs, args.folds))
    print((out / "summary.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
