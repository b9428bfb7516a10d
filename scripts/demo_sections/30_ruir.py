"""RUIR: fine-tune the tiny CLIP with ranking-aware uncertainty, untrained vs trained.

FashionIQ format (the three shape "categories" trained jointly, R@10/R@50 per category) and CIRR
format (R@K, Rs@K, plus the test1 submission files) on the shapes world, starting from the tiny
CLIP pretrained in section 10. The untrained row is the same model tested before any training step
(`trainer.max_epochs=0`); the per-query uncertainty (mean predicted variance) is scored with the
uCLIP calibration metrics.
"""


def section(demo) -> None:
    fiq, cirr = {}, {}
    experiments = {"experiment": ["ruir/shapes_fashioniq", "ruir/shapes_cirr"]}
    for label, extra in [("untrained", ["trainer.max_epochs=0"]), ("trained", [])]:
        runs = demo.sweep("train", experiments, extra)
        fiq[label] = runs[("ruir/shapes_fashioniq",)]
        cirr[label] = runs[("ruir/shapes_cirr",)]

    cats = ("dress", "shirt", "toptee")
    header = ["RUIR (tiny CLIP)"] + [f"{c} R@{k}" for c in cats for k in (10, 50)]
    header += ["avg R@10", "avg R@50", "avg"]
    rows = []
    for label, m in fiq.items():
        cells = [m[f"test/{c}/R@{k}"] for c in cats for k in (10, 50)]
        cells += [m["test/avg/R@10"], m["test/avg/R@50"], m["test/avg"]]
        rows.append([label] + [f"{x:.1f}" for x in cells])
    gallery = fiq["trained"]["test/dress/num_gallery"]
    rows.append(["chance (dress)", f"{1000 / gallery:.1f}", f"{5000 / gallery:.1f}"] + [""] * 7)
    demo.table(
        "RUIR on the shapes world, FashionIQ format (val, protocol clip4cir), Recall@K in %",
        header,
        rows,
    )

    keys = ["R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "avg"]
    rows = [[label] + [f"{m[f'test/{k}']:.1f}" for k in keys] for label, m in cirr.items()]
    rows.append(["chance (Rs@K)"] + [""] * 4 + [f"{100 * k / 5:.1f}" for k in (1, 2, 3)] + [""])
    demo.table(
        "RUIR on the shapes world, CIRR format (val), Recall@K and Recall_subset@K in %",
        ["RUIR (tiny CLIP)", *keys[:-1], "(R@5+Rs@1)/2"],
        rows,
    )

    m = fiq["trained"]
    auroc = [m[f"test/{c}/uncertainty/k10/AUROC"] for c in cats]
    print(
        "  per-query uncertainty vs R@10 hits, AUROC per category: "
        + ", ".join(f"{c} {a:.2f}" for c, a in zip(cats, auroc))
        + f" (files in {demo.run_dir('train', ['experiment=ruir/shapes_fashioniq'])}/uncertainty)"
    )
    print(
        "  CIRR test1 submission files: "
        f"{demo.run_dir('train', ['experiment=ruir/shapes_cirr'])}/submission/"
    )
