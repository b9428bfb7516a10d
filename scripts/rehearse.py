"""Full-size rehearsal of every backbone: real architectures, random weights, every weight format.

No weights can be downloaded here, but the real architectures can be built with random weights and
saved in the formats users hold. For every `conf/backbone` entry this script

1. builds the real architecture with random weights (seeded) through its config;
2. saves it in each format that entry accepts (xmodal checkpoint, plain state dict, safetensors,
   Lightning checkpoint, open_clip folder, the pretrained tag's cache, save_pretrained folder,
   hub cache, LAVIS `.pth`, HUG's checkpoint) and reloads each through the config
   (`backbone.pretrained=<it>`), checking that the reloaded model gives exactly the same
   embeddings;
3. runs one small batch of each evaluator or method that uses the backbone (found in
   conf/experiment) at the real input size (224/336 px, 77 tokens, 32 query tokens): encoding
   (retrieval, zero-shot, X-MoRe, uCLIP ensembles), uCLIP's MC dropout, one RUIR and one HUG
   training step (forward + backward), checking shapes, dtypes and finiteness.

Each backbone runs in a fresh process (memory is freed in between) and prints one line with its
time and peak memory. Run it with `make rehearse` (not part of `make test`); it takes ~22 minutes on
a 2-core CPU. `--only NAME` rehearses some backbones, `--precision`/`--device` other settings (the
GPU check uses them).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # rehearsal never downloads
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

CAPTION = (
    "a tall red dress with long sleeves and a white collar standing next to a small blue handbag "
    "on a wooden floor in a bright room with large windows and green plants in the background, "
    "photographed from the front with soft light and a shadow falling to the left of the model"
)


# -- what uses which backbone --------------------------------------------------------------------


def users(names: list[str]) -> dict[str, set[str]]:
    """The evaluators and methods of conf/experiment that use each backbone (by name)."""
    found: dict[str, set[str]] = {n: set() for n in names}
    base = ROOT / "conf" / "experiment"
    for path in base.rglob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        for shared in re.findall(r"/experiment/([\w/]+)", text):  # e.g. xmore/_rn50
            text += (base / f"{shared}.yaml").read_text(encoding="utf-8")
        kinds = set(re.findall(r"override /(?:evaluator|method): (\w+)", text))
        for name in names:
            if re.search(rf"\b{re.escape(name)}\b", text):
                found[name] |= kinds
    return found


# -- weight formats ------------------------------------------------------------------------------


def _fake_hub(cache: Path, repo: str, files: dict[str, Path]) -> None:
    """A Hugging Face cache entry for `repo` whose snapshot links to `files`."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text("0" * 40)
    for name, target in files.items():
        (snapshot / name).symlink_to(target)


