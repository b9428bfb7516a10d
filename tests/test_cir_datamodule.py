"""The CIR datamodule (xmodal.data.cir) on the small shapes world: texts, loaders, subsets."""

from __future__ import annotations

import random

import pytest
import torch

from xmodal.config import compose
from xmodal.data.base import CIRSplit
from xmodal.data.cir import (
    CIRDataModule,
    blip_caption,
    random_fiq_text,
    training_texts,
)


def _split(protocol="clip4cir", captions=(["is red.", "has a star"],), **kw):
    n = len(captions)
    fields = dict(
        name="t",
        protocol=protocol,
        reference=[f"r{i}" for i in range(n)],
        text=[f"fixed {i}" for i in range(n)],
        target=[f"t{i}" for i in range(n)],
        gallery=[],
        name_to_path={},
        remove_reference=False,
        captions=[list(c) for c in captions],
    )
    fields.update(kw)
    return CIRSplit(**fields)


# ----------------------------------------------------------------------------- texts


def test_training_texts_per_mode():
    fiq = _split()
    assert training_texts(fiq, "both_orders") == [(0, "is red. and has a star"),
                                                   (0, "has a star and is red.")]  # fmt: skip
    assert training_texts(fiq, "fixed") == [(0, "fixed 0")]
    assert training_texts(fiq, "random") == [(0, None)]
    assert training_texts(fiq, "blip_caption") == [(0, "is red , has a star")]
    val_lines = _split(protocol="val", captions=(["a", "b"], ["b", "a"]))
    assert training_texts(val_lines, "both_orders") == [(0, "fixed 0"), (1, "fixed 1")]
    cirr = _split(captions=(["Make it Blue."],))
    assert (
        training_texts(cirr, "both_orders")
        == training_texts(cirr, "random")
        == [(0, "Make it Blue.")]
    )
    with pytest.raises(ValueError, match="text_mode"):
        training_texts(fiq, "shuffle")


def test_random_fiq_text_draws_the_four_clip4cir_variants():
    rng = random.Random(0)
    seen = {random_fiq_text(["is red.", "has a star?"], rng) for _ in range(200)}
    assert seen == {"Is red and has a star", "Has a star and is red", "Is red", "Has a star"}


def _zero_pixels(path):
    return torch.zeros(1)


def _random_text_draws(seed=0, workers=2, epochs=2, n=256):
    """CLIP4Cir ``random`` texts through the real training loader: per epoch, the variant drawn
    for each sample index, and the sequence of variants each worker drew, in order."""
    from xmodal.data.cir import TripletDataset
    from xmodal.data.datamodule import train_loader

    names = {f"r{i}": "x" for i in range(n)} | {f"t{i}": "x" for i in range(n)}
    split = _split(captions=[[f"a{i}", f"b{i}"] for i in range(n)], name_to_path=names)
    dataset = TripletDataset([split], "random", _zero_pixels, seed=seed)
    loader = train_loader(dataset, 16, None, seed, None, workers)
    draws = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        by_index, by_worker = {}, [[] for _ in range(max(1, workers))]
        for b, (idx, _, texts, _) in enumerate(loader):  # batch b comes from worker b % workers
            for i, text in zip(idx.tolist(), texts):
                variant = [f"A{i} and b{i}", f"B{i} and a{i}", f"A{i}", f"B{i}"].index(text)
                by_index[i] = variant
                by_worker[b % len(by_worker)].append(variant)
        assert sorted(by_index) == list(range(n))
        draws.append((by_index, by_worker))
    return draws


def test_random_texts_differ_across_workers_and_epochs_and_repeat_across_runs():
    """A generator held by the dataset used to be copied into each worker and never advance: both
    workers drew the same sequence, and every epoch repeated it."""
    (index0, workers0), (index1, workers1) = _random_text_draws()
    assert workers0[0] != workers0[1] and workers1[0] != workers1[1]  # across workers
    assert workers0[0] != workers1[0] and workers0[1] != workers1[1]  # across epochs
    changed = sum(index0[i] != index1[i] for i in index0) / len(index0)
    assert 0.6 < changed < 0.9  # independent draws of 4 variants: 3/4
    counts = [list(index0.values()).count(v) for v in range(4)]
    assert min(counts) > 40 and max(counts) < 90  # p = 1/4 each of 256
    # identical runs repeat exactly; the draw does not depend on the workers, only on the seed
    assert [d[0] for d in _random_text_draws()] == [index0, index1]
    assert _random_text_draws(workers=0, epochs=1)[0][0] == index0
    assert _random_text_draws(seed=1, epochs=1)[0][0] != index0


def test_blip_caption():
    text = "Is RED (and) shiny!!  has: a star; " + " ".join(["w"] * 60)
    out = blip_caption(text)
    assert out.startswith("is red and shiny has a star w")
    assert len(out.split(" ")) == 50


# ----------------------------------------------------------------------------- datamodule


