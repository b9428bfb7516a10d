"""Ambiguity: does each method's uncertainty track ambiguity injected item by item? (opt-in)

The ambiguity world (`data.shapes_ambiguity=true`, written to data/shapes-ambiguity) has the
shapes world's scenes with a recorded ambiguity per item (ambiguity.json): degraded images (blur,
occlusion, low contrast, clutter), vague captions, vague or conflicting modification texts, and an
X-MoRe pool like a web index (photos of every class of the classification sets among unrelated
scenes) whose captions name the fine attributes of what each image shows, a share of them wrong
(`data.shapes_pool_noise`). The training splits stay clear (`data.shapes_ambiguity_train=true`
makes them ambiguous too). Every run scores its per-query uncertainties against it: Spearman's
rho with the level and AUROC of ambiguous (level >= 0.5) vs clear queries, per kind
(`<subset>/[<column>/]ambiguity/<kind>/{spearman,auroc}` in metrics.json; `xmodal-table
table=ambiguity_uclip`, `ambiguity_cir`, `ambiguity_xmore`). Chance is rho 0, AUROC 0.5.

It takes several minutes on a laptop CPU (two more worlds, five CIR trainings, three X-MoRe
indexes of 27,392 pool images each), so `make demo` skips it unless XMODAL_DEMO_AMBIGUITY=1 is
set, or it is asked for: `python scripts/demo.py --only ambiguity`.
"""

from __future__ import annotations

import os
import time

AMBIGUITY = ["data.shapes_ambiguity=true"]
UCLIP = ["adversarial", "top1_similarity", "top1_consistency", "top5_consistency"]
NOISE = (0.0, 0.5, 1.0)


def _f(value: float) -> str:
    return "nan" if value != value else f"{value:.2f}"


def _cells(m: dict, prefix: str, kinds: list[str]) -> list[str]:
    stats = ("spearman", "auroc")
    return [_f(m.get(f"{prefix}/{k}/{s}", float("nan"))) for k in kinds for s in stats]


def section(demo) -> None:
    if "ambiguity" not in demo.only and os.environ.get("XMODAL_DEMO_AMBIGUITY") != "1":
        print(
            "  skipped (several minutes): XMODAL_DEMO_AMBIGUITY=1 make demo, or "
            "python scripts/demo.py --only ambiguity"
        )
        return
    t0 = time.time()
    _uclip(demo)
    _cir(demo)
    _xmore(demo)
    print(f"\n  (ambiguity section: {time.time() - t0:.0f} s)")


def _uclip(demo) -> None:
    rows = []
    for label, extra in [("pretrained", []), ("random init", ["backbone=tiny_clip"])]:
        m = demo.run("eval", ["experiment=uclip/shapes_mcd", *AMBIGUITY, *extra])
        for method in UCLIP:
            column = "" if method == "adversarial" else f"{method}/"
            cells = _cells(m, f"test/i2t/{column}ambiguity", ["all"])
            cells += _cells(m, f"test/t2i/{column}ambiguity", ["vague"])
            rows.append([f"{method} ({label})", *cells])
    demo.table(
        "uCLIP (MC dropout) on the ambiguity world: -confidence vs injected ambiguity; image "
        "queries carry degraded images, caption queries vague captions",
        ["confidence (tiny CLIP)", "i2t rho", "i2t AUROC", "t2i rho", "t2i AUROC"],
        rows,
    )


#: RUIR with learned loss attenuation (not in the paper, docs/ruir.md), trained on ambiguous
#: training texts, so that the ranking losses show which queries cannot be ranked
RUIR_ATTENUATION = [
    "method.attenuation=true",
    "data.shapes_ambiguity_train=true",
    "data.batch_size=64",
    "trainer.max_epochs=30",
    "method.milestones=[24,28]",
]


def _cir(demo) -> None:
    rows = []
    variants = [
        ("RUIR", "ruir", [], [""]),
        ("RUIR+att.", "ruir", RUIR_ATTENUATION, [""]),
        ("HUG", "hug", [], ["", "sigma_t2/", "sigma_m2/"]),
    ]
    for title, method, options, columns in variants:
        stages = [("trained", [])]
        if not options:  # (an untrained attenuated head is RUIR's: every query's sigma the same)
            stages.insert(0, ("untrained", ["trainer.max_epochs=0"]))
        for label, extra in stages:
            overrides = [f"experiment={method}/shapes_cirr", *AMBIGUITY, *options, *extra]
            m = demo.run("train", overrides)
            for column in columns:
                name = column.rstrip("/") or ("sigma_q2" if method == "hug" else "variance")
                prefix = f"test/cirr_val/{column}ambiguity"
                cells = _cells(m, prefix, ["all", "vague", "conflict"])
                rows.append([f"{title} {label}: {name}", f"{m['test/avg']:.1f}", *cells])
    demo.table(
        "RUIR and HUG trained on the ambiguity world's clear training split (RUIR+att.: learned "
        "loss attenuation, trained on its ambiguous one), CIRR format (val): per-query variance "
        "vs vague and conflicting modification texts (HUG: fused sigma_q^2 and its text / "
        "coordination sources)",
        ["method: uncertainty", "(R@5+Rs@1)/2"]
        + [f"{k} {s}" for k in ("all", "vague", "conflict") for s in ("rho", "AUROC")],
        rows,
    )


#: X-MoRe as its paper runs it: a stronger CLIP searches the index and re-ranks the captions (here
#: the tiny CLIP pretrained three times longer), in its own index folder
STRONG_INDEX = [
    "evaluator.index.backbone=tiny_clip_shapes_index",
    "evaluator.fine_backbone=tiny_clip_shapes_index",
    "evaluator.index.folder=${paths.cache_dir}/indices/shapes${data.shapes_variant}_pool_index",
]


def _xmore(demo) -> None:
    demo.run("train", ["experiment=shapes/clip_pretrain_index"])
    rows = []
    for encoder, options in (("tiny CLIP", []), ("stronger index", STRONG_INDEX)):
        for noise in NOISE:
            extra = [f"data.shapes_pool_noise={noise}"] if noise else []
            overrides = ["experiment=xmore/shapes_coop", "data=shapes_stanford_cars", *AMBIGUITY]
            m = demo.run("eval", [*overrides, *options, *extra])
            accuracy = [f"{m[f'test/acc/{k}']:.1f}" for k in ("image", "text", "xmore")]
            weights = [f"{m[f'test/weight/{k}']:.2f}" for k in ("image", "text")]
            cells = _cells(m, "test/images/ambiguity", ["all"])
            rows.append([encoder, f"{noise:.0%}", *accuracy, *weights, *cells])
    demo.table(
        "X-MoRe on the ambiguity world's Stanford-Cars set (look-alike classes that differ in "
        "size), pool captions with fine attributes, a growing share of them wrong, the index "
        "searched and re-ranked with the run's tiny CLIP or a stronger one; top-1 in %, mean "
        "modal weights, and the image-modal uncertainty 1 - alpha vs the image degradation",
        ["index encoder", "wrong captions", "image-only", "text-only", "X-MoRe", "w_img", "w_txt"]
        + ["rho", "AUROC"],
        rows,
    )