def write_formats(name: str, cfg: Any, model: torch.nn.Module, tokenizer: Any, out: Path):
    """Yield (format, backbone.pretrained, extra config) for every format of this backbone."""
    from safetensors.torch import save_file

    from xmodal.backbones import lavis, save_checkpoint

    state = model.state_dict()
    if cfg.kind != "open_clip":  # its tokenizer, pre-fetched into the cache as users do
        tokenizer.tokenizer.save_pretrained(out / "tokenizer")
        bert = {"model_type": "bert", "vocab_size": len(tokenizer.tokenizer)}  # as the real repo
        (out / "tokenizer" / "config.json").write_text(json.dumps(bert))
        files = {p.name: p for p in (out / "tokenizer").iterdir()}
        _fake_hub(out / "hub", "bert-base-uncased", files)
    cache = {} if cfg.kind == "open_clip" else {"cache_dir": str(out / "hub")}
    yield "xmodal .pt", str(save_checkpoint(model, out / "xmodal.pt", cfg)), cache
    if cfg.kind == "open_clip":
        torch.save(state, out / "open_clip_pytorch_model.bin")
        yield "state-dict .bin", str(out / "open_clip_pytorch_model.bin"), {}
        plain = {k: v.contiguous() for k, v in state.items()}
        save_file(plain, str(out / "weights.safetensors"))
        yield "safetensors", str(out / "weights.safetensors"), {}
        ckpt = {f"model.backbone.{k}": v for k, v in state.items()}
        torch.save(
            {"state_dict": ckpt, "epoch": 1, "hyper_parameters": {"lr": 1e-5}}, out / "last.ckpt"
        )
        yield "Lightning .ckpt", str(out / "last.ckpt"), {}
        folder = out / "open_clip_folder"
        folder.mkdir()
        import open_clip

        model_cfg = open_clip.get_model_config(cfg.arch)
        config = {"model_cfg": {**model_cfg, "quick_gelu": cfg.quick_gelu}, "preprocess_cfg": {}}
        (folder / "open_clip_config.json").write_text(json.dumps(config))
        os.link(out / "weights.safetensors", folder / "open_clip_model.safetensors")
        yield "open_clip folder", str(folder), {}
        from open_clip.pretrained import get_pretrained_cfg

        pcfg = get_pretrained_cfg(cfg.arch, cfg.pretrained or "") if cfg.pretrained else {}
        if pcfg.get("hf_hub"):
            repo, filename = os.path.split(pcfg["hf_hub"])
            filename = filename or "open_clip_model.safetensors"
            if filename.endswith((".bin", ".pth")):
                filename = filename[:-4] + ".safetensors"
            _fake_hub(out / "hub", repo, {filename: out / "weights.safetensors"})
            yield f"tag '{cfg.pretrained}' (cache)", cfg.pretrained, {"cache_dir": str(out / "hub")}
        return
    from xmodal.backbones.blip import hf_model as blip_hf
    from xmodal.backbones.blip import to_hf_names
    from xmodal.backbones.blip2 import hf_model as blip2_hf

    hf_names = to_hf_names(state) if cfg.kind == "blip" else dict(state)
    from transformers.initialization import no_init_weights

    with no_init_weights():  # the tensors of `model` are assigned, not copied
        hf = (blip2_hf if cfg.kind == "blip2" else blip_hf)(model.config.to_dict())
    hf.load_state_dict(hf_names, strict=False, assign=True)
    if cfg.kind == "blip":  # BLIP-1's ITM head: not part of the ITC towers, any value will do
        torch.nn.init.zeros_(hf.itm_head.weight)
        torch.nn.init.zeros_(hf.itm_head.bias)
    folder = out / "save_pretrained"
    hf.save_pretrained(folder)
    tokenizer.tokenizer.save_pretrained(folder)
    del hf
    yield "save_pretrained folder", str(folder), {}
    if cfg.kind == "blip2":
        files = {p.name: p for p in folder.iterdir()}
        _fake_hub(out / "hub", "Salesforce/blip2-itm-vit-g", files)
        yield "hub id (cache)", "Salesforce/blip2-itm-vit-g", {"cache_dir": str(out / "hub")}
    lavis_state = lavis.to_lavis(hf_names, cfg.kind)
    lavis_state["temp"] = torch.tensor(0.07)
    file = "blip2_pretrained.pth" if cfg.kind == "blip2" else "model_base_capfilt_large.pth"
    torch.save({"model": lavis_state}, out / file)
    yield "LAVIS .pth", str(out / file), cache
    if cfg.kind == "blip2":  # HUG's train.py: LAVIS model under blip_backbone.blip_model.
        inner = {f"blip_backbone.blip_model.{k}": v for k, v in lavis_state.items()}
        inner["visual_uncertainty_estimator.mlp.0.weight"] = torch.zeros(4, 4)
        torch.save({"epoch": 30, "model_state_dict": inner}, out / "hug_best.pt")
        yield "HUG checkpoint", str(out / "hug_best.pt"), cache


# -- one backbone --------------------------------------------------------------------------------


def inputs(preprocess: Any, tokenizer: Any, batch: int, size: int) -> tuple[torch.Tensor, Any]:
    """A batch at the real input size: real-size PIL images through the backbone's preprocess
    (portrait and landscape), and long captions (truncated to the context length)."""
    rng = np.random.default_rng(0)
    shapes = [(480, 640, 3), (640, 360, 3)]
    images = [
        Image.fromarray(rng.integers(0, 255, shapes[i % 2], dtype=np.uint8)) for i in range(batch)
    ]
    pixels = torch.stack([preprocess(im) for im in images])
    assert pixels.shape == (batch, 3, size, size), pixels.shape
    return pixels, tokenizer([CAPTION] * batch)


def encode(model: torch.nn.Module, pixels: torch.Tensor, tokens: Any) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        img, txt = model.encode_image(pixels), model.encode_text(tokens)
    for x in (img, txt):
        assert x.ndim == 2 and x.shape[0] == pixels.shape[0] and torch.isfinite(x).all(), x.shape
    return img, txt