def _datamodule(overrides, **kw):
    from xmodal import backbones

    cfg = compose("train", ["data.shapes_world=small", *overrides])
    _, preprocess, tokenizer = backbones.build("tiny_clip")
    return CIRDataModule(cfg.data, preprocess, tokenizer, **kw)


def test_fashioniq_joint_training_and_per_category_evaluation(shapes_world):
    dm = _datamodule(["data=shapes_fashioniq"])
    dm.setup("fit")
    per_cat = {k: len(s.reference) for k, s in dm.load("train").items()}
    assert set(per_cat) == {"dress", "shirt", "toptee"}
    assert len(dm.train_set) == 2 * sum(per_cat.values())  # both caption orders
    batch = next(iter(dm.train_dataloader()))
    assert batch["reference"].shape == batch["target"].shape == (64, 3, 32, 32)
    assert batch["text"].shape[0] == 64 and batch["index"].dtype == torch.long
    assert [s.key for s in dm.val_subsets] == ["dress", "shirt", "toptee"]
    loaders = dm.val_dataloader()
    assert len(loaders) == 6
    idx, pixels, valid = next(iter(loaders[0]))
    assert pixels.shape[1:] == (3, 32, 32) and bool(valid.all())
    idx, tokens = next(iter(loaders[1]))
    assert tokens.shape[0] == len(idx)
    dress = dm.val_subsets[0]
    names = dress.split.gallery
    assert [names[i] for i in dress.target.tolist()] == dress.split.target
    assert [names[i] for i in dress.reference.tolist()] == dress.split.reference
    assert dress.counts() == {
        "dress/num_queries": 10,
        "dress/num_gallery": len(names),
        "dress/protocol": "clip4cir",
    }


def test_fashioniq_one_category_val_protocol_and_reference_pixels(shapes_world):
    dm = _datamodule(
        ["data=shapes_fashioniq", "data.categories=[shirt]", "data.protocol=val"],
        query_images=True,
    )
    dm.setup()
    assert list(dm.load("train")) == ["shirt"]
    shirt = dm.test_subsets[0]
    assert (
        shirt.split.remove_reference and shirt.counts()["shirt/protocol"] == "val+remove_reference"
    )
    assert len(dm.train_set) == len(dm.load("train")["shirt"].reference)  # one sample per line
    idx, ref_pixels, tokens = next(iter(dm.test_dataloader()[1]))
    assert ref_pixels.shape == (len(idx), 3, 32, 32)


def test_cirr_with_test1_submission_split(shapes_world):
    dm = _datamodule(["data=shapes_cirr"], extra_test_splits=["test1"])
    dm.setup()
    assert [s.key for s in dm.test_subsets] == ["", "test1"]
    val, test1 = dm.test_subsets
    assert val.prefix == "" and test1.prefix == "test1/" and test1.target is None
    assert val.members.shape == (len(val.split.reference), 6)
    assert len(dm.test_dataloader()) == 4
    assert len(dm.train_set) == len(dm.load("train")[""].reference)


def test_fashioniq_test_split_and_non_cir_data_are_refused(shapes_world):
    dm = _datamodule(["data=shapes_fashioniq", "data.split=test"])
    with pytest.raises(ValueError, match="data.split=val"):
        dm.setup("test")
    with pytest.raises(ValueError, match="not a composed image retrieval dataset"):
        _datamodule(["data=shapes_coco"])


class _DrawDataset(torch.utils.data.Dataset):
    """Items ``(index, draw of (seed, epoch, index), epoch)``, like the training datasets."""

    seed, epoch = 0, 0

    def __len__(self):
        return 64

    def __getitem__(self, i):
        draw = random.Random(f"{self.seed}:{self.epoch}:{i}").randrange(1000)
        return torch.tensor([i, draw, self.epoch])


def test_resumed_run_with_workers_sees_the_epoch_it_resumes(tmp_path):
    """Lightning creates the first iterator, and so the workers' copy of the dataset, before it
    sets the epoch; ``train_loader`` sets it from the trainer so a run resumed at epoch 1 sees
    epoch 1's order and draws, not epoch 0's."""
    import lightning.pytorch as pl

    from xmodal.data.datamodule import train_loader

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, _):
            self.seen.append((self.current_epoch, batch.tolist()))
            return (self.w**2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return train_loader(_DrawDataset(), 16, self.trainer, 0, None, num_workers=2)

    def fit(max_epochs, ckpt=None):
        model = Recorder()
        trainer = pl.Trainer(
            max_epochs=max_epochs,
            default_root_dir=tmp_path,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, ckpt_path=ckpt)
        return model, trainer

    full, _ = fit(2)
    _, first = fit(1)
    ckpt = tmp_path / "epoch0.ckpt"
    first.save_checkpoint(ckpt)
    resumed, _ = fit(2, str(ckpt))
    epoch1 = [b for e, b in full.seen if e == 1]
    assert [b for e, b in resumed.seen if e == 1] == epoch1
    assert {item[2] for batch in epoch1 for item in batch} == {1}
    assert epoch1 != [b for e, b in full.seen if e == 0]
