"""Benchmark: the extended-positive protocols from one chunked top-R pass vs a dense ranking.

Problem: COCO's 5k test at its real size with eccv_caption's bundled ground truth and ids:
5,000 images x 25,010 captions (the protocol's 25,000 plus 10 outside it, like the Karpathy
test), 256-dim random unit embeddings (each caption a noisy copy of its image), both directions.

Variants:
  ours   ``coco_extended_metrics``: every key (COCO 1k/5k, CxC, ECCV R@K, mAP@R, R-Precision),
         one chunked top-R search per direction plus five fold searches; never a 5k x 25k matrix;
  dense  the score matrix ``img @ txt.T`` (and its transpose), a full descending argsort of each
         direction and dense positive matrices, ECCV mAP@R / R-Precision from
         ``ranked_hits`` + ``precision_at_r`` and R@K from the same sorted columns (what feeding
         full rankings to eccv_caption needs, without its Python lists).

Peak memory: each variant in a fresh subprocess, ``ru_maxrss`` minus the RSS before the run (see
``bench_recall.py``). Wall and CPU time of that one run are printed beside it; on a shared machine
read them as rough. The two variants' ECCV mAP@R and R-Precision must agree.

Run: ``python benchmarks/bench_extended.py`` (exit code 0 whether targets are met or not).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _common import max_rss, rss, spawn

DIM, EXTRA_CAPTIONS = 256, 10
KS = (1, 5, 10)


def _inputs():
    """Embeddings and ids in COCO's Karpathy order (images by caption order), ground truth."""
    import torch

    from xmodal.data import extended

    gt = extended.load("eccv_caption")
    t2i = gt.sets["coco"]["t2i"]
    image_ids = list(dict.fromkeys(t2i[c][0] for c in gt.caption_order))
    row = {i: n for n, i in enumerate(image_ids)}
    caption_ids = list(gt.caption_order) + [10**9 + i for i in range(EXTRA_CAPTIONS)]
    caption_image = torch.tensor(
        [row[t2i[c][0]] for c in gt.caption_order] + list(range(EXTRA_CAPTIONS))
    )
    gen = torch.Generator().manual_seed(0)
    images = torch.empty(len(image_ids), DIM).normal_(generator=gen)
    images.div_(images.norm(dim=1, keepdim=True))
    texts = torch.empty(len(caption_ids), DIM).normal_(std=0.07, generator=gen)
    texts.add_(images[caption_image])
    texts.div_(texts.norm(dim=1, keepdim=True))
    return images, texts, image_ids, caption_ids, gt


def ours() -> dict[str, float]:
    from xmodal.protocols.extended import coco_extended_metrics

    images, texts, image_ids, caption_ids, gt = _inputs()
    baseline, start, cpu = rss(), time.perf_counter(), time.process_time()
    slack = max_rss() - baseline
    metrics = coco_extended_metrics(images, texts, image_ids, caption_ids, gt, KS).metrics
    return _result(metrics, baseline, slack, start, cpu)


def dense() -> dict[str, float]:
    import torch

    from xmodal.metrics import precision_at_r

    images, texts, image_ids, caption_ids, gt = _inputs()
    baseline, start, cpu = rss(), time.perf_counter(), time.process_time()
    slack = max_rss() - baseline
    keep = torch.tensor([c < 10**9 for c in caption_ids])
    scores = images @ texts.T
    scores[:, ~keep] = float("-inf")
    image_at = {i: j for j, i in enumerate(image_ids)}
    caption_at = {c: j for j, c in enumerate(caption_ids)}
    at = {"i2t": (image_at, caption_at), "t2i": (caption_at, image_at)}
    metrics = {}
    for d, s in (("i2t", scores), ("t2i", scores.T)):
        order = s.argsort(dim=1, descending=True, stable=True)
        for name in ("coco", "cxc", "eccv"):
            positives = torch.zeros(s.shape, dtype=torch.bool)
            num = torch.zeros(s.shape[0], dtype=torch.long)  # R: listed positives, all of them
            rows, cols = at[d]
            for q, ids in gt.sets[name][d].items():
                positives[rows[q], [cols[i] for i in ids if i in cols]] = True
                num[rows[q]] = len(set(ids))
            listed = num > 0
            hits = positives.gather(1, order[:, : max(int(num.max()), *KS)])
            for k in KS:
                metrics[f"{name}/{d}/R@{k}"] = 100 * hits[listed, :k].any(1).double().mean().item()
            if name == "eccv":
                ap, rp = precision_at_r(hits, num)
                metrics[f"eccv/{d}/mAP@R"] = 100 * ap[listed].mean().item()
                metrics[f"eccv/{d}/R-P"] = 100 * rp[listed].mean().item()
    return _result(metrics, baseline, slack, start, cpu)


def _result(metrics: dict, baseline: int, slack: int, start: float, cpu: float) -> dict:
    return {
        "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu,
        "peak_mb": (max_rss() - baseline) / 2**20,
        "slack_mb": slack / 2**20,
        "metrics": metrics,
    }


def main(args: argparse.Namespace) -> int:
    if args.variant:
        print(json.dumps({"ours": ours, "dense": dense}[args.variant]()))
        return 0
    print(f"COCO 5k extended positives: 5,000 images x 25,010 captions x {DIM} dims, fp32")
    runs = {name: spawn(__file__, "--variant", name) for name in ("ours", "dense")}
    print(f"{'variant':<8} {'wall s':>8} {'cpu s':>8} {'peak MB':>9} {'slack MB':>9}  ECCV i2t/t2i")
    for name, r in runs.items():
        m = r["metrics"]
        eccv = ", ".join(
            f"mAP@R {m[f'eccv/{d}/mAP@R']:.2f} R-P {m[f'eccv/{d}/R-P']:.2f}" for d in ("i2t", "t2i")
        )
        print(
            f"{name:<8} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {r['peak_mb']:>9.1f} "
            f"{r['slack_mb']:>9.1f}  {eccv}"
        )
    shared = set(runs["ours"]["metrics"]) & set(runs["dense"]["metrics"])
    differ = [
        k for k in shared if abs(runs["ours"]["metrics"][k] - runs["dense"]["metrics"][k]) > 1e-9
    ]
    print(f"{len(shared)} keys in both; differing: {differ or 'none'}")
    ratio = runs["ours"]["peak_mb"] / runs["dense"]["peak_mb"]
    verdict = "PASS" if ratio <= 0.25 else "MISS"
    print(f"ours/dense peak memory   {ratio:7.3f}  target <= 0.25  {verdict}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("ours", "dense"), help=argparse.SUPPRESS)
    sys.exit(main(parser.parse_args()))
