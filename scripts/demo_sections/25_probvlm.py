"""ProbVLM: learned adapters on the tiny CLIP's cached embeddings, beside uCLIP (training-free).

Two generalized-Gaussian adapters (image, text) train on the frozen tiny CLIP's embeddings of a
tenth of the shapes train split (an epoch is an MLP pass; the test split's embeddings come from
the cache that section 10 filled). Their uncertainty (aleatoric, epistemic over dropout passes,
total) is scored with uCLIP's protocol on the same test split, printed beside section 20's uCLIP
confidences; then the reconstruction likelihood of the trained vs the untrained adapters.
`xmodal-table table=uclip_vs_learned` renders the same rows (its shapes block).
"""

from xmodal.runs import is_finished, read_metrics

UCLIP = ["top1_similarity", "top1_consistency", "top5_consistency", "adversarial"]
UCLIP += ["adversarial_linear"]
PROBVLM = ["aleatoric", "epistemic", "total"]
COLUMNS = ["S", "R2", "-SR2", "AUROC", "AURC"]


def _cell(value: float) -> str:
    return "nan" if value != value else f"{value:.2f}"


def _row(label: str, m: dict, prefix: str) -> list[str]:
    cells = [_cell(m[f"{prefix}/{d}/{key}"]) for d in ("i2t", "t2i") for key in COLUMNS]
    return [label, *cells, *(f"{m[f'test/{d}/R@1']:.1f}" for d in ("i2t", "t2i"))]


def section(demo) -> None:
    m = demo.run("train", ["experiment=probvlm/shapes"])
    rows = []
    for sampler, exp in (("MCD", "uclip/shapes_mcd"), ("Ens.", "uclip/shapes_ens")):
        run_dir = demo.run_dir("eval", [f"experiment={exp}"])
        if not is_finished(run_dir):
            print(f"  (no finished {exp} run: run the uclip section for its rows)")
            continue
        u = read_metrics(run_dir)
        for method in UCLIP:
            prefix = f"test/{method}" if f"test/{method}/t2i/S" in u else "test"
            rows.append(_row(f"uCLIP {method} ({sampler})", u, prefix))
    for name in PROBVLM:
        prefix = "test" if name == "aleatoric" else f"test/{name}"
        rows.append(_row(f"ProbVLM {name}", m, prefix))
    demo.table(
        f"Training-free (uCLIP) vs learned (ProbVLM) retrieval uncertainty, shapes world test "
        f"split ({m['test/num_images']} images, {m['test/num_texts']} captions): S, R², -S·R² "
        "(R@1 over 10 confidence bins), AUROC and AURC (top-1 correctness); R@1 of each row's "
        "ranking (uCLIP: mean score over samples; ProbVLM: the frozen tiny CLIP)",
        ["method"] + [f"{d} {k}" for d in ("i2t", "t2i") for k in COLUMNS] + ["i2t R@1", "t2i R@1"],
        rows,
    )
    rows = [
        [kind]
        + [f"{m[f'test/{kind}/recon_{k}']:.3f}" for k in ("nll_untrained", "nll")]
        + [f"{m[f'test/{kind}/recon_{k}']:.4f}" for k in ("mae_untrained", "mae")]
        for kind in ("image", "text")
    ]
    demo.table(
        "ProbVLM reconstruction of the frozen test embeddings: generalized-Gaussian NLL (nats per "
        "dimension, eq 3) and |mu_hat - z|, untrained (initial) vs trained adapters",
        ["modality", "NLL untrained", "NLL trained", "MAE untrained", "MAE trained"],
        rows,
    )
    run_dir = demo.run_dir("train", ["experiment=probvlm/shapes"])
    print(f"  ProbVLM plots: {run_dir / 'calibration.png'}, {run_dir / 'rejection.png'}")
