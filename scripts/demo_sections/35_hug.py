"""HUG: train the tiny BLIP-2 Q-Former with heterogeneous uncertainty, untrained vs trained.

FashionIQ format (three shape "categories", R@10/R@50) and CIRR format (R@K, Rs@K) on the shapes
world; ranking by the expected distance (eq 15) against cached gallery means and variances. The
untrained row is the same model tested before any training step (`trainer.max_epochs=0`).
"""


def section(demo) -> None:
    fiq, cirr = {}, {}
    experiments = {"experiment": ["hug/shapes_fashioniq", "hug/shapes_cirr"]}
    for label, extra in [("untrained", ["trainer.max_epochs=0"]), ("trained", [])]:
        runs = demo.sweep("train", experiments, extra)
        fiq[label] = runs[("hug/shapes_fashioniq",)]
        cirr[label] = runs[("hug/shapes_cirr",)]

    cats = ("dress", "shirt", "toptee")
    header = ["HUG (tiny BLIP-2)"] + [f"{c} R@{k}" for c in cats for k in (10, 50)]
    header += ["avg R@10", "avg R@50", "avg", "ms/query"]
    rows = []
    for label, m in fiq.items():
        cells = [m[f"test/{c}/R@{k}"] for c in cats for k in (10, 50)]
        cells += [m["test/avg/R@10"], m["test/avg/R@50"], m["test/avg"], m["test/ms_per_query"]]
        rows.append([label] + [f"{x:.1f}" if i < 9 else f"{x:.2f}" for i, x in enumerate(cells)])
    gallery = fiq["trained"]["test/dress/num_gallery"]
    rows.append(["chance (dress)", f"{1000 / gallery:.1f}", f"{5000 / gallery:.1f}"] + [""] * 10)
    demo.table(
        "HUG on the shapes world, FashionIQ format (val, protocol clip4cir), Recall@K in %",
        header,
        rows,
    )

    keys = ["R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3", "avg"]
    rows = [
        [label] + [f"{m[f'test/{k}']:.1f}" for k in keys] + [f"{m['test/ms_per_query']:.2f}"]
        for label, m in cirr.items()
    ]
    demo.table(
        "HUG on the shapes world, CIRR format (val), Recall@K and Recall_subset@K in %",
        ["HUG (tiny BLIP-2)", *keys[:-1], "(R@5+Rs@1)/2", "ms/query"],
        rows,
    )
    gain_fiq = fiq["trained"]["test/avg"] - fiq["untrained"]["test/avg"]
    gain_cirr = cirr["trained"]["test/avg"] - cirr["untrained"]["test/avg"]
    print(
        f"  training gains {gain_fiq:+.1f} (FashionIQ avg) and {gain_cirr:+.1f} (CIRR avg) points;"
        f" per-query uncertainties: {demo.run_dir('train', ['experiment=hug/shapes_cirr'])}"
        "/uncertainty/test_cirr_val.csv"
    )
    # RUIR (section ruir) and HUG under one protocol: the same keys, one table (docs/cir.md)
    m = fiq["trained"]
    auroc = [m[f"test/{c}/uncertainty/k10/AUROC"] for c in cats]
    print(
        "  per-query uncertainty vs R@10 hits, AUROC per category: "
        + ", ".join(f"{c} {a:.2f}" for c, a in zip(cats, auroc))
        + "; RUIR beside HUG: `xmodal-table table=cir_shapes`"
    )