def workload(
    kind: str, model: torch.nn.Module, pixels: torch.Tensor, tokens: Any, repeats: int = 1
) -> str:
    """One small batch of an evaluator or method on the backbone; returns what was checked.

    With `repeats` > 1 the workload runs that many times more after a warm-up run and the mean
    time of those is reported (throughput).
    """
    result = _workload(kind, model, pixels, tokens)
    if repeats <= 1:
        return result
    _sync(pixels.device)
    start = time.perf_counter()
    for _ in range(repeats):
        _workload(kind, model, pixels, tokens)
    _sync(pixels.device)
    seconds = (time.perf_counter() - start) / repeats
    return f"{result} [{seconds * 1e3:.0f} ms/batch, {pixels.shape[0] / seconds:.1f} samples/s]"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _workload(kind: str, model: torch.nn.Module, pixels: torch.Tensor, tokens: Any) -> str:
    if kind in ("retrieval", "zeroshot", "xmore", "clip_pretrain"):
        encode(model, pixels, tokens)
        return f"{kind}: encode ok"
    if kind == "uclip":
        from xmodal.evaluators.uclip import mc_dropout

        with mc_dropout(model, 0.2):
            a, b = encode(model, pixels, tokens), encode(model, pixels, tokens)
        assert not torch.equal(a[0], b[0]), "MC dropout passes are identical"
        return "uclip: 2 MC-dropout passes differ"
    if kind == "ruir":
        from xmodal.methods.ruir import RUIR, RUIRConfig

        d = encode(model, pixels[:1], _first(tokens))[1].shape[-1]
        module = RUIR(model, d, RUIRConfig()).to(pixels.device)
        module.train()
        batch = {"reference": pixels, "target": pixels.flip(0), "text": tokens}
        loss = module.training_step(batch, 0)
        loss.backward()
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        module.zero_grad(set_to_none=False)
        assert torch.isfinite(loss) and all(
            g is not None and torch.isfinite(g).all() for g in grads
        )
        return f"ruir: train step loss {loss.item():.3f}, {len(grads)} grads finite"
    if kind == "hug":
        from xmodal.methods.hug import HUG, HUGConfig

        module = HUG(model, HUGConfig()).to(pixels.device)
        module.train()
        batch = {"reference": pixels, "target": pixels.flip(0), "text": tokens}
        loss = module.training_step(batch, 0)
        loss.backward()
        grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
        module.zero_grad(set_to_none=False)
        assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
        k = model.num_query_tokens
        return (
            f"hug: train step loss {loss.item():.1f} ({k} query tokens), {len(grads)} grads finite"
        )
    return f"{kind}: (no workload)"


def _first(tokens: Any) -> Any:
    return {k: v[:1] for k, v in tokens.items()} if isinstance(tokens, dict) else tokens[:1]


def quiet() -> None:
    """Silence what random weights and trainer-less training steps make libraries say."""
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", category=UserWarning)


