"""X-MoRe: zero-shot classification of the shapes sets, helped by captions retrieved from the pool.

The shapes world's caption pool (2,000 image-caption pairs) is indexed in the clip-retrieval
layout with the pretrained tiny CLIP (section 10), then every test image retrieves its K = 128
nearest pool images, their captions are de-duplicated and re-ranked, and the top k = 16 vote.
One Hydra multirun per experiment sweeps the datasets in one process:

    xmodal-eval -m experiment=xmore/shapes_coop data=shapes_oxford_pets,shapes_dtd,...

Accuracies (top-1, %) are over the non-skipped test images; X-MoRe is the mean over three stream
orders (seeds 0-2) with the paper's min-max normaliser.
"""

from __future__ import annotations

COOP = (
    "oxford_flowers",
    "dtd",
    "oxford_pets",
    "stanford_cars",
    "ucf101",
    "caltech101",
    "food101",
    "sun397",
    "fgvc_aircraft",
    "eurosat",
)
IMAGENET = ("imagenet", "imagenet_a", "imagenet_r", "imagenet_v2", "imagenet_sketch")
COLUMNS = ("image", "text", "equal", "xmore")


def section(demo) -> None:
    rows = []
    for experiment, datasets in (("xmore/shapes_coop", COOP), ("xmore/shapes_imagenet", IMAGENET)):
        axes = {"experiment": [experiment], "data": [f"shapes_{d}" for d in datasets]}
        quiet = ["trainer.enable_progress_bar=false"]  # 15 small runs: no progress bars
        for (_, data), m in demo.sweep("eval", axes, quiet, check=False).items():
            name = data.removeprefix("shapes_")
            if m is None:
                rows.append([name, "failed: see the log above", *[""] * (len(COLUMNS) + 1)])
                continue
            accuracies = [f"{m[f'test/acc/{c}']:.1f}" for c in COLUMNS]
            rows.append([name, m["test/num_evaluated"], m["test/num_skipped"], *accuracies])
    demo.table(
        "X-MoRe on the shapes world (tiny CLIP, shapes caption pool as the index), top-1 in %",
        ["dataset", "images", "skipped", "image-only", "text-only", "equal", "X-MoRe"],
        rows,
    )
