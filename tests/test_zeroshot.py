"""Classification metrics on hand-computed cases and the zero-shot evaluator on the shapes world."""

from __future__ import annotations

import math

import pytest
import torch

from xmodal.config import compose
from xmodal.evaluators.zeroshot import backbone_config, class_prompts
from xmodal.metrics import (
    entropy,
    entropy_confidence,
    mean_per_class_recall,
    top1_accuracy,
    topk_accuracy,
)
from xmodal.pipeline import evaluate

SMALL = ["data.shapes_world=small", "trainer=cpu", "trainer.enable_progress_bar=false"]


def test_topk_accuracy_hand_computed_with_ties():
    scores = torch.tensor(
        [
            [0.1, 0.5, 0.5, 0.2],  # tie between 1 and 2: class 1 ranks first
            [0.9, 0.0, 0.3, 0.2],
            [0.0, 0.1, 0.2, 0.3],
        ]
    )
    labels = torch.tensor([2, 0, 1])
    acc = topk_accuracy(scores, labels, (1, 2, 3, 10))
    assert acc == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0, 10: 1.0}
    assert top1_accuracy(scores.argmax(1), labels) == pytest.approx(1 / 3)
    assert top1_accuracy(torch.empty(0), torch.empty(0)) == 0.0
    with pytest.raises(ValueError, match="labels must be long"):
        top1_accuracy(torch.tensor([1, 2]), torch.tensor([1]))


def test_mean_per_class_recall_hand_computed():
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 0, 2])
    # recalls 3/4, 1/1, 1/2 over the classes present (class 3 absent)
    assert mean_per_class_recall(pred, labels, 4) == pytest.approx((0.75 + 1 + 0.5) / 3)


def test_entropy_and_confidence_hand_computed():
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert entropy(p).tolist() == pytest.approx([math.log(4), 0.0, math.log(2)])
    assert entropy_confidence(p).tolist() == pytest.approx([0.0, 1.0, 0.5])
    assert not torch.isnan(entropy(p)).any()  # 0 log 0 = 0
    with pytest.raises(ValueError, match="at least 2 classes"):
        entropy_confidence(torch.ones(3, 1))


def test_class_prompts():
    prompts = class_prompts(["american_bulldog", "Sea or Lake"], ["a photo of a {}.", "{c}!"])
    assert prompts == [
        "a photo of a american bulldog.",
        "american bulldog!",
        "a photo of a Sea or Lake.",
        "Sea or Lake!",
    ]
    with pytest.raises(ValueError, match="has no"):
        class_prompts(["x"], ["a photo"])


def test_named_backbone_config_resolves_run_paths(xmodal_env):
    cfg = compose("eval", [])
    shapes = backbone_config(cfg, "tiny_clip_shapes")
    assert shapes.pretrained == f"{xmodal_env['XMODAL_OUTPUT']}/checkpoints/tiny_clip_shapes.pt"
    assert backbone_config(cfg, "openclip_vit_l_14_openai").quick_gelu is True
    with pytest.raises(FileNotFoundError, match="available"):
        backbone_config(cfg, "no_such_backbone")


def test_zeroshot_evaluator_on_shapes(xmodal_env, shapes_world, tmp_path):
    """The evaluator's accuracies equal CLIP zero-shot computed here by hand from the same
    checkpoint: encode each image and each class prompt, argmax of the cosine."""
    from xmodal import backbones
    from xmodal.data.datamodule import load_split
    from xmodal.data.images import open_image

    base = ["evaluator=zeroshot", "data=shapes_oxford_pets", "backbone=tiny_clip", *SMALL]
    cfg = compose("eval", base)
    torch.manual_seed(3)
    model, _, _ = backbones.build(cfg.backbone)
    ckpt = backbones.save_checkpoint(model, tmp_path / "tiny.pt", cfg.backbone)
    overrides = [*base, f"backbone.pretrained={ckpt}"]
    cfg = compose("eval", overrides)
    metrics = evaluate(cfg, overrides)
    assert metrics["test/num_samples"] == 24 and metrics["test/num_classes"] == 8
    assert metrics["test/skipped_images"] == 0

    model, preprocess, tokenizer = backbones.build(cfg.backbone)
    split = load_split(cfg.data)
    with torch.no_grad():
        images = torch.stack([preprocess(open_image(p)) for p in split.image_paths])
        img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        prompts = [f"a photo of a {c.replace('_', ' ')}." for c in split.classnames]
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    scores = img @ txt.T
    labels = torch.tensor(split.labels)
    top5 = scores.topk(5, dim=1).indices
    acc1 = 100 * (scores.argmax(1) == labels).double().mean().item()
    acc5 = 100 * (top5 == labels[:, None]).any(1).double().mean().item()
    per_class = [(scores.argmax(1)[labels == c] == c).double().mean().item() for c in range(8)]
    assert metrics["test/acc1"] == pytest.approx(acc1, abs=1e-6)
    assert metrics["test/acc5"] == pytest.approx(acc5, abs=1e-6)
    assert metrics["test/mean_per_class_recall"] == pytest.approx(100 * sum(per_class) / 8)


