"""uCLIP: training-free retrieval uncertainty of the pretrained tiny CLIP (MC dropout, ensemble).

Five confidences per query on the same cached posterior samples: 20 MC-dropout passes of the
tiny CLIP, then a 3-member deep ensemble (the pretrained tiny CLIP plus two cheap fine-tunes of
it with other seeds). Prints S / R² / −S·R² of R@1 over 10 confidence bins (S ideal −1, −S·R²
ideal +1) with AUROC and AURC of the confidence for a correct top-1, per direction, and the plots.
"""

METHODS = ["top1_similarity", "top1_consistency", "top5_consistency", "adversarial"]
METHODS += ["adversarial_linear"]
COLUMNS = ["S", "R2", "-SR2", "AUROC", "AURC"]


def _cell(value: float) -> str:
    return "nan" if value != value else f"{value:.2f}"


def section(demo) -> None:
    demo.sweep("train", {"experiment": ["uclip/shapes_ens_member"], "seed": ["1", "2"]})
    runs = {"MCD": "uclip/shapes_mcd", "Ens.": "uclip/shapes_ens"}
    evals = demo.sweep("eval", {"experiment": list(runs.values())})
    metrics = {sampler: evals[(exp,)] for sampler, exp in runs.items()}
    rows = []
    for sampler, m in metrics.items():
        for method in METHODS:
            prefix = f"test/{method}" if f"test/{method}/t2i/S" in m else "test"
            cells = [_cell(m[f"{prefix}/{d}/{key}"]) for d in ("i2t", "t2i") for key in COLUMNS]
            rows.append([f"{method} ({sampler})", *cells])
    n_img, n_txt = metrics["MCD"]["test/num_images"], metrics["MCD"]["test/num_texts"]
    demo.table(
        f"uCLIP calibration, shapes world ({n_img} images, {n_txt} captions): R@1 per confidence "
        "bin (S, R², -S·R²) and the confidence as a top-1 correctness score (AUROC, AURC)",
        ["method (sampler)"] + [f"{d} {key}" for d in ("i2t", "t2i") for key in COLUMNS],
        rows,
    )
    recall = [
        [sampler] + [f"{m[f'test/{d}/R@{k}']:.1f}" for d in ("t2i", "i2t") for k in (1, 5, 10)]
        for sampler, m in metrics.items()
    ]
    demo.table(
        "Retrieval with the mean score over posterior samples, Recall@K in %",
        ["sampler", "t2i R@1", "t2i R@5", "t2i R@10", "i2t R@1", "i2t R@5", "i2t R@10"],
        recall,
    )
    for sampler, exp in runs.items():
        run_dir = demo.run_dir("eval", [f"experiment={exp}"])
        for name in ("calibration.png", "rejection.png"):
            print(f"  {sampler} plot: {run_dir / name}")
