"""``xmodal-index``: build, inspect and query an external image-text index (clip-retrieval layout).

    xmodal-index build --source data/shapes/pool --folder outputs/indices/pool \\
        backbone=tiny_clip_shapes
    xmodal-index build --source '/data/cc3m/{00000..00331}.tar' --folder /data/cc3m/index \\
        backbone=openclip_vit_b_32_openai trainer=gpu
    xmodal-index index --embeddings /data/laion400m/embeddings --folder /data/laion400m/index \\
        --max-memory 32G
    xmodal-index tune /data/laion400m/index --embeddings /data/laion400m/embeddings
    xmodal-index info /data/laion400m/index
    xmodal-index search /data/laion400m/index query.jpg -k 10 backbone=openclip_vit_b_32_openai

``build`` encodes a collection (parquet/csv of image paths + captions, webdataset shards, or a
folder holding either) and indexes it; ``index`` indexes an existing clip-retrieval embedding
dump (``img_emb/*.npy`` + ``metadata/*.parquet``, e.g. LAION-400M's released ViT-B/32
embeddings). Both choose the faiss factory for a memory budget (``--max-memory``; exact ``Flat``
for small collections) and tune its search parameters (nprobe) for a target recall@k against
exact search, as clip-retrieval's autofaiss does; the parameters and the measured recall are
stored in ``xmodal_index.json`` and applied whenever the index is opened. ``tune`` does the
tuning alone, for an index made elsewhere (e.g. downloaded from clip-retrieval); ``info`` prints
what an index holds; ``search`` prints the captions of the nearest images of query images.
Trailing ``key=value`` arguments are Hydra overrides of ``eval.yaml`` that choose the encoder
(``backbone=...``) and the trainer (``trainer=gpu``; for several GPUs ``trainer=ddp
trainer.devices=8``, or launch under ``torchrun`` and each process joins).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from xmodal.errors import EXIT_EXPECTED, XmodalError, expected_message


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xmodal-index",
        description=__doc__.split("\n\n")[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="encode a collection and index it")
    build.add_argument("--source", required=True, help="parquet/csv file, folder or tar shards")
    build.add_argument("--folder", required=True, help="the index folder to write")
    _index_options(build)
    build.add_argument("--partition-size", type=int, default=1_000_000)
    build.add_argument("--text", action="store_true", help="also write text_emb/ and text.index")
    build.add_argument("--batch-size", type=int, default=256)
    build.add_argument("--num-workers", type=int, default=4)
    build.add_argument("--on-corrupt", choices=("skip", "fail"), default="skip")
    index = sub.add_parser("index", help="index an existing img_emb/ dump (clip-retrieval)")
    index.add_argument("--embeddings", required=True, help="folder with img_emb/ and metadata/")
    index.add_argument("--folder", help="the index folder (default: the embeddings folder)")
    _index_options(index)
    index.add_argument("--text", action="store_true", help="also index text_emb/ (text.index)")
    tune = sub.add_parser("tune", help="tune and record the search parameters of an index")
    tune.add_argument("folder")
    tune.add_argument("--embeddings", help="folder with the img_emb/ it was built from")
    tune.add_argument("--text", action="store_true", help="tune text.index (text_emb/)")
    _tuning_options(tune)
    info = sub.add_parser("info", help="print what an index holds")
    info.add_argument("folder")
    search = sub.add_parser("search", help="captions of the nearest images of query images")
    search.add_argument("folder")
    search.add_argument("images", nargs="+")
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--nprobe", type=int, default=None, help="default: the tuned value")
    return parser


# Defaults (None) are xmodal.retrieval.tuning's, resolved in _options: the parser imports nothing
# heavy, so `xmodal-index --help` stays fast. tests/test_index_tuning.py checks the help text.
def _index_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--factory",
        default="auto",
        help="faiss factory string, or auto: Flat for small collections, else an IVF index "
        "with the most precise codes (SQfp16, SQ8, PQ<m>) that fit --max-memory",
    )
    parser.add_argument(
        "--max-memory", help="memory budget of an auto index, e.g. 4G (default 32G)"
    )
    parser.add_argument("--train-size", type=int, help="IVF/PQ training sample")
    _tuning_options(parser)


def _tuning_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target-recall",
        type=float,
        help="tune for recall@k >= this against exact search (default 0.95)",
    )
    parser.add_argument("--tune-k", type=int, help="the k of the recall (default 128)")
    parser.add_argument(
        "--tune-queries",
        type=int,
        help="held-out queries the recall is measured on (default 1000)",
    )


def _options(args: argparse.Namespace):
    from xmodal.retrieval.clip_index import IndexOptions
    from xmodal.retrieval.tuning import parse_size

    given = {
        "factory": getattr(args, "factory", None),
        "max_memory": getattr(args, "max_memory", None),
        "train_size": getattr(args, "train_size", None),
        "target_recall": args.target_recall,
        "tune_k": args.tune_k,
        "tune_queries": args.tune_queries,
    }
    options = IndexOptions(**{key: value for key, value in given.items() if value is not None})
    parse_size(options.max_memory)  # a bad size fails before any work
    return options


def _describe(folder: Path | str, kind: str, info: dict) -> str:
    """One line: the index, its search parameters and the recall they measured."""
    search = info[f"{kind}_search"]
    params = search["params"] or ("exact" if search.get("exact") else "defaults")
    line = f"{folder}/{kind}.index: {info[f'{kind}_index']}, search {params}, "
    line += f"recall@{search['k']} {search['recall']:.4f} against exact search"
    if search.get("missing"):
        line += f" ({search['missing']} missing ids)"
    if not search.get("reached", True):
        line += f" (below the target {search['target']})"
    return line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse options; trailing ``key=value`` words become ``args.overrides`` (Hydra)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "search":  # `images` is greedy: take the overrides back out of it
        extra += [i for i in args.images if "=" in i and not Path(i).exists()]
        args.images = [i for i in args.images if i not in extra]
    bad = [e for e in extra if "=" not in e or e.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are key=value)")
    args.overrides = extra
    return args


def _compose(overrides: Sequence[str]):
    """The run config of ``eval.yaml`` with the overrides; seeds everything with its ``seed`` so
    a random-init test backbone is the same model in ``build`` and ``search``."""
    import lightning.pytorch as pl

    from xmodal.config import compose

    cfg = compose("eval", list(overrides))
    pl.seed_everything(cfg.seed, verbose=False)
    return cfg


def cmd_build(args: argparse.Namespace) -> dict:
    from xmodal import backbones
    from xmodal.data.collection import read_collection
    from xmodal.evaluators.xmore import trainer_encode_fn
    from xmodal.pipeline import build_trainer
    from xmodal.retrieval import clip_index

    cfg = _compose(args.overrides)
    collection = read_collection(args.source)
    model, preprocess, tokenizer = backbones.build(cfg.backbone)
    trainer = build_trainer(cfg, training=False)
    encode_fn = trainer_encode_fn(
        trainer,
        model,
        preprocess,
        tokenizer,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        on_corrupt=args.on_corrupt,
    )
    encoder = {"name": cfg.backbone.name, "identity": backbones.identity(cfg.backbone)}
    info = clip_index.build(
        args.folder,
        collection,
        encode_fn,
        encoder,
        partition_size=args.partition_size,
        text=args.text,
        options=_options(args),
        is_writer=trainer.global_rank == 0,
    )
    if trainer.global_rank == 0:
        print(f"{args.folder}: {info['items']} items")
        for kind in ("image", "text") if args.text else ("image",):
            print(_describe(args.folder, kind, info))
    return info


def cmd_index(args: argparse.Namespace) -> dict:
    from xmodal.retrieval import clip_index

    folder = Path(args.folder or args.embeddings)
    kinds = ("image", "text") if args.text else ("image",)
    options = _options(args)
    info = clip_index.index_folder(folder, embeddings=args.embeddings, kinds=kinds, options=options)
    for kind in kinds:
        print(_describe(folder, kind, info))
    return info


def cmd_tune(args: argparse.Namespace) -> dict:
    from xmodal.retrieval import clip_index

    kind = "text" if args.text else "image"
    options = _options(args)
    info = clip_index.tune_folder(
        args.folder, embeddings=args.embeddings, kind=kind, options=options
    )
    print(_describe(args.folder, kind, info))
    return info


def cmd_info(args: argparse.Namespace) -> dict:
    import pyarrow.parquet as pq

    from xmodal.retrieval.clip_index import ClipIndex

    index = ClipIndex(args.folder, mmap=True)
    out = {
        "folder": str(index.folder),
        "items": len(index),
        "dim": index.dim,
        "faiss": type(index.index.index).__name__,
        "search": index.params,
        "partitions": len(index.partitions),
        "columns": pq.ParquetFile(index.partitions[0]).schema_arrow.names,
        "xmodal": index.info,
    }
    print(json.dumps(out, indent=1))
    return out


def cmd_search(args: argparse.Namespace) -> list[list[tuple[float, str]]]:
    import torch
    import torch.nn.functional as F

    from xmodal import backbones
    from xmodal.data.images import open_image
    from xmodal.retrieval.clip_index import ClipIndex

    cfg = _compose(args.overrides)
    model, preprocess, _ = backbones.build(cfg.backbone)
    index = ClipIndex(args.folder, nprobe=args.nprobe, mmap=True)
    with torch.no_grad():
        pixels = torch.stack([preprocess(open_image(p)) for p in args.images])
        queries = F.normalize(model.encode_image(pixels).float(), dim=-1)
    scores, ids = index.search(queries, args.k)
    results = []
    for image, row_scores, captions in zip(args.images, scores, index.column(ids)):
        print(f"\n{image}")
        hits = [(float(s), c) for s, c in zip(row_scores.tolist(), captions) if c is not None]
        for rank, (score, caption) in enumerate(hits, 1):
            print(f"  {rank:3d}  {score:.4f}  {caption}")
        results.append(hits)
    return results


COMMANDS = {
    "build": cmd_build,
    "index": cmd_index,
    "tune": cmd_tune,
    "info": cmd_info,
    "search": cmd_search,
}


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``xmodal-index`` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        from xmodal.extras import check

        check("faiss")
        COMMANDS[args.command](args)
    except XmodalError as err:  # a broken collection or index folder, a corrupt image, ...
        print(f"\nxmodal-index: {expected_message(err)}\n", file=sys.stderr)
        sys.exit(EXIT_EXPECTED)


if __name__ == "__main__":
    main()