def rehearse_one(
    name: str,
    kinds: list[str],
    batch: int,
    precision: str | None = None,
    device: str = "cpu",
    autocast: str | None = None,
    check_formats: bool = True,
    repeats: int = 1,
) -> dict:
    """Rehearse one backbone (see the module docstring). `autocast` ("fp16"/"bf16") runs the
    workloads under torch.autocast as Lightning's 16-mixed / bf16-mixed do; `check_formats=False`
    skips the save/reload round trips; `repeats` times the workloads."""
    from xmodal.backbones import build, get_config

    start = time.time()
    cfg = get_config(name)
    default_pretrained = cfg.pretrained
    cfg.pretrained = None  # the real architecture, random weights
    if precision:
        cfg.precision = precision
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, preprocess, tokenizer = build(cfg)
    size = _input_size(model, preprocess)
    pixels, tokens = inputs(preprocess, tokenizer, 1, size)  # the reload checks: 1 sample
    reference = encode(model, pixels, tokens)
    n_params = sum(p.numel() for p in model.parameters())
    length = (tokens["input_ids"] if isinstance(tokens, dict) else tokens).shape[1]
    formats, done = [], []
    stages = {"build": time.time() - start}
    with tempfile.TemporaryDirectory(prefix=f"rehearse-{name}-") as tmp:
        out = Path(tmp)
        saved = dataclasses.replace(cfg, pretrained=default_pretrained)
        mark = time.time()
        specs = list(write_formats(name, saved, model, tokenizer, out)) if check_formats else []
        stages["write"] = time.time() - mark
        mark = time.time()
        reloaded = model if not specs else None
        del model
        gc.collect()
        for fmt, pretrained, extra in specs:
            c = dataclasses.replace(cfg, pretrained=pretrained, **extra)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reloaded, pre2, tok2 = build(c)
            p2, t2 = inputs(pre2, tok2, 1, size)
            assert torch.equal(
                t2["input_ids"] if isinstance(t2, dict) else t2,
                tokens["input_ids"] if isinstance(tokens, dict) else tokens,
            ), fmt
            img, txt = encode(reloaded, pixels, tokens)
            same = torch.equal(img, reference[0]) and torch.equal(txt, reference[1])
            assert same, f"{fmt}: reloaded embeddings differ"
            formats.append(fmt)
            if fmt != specs[-1][0]:
                del reloaded, pre2, tok2
                gc.collect()
        stages["reload"] = time.time() - mark
        mark = time.time()
        model = reloaded.to(device)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(autocast or "")
        context = (
            torch.autocast(torch.device(device).type, dtype=dtype)
            if dtype
            else contextlib.nullcontext()
        )
        pixels, tokens = inputs(preprocess, tokenizer, batch, size)
        with context:
            for kind in sorted(kinds) or ["retrieval"]:
                args = (model, pixels.to(device), _to(tokens, device), repeats)
                done.append(workload(kind, *args))
        stages["run"] = time.time() - mark
    dtype = str(reference[0].dtype).removeprefix("torch.")
    return {
        "name": name,
        "arch": cfg.arch,
        "params_M": round(n_params / 1e6, 1),
        "input": f"{size}px x{batch}, {length} tokens",
        "embed": f"{tuple(reference[0].shape[1:])} {dtype}",
        "formats": formats,
        "workloads": done,
        "seconds": round(time.time() - start, 1),
        "stages": ", ".join(f"{k} {v:.0f}s" for k, v in stages.items()),
        "peak_rss_GB": round(_max_rss() / 2**30, 2),
        "peak_gpu_GB": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if torch.cuda.is_available()
        else None,
    }


def _input_size(model: torch.nn.Module, preprocess: Any) -> int:
    for step in preprocess.transforms:
        size = getattr(step, "size", None)
        if isinstance(size, int):
            return size
        if isinstance(size, (tuple, list)):
            return int(size[0])
    raise ValueError("no resize step in the preprocessing")


def _to(tokens: Any, device: str) -> Any:
    return (
        {k: v.to(device) for k, v in tokens.items()}
        if isinstance(tokens, dict)
        else tokens.to(device)
    )


def _max_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- all backbones -------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="backbone names (default: every conf/backbone)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--precision", default=None, help="override backbone.precision")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: rehearse one, print JSON
    args = parser.parse_args()
    if args.one:
        quiet()
        kinds = json.loads(os.environ.get("XMODAL_REHEARSE_KINDS", "[]"))
        result = rehearse_one(args.one, kinds, args.batch, args.precision, args.device)
        print(json.dumps(result))
        return 0
    from xmodal.backbones import list_backbones

    names = args.only or list_backbones()
    used = users(list_backbones())
    failed = 0
    total = time.time()
    for name in names:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--batch",
            str(args.batch),
            "--device",
            args.device,
        ]
        if args.precision:
            cmd += ["--precision", args.precision]
        env = {**os.environ, "XMODAL_REHEARSE_KINDS": json.dumps(sorted(used.get(name, ())))}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            failed += 1
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            print(f"FAIL {name}: {' | '.join(tail)}", flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"ok   {r['name']:<38} {r['arch']:<16} {r['params_M']:>7}M  {r['input']:<22} "
            f"emb {r['embed']:<16} {r['seconds']:>6.1f}s  peak {r['peak_rss_GB']:>5.2f} GB\n"
            f"     formats: {', '.join(r['formats'])}\n"
            f"     {'; '.join(r['workloads'])}\n"
            f"     ({r['stages']})",
            flush=True,
        )
    print(f"{len(names) - failed}/{len(names)} backbones rehearsed in {time.time() - total:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
