"""How often the nearest pool images of a test image show the query's class, in the ambiguity
world's X-MoRe pool (docs/ambiguity.md, the X-MoRe bullet).

    python scripts/ambiguity_pool_neighbours.py [--k 5] [--sets stanford_cars,imagenet] \
        [<override> ...]   # e.g. data.shapes_seed=1, or the stronger index's three overrides

The overrides are those of the X-MoRe run (`xmodal-eval experiment=xmore/shapes_coop
data.shapes_ambiguity=true <override> ...`): its world, its index (searched as the run searches it;
run it first so that the index is built) and its index encoder, which encodes the test images.
The pool scenes are replayed from the generator (``shapes:<seed>:pool:ambiguity``, the first draws
of :func:`xmodal.data.shapes.ambiguity.write_pool`); a pool image counts as a photo of a class when
an object holds every attribute the class's recipe fixes (all objects, when the recipe allows no
distractor), with the recipe's background and count. Prints the share over all, clear and
degraded test images (the world's ambiguity.json).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def test_items(root: Path, name: str) -> tuple[list, list[dict], dict]:
    """(image path, label, sidecar id) of the test images, the class recipes, the sidecar."""
    from xmodal.data.coop import DATASETS
    from xmodal.data.shapes import coop

    if name == "imagenet":
        folder = root / "imagenet/images/val"
        lines = (root / "imagenet/classnames.txt").read_text().splitlines()
        classes = sorted(line.split(" ", 1) for line in lines if line)
        recipes = [dict(zip(("colour", "shape"), c.split())) for _, c in classes]
        items = [
            (p, label, str(p.relative_to(folder)))
            for label, (wnid, _) in enumerate(classes)
            for p in sorted((folder / wnid).iterdir())
        ]
    else:
        spec = DATASETS[name]
        folder = root / spec.folder
        base = folder / spec.image_dir if spec.image_dir else folder
        recipes = [recipe for _, _, recipe in coop._classes(name)]
        split = json.loads((folder / spec.split_file).read_text())["test"]
        items = [
            (base / rel, label, str((base / rel).relative_to(folder))) for rel, label, _ in split
        ]
    sidecar = json.loads((folder / "ambiguity.json").read_text())["items"]
    return items, recipes, sidecar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--sets", default="stanford_cars,oxford_pets,imagenet")
    parser.add_argument("overrides", nargs="*", help="overrides of the X-MoRe run")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from PIL import Image

    from xmodal.backbones import build
    from xmodal.config import compose
    from xmodal.data.shapes.ambiguity import pool_scene
    from xmodal.data.shapes.pool import shows, web_concepts
    from xmodal.data.world_manifest import data_seed
    from xmodal.evaluators.zeroshot import backbone_config
    from xmodal.retrieval.clip_index import ClipIndex

    overrides = ["experiment=xmore/shapes_coop", "data.shapes_ambiguity=true", *args.overrides]
    cfg = compose("eval", overrides)
    root = Path(cfg.data.shapes_dir)
    index = ClipIndex(cfg.evaluator.index.folder)  # the run's pool index: no re-encoding
    name = cfg.evaluator.index.backbone
    model, preprocess, _ = build(backbone_config(cfg, name) if name else cfg.backbone)
    rng, concepts = random.Random(f"shapes:{data_seed(cfg.data)}:pool:ambiguity"), web_concepts()
    scenes = [pool_scene(rng, concepts)[0] for _ in range(len(index))]

    @torch.no_grad()
    def encode(paths: list) -> torch.Tensor:
        out = []
        for i in range(0, len(paths), 256):
            x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[i : i + 256]])
            out.append(F.normalize(model.encode_image(x).float(), dim=-1))
        return torch.cat(out)

    for name in args.sets.split(","):
        items, recipes, sidecar = test_items(root, name)
        _, ids = index.search(encode([p for p, _, _ in items]), args.k)
        rows = [[int(Path(p).stem) for p in paths] for paths in index.column(ids, "image_path")]
        share = torch.tensor(
            [
                [shows(scenes[j], recipes[label]) for j in row]
                for row, (_, label, _) in zip(rows, items)
            ],
            dtype=torch.float,
        ).mean(1)
        clear = torch.tensor([sidecar[i]["level"] == 0 for _, _, i in items])
        print(
            f"{name}: {len(items)} test images; share of the {args.k} nearest pool images that "
            f"show the query's class: all {share.mean():.3f}, clear {share[clear].mean():.3f}, "
            f"degraded {share[~clear].mean():.3f}"
        )


if __name__ == "__main__":
    main()
