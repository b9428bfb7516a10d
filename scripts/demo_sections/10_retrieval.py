"""Pretrain the tiny CLIP on the shapes world; image<->text retrieval, untrained vs pretrained.

The pretrained tiny CLIP is exported to outputs/checkpoints/tiny_clip_shapes.pt
(`backbone=tiny_clip_shapes`), the starting point of every later section.
"""


def section(demo) -> None:
    pretrain = demo.run("train", ["experiment=shapes/clip_pretrain"])
    print(
        f"  pretraining: val R@1 (mean of both directions) = {pretrain['val/R@1']:.1f} in the "
        f"last epoch, {pretrain['val/best/R@1']:.1f} at the best checkpoint (exported and tested)"
    )
    labels = {
        "shapes/retrieval_untrained": "tiny CLIP, random init",
        "shapes/retrieval": "tiny CLIP, pretrained",
    }
    rows = []
    for (exp,), m in demo.sweep("eval", {"experiment": list(labels)}).items():
        rows.append(
            [labels[exp]]
            + [f"{m[f'test/{d}/R@{k}']:.1f}" for d in ("t2i", "i2t") for k in (1, 5, 10)]
        )
    n_img, n_txt = m["test/num_images"], m["test/num_texts"]
    # a random ranking puts a caption's image (t2i), or one of an image's ~n_txt/n_img captions
    # (i2t), in the top k with probability ~ k / n_img
    rows.append(["chance"] + [f"{100 * min(1, k / n_img):.1f}" for k in (1, 5, 10)] * 2)
    demo.table(
        f"Image-text retrieval, shapes world (COCO format, {n_img} images, {n_txt} "
        "captions), Recall@K in %",
        ["model", "t2i R@1", "t2i R@5", "t2i R@10", "i2t R@1", "i2t R@5", "i2t R@10"],
        rows,
    )