def test_zeroshot_needs_a_classification_dataset(xmodal_env, shapes_world):
    overrides = ["evaluator=zeroshot", "data=shapes_coco", "backbone=tiny_clip", *SMALL]
    with pytest.raises(TypeError, match="classification dataset"):
        evaluate(compose("eval", overrides), overrides)


def test_template_sets_by_name():
    from xmodal.errors import ConfigError
    from xmodal.evaluators.templates import COOP, resolve_templates

    clip80 = resolve_templates("clip80")
    assert len(clip80) == 80 and len(set(clip80)) == 80 and all("{}" in t for t in clip80)
    assert clip80[0] == "a bad photo of a {}." and "itap of a {}." in clip80
    assert resolve_templates("single") == ["a photo of a {}."]
    assert resolve_templates("coop", "oxford_pets") == ["a photo of a {}, a type of pet."]
    assert resolve_templates("coop", "eurosat") == ["a centered satellite photo of {}."]
    assert len(COOP) == 15  # ImageNet, its 4 variants and the 10 CoOp datasets
    assert resolve_templates(["{} here"]) == ["{} here"]
    with pytest.raises(ConfigError, match="clip80"):
        resolve_templates("clip81")
    with pytest.raises(ConfigError, match="data.dataset"):
        resolve_templates("coop", "mnist")


def test_clip80_ensembled_classifier_on_shapes_imagenet(xmodal_env, shapes_world, tmp_path):
    """evaluator.templates=clip80: each class embedding is the renormalised mean of its 80
    normalised prompt embeddings, checked against a hand computation, and the accuracies follow
    from it."""
    from xmodal import backbones
    from xmodal.data.datamodule import load_split
    from xmodal.data.images import open_image
    from xmodal.evaluators.templates import clip80

    overrides = [
        "evaluator=zeroshot",
        "evaluator.templates=clip80",
        "data=shapes_imagenet",
        "backbone=tiny_clip",
        *SMALL,
    ]
    cfg = compose("eval", overrides)
    metrics = evaluate(cfg, overrides)
    assert metrics["test/num_templates"] == 80 and metrics["test/skipped_images"] == 0

    model, preprocess, tokenizer = backbones.build(cfg.backbone)
    split = load_split(cfg.data)
    F = torch.nn.functional
    with torch.no_grad():
        classes = []
        for name in split.classnames:
            prompts = [t.format(name.replace("_", " ")) for t in clip80()]
            each = F.normalize(model.encode_text(tokenizer(prompts)).double(), dim=-1)
            classes.append(F.normalize(each.mean(0), dim=0))
        weights = torch.stack(classes)
        images = torch.stack([preprocess(open_image(p)) for p in split.image_paths])
        img = F.normalize(model.encode_image(images).double(), dim=-1)
    pred = (img @ weights.T).argmax(1)
    acc1 = 100 * (pred == torch.tensor(split.labels)).double().mean().item()
    assert metrics["test/acc1"] == pytest.approx(acc1, abs=1e-6)
    single = evaluate(compose("eval", overrides[:1] + overrides[2:]), overrides[:1] + overrides[2:])
    assert single["test/num_templates"] == 1
