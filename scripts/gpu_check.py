"""The GPU check (scripts/gpu_check.sh): what only a GPU shows, in under 8 minutes on one H200.

1. The full-size rehearsal (scripts/rehearse.py) of ViT-B/32 and BLIP-2 on the GPU in the mixed
   precisions of conf/trainer/gpu.yaml (16-mixed, and bf16-mixed): every weight format reloaded
   once (fp32, exact), then the evaluators and methods under autocast: encoding, uCLIP's MC
   dropout, one RUIR training step on ViT-B/32 and one HUG training step on BLIP-2, each timed.
2. uCLIP's MC dropout on 1,000 captions with ViT-L/14 (its model): passes that differ, finite
   embeddings, and the throughput in captions per second.

`--dry-run` runs the same code on the CPU with the tiny backbones and 50 captions (a minute or
two), so the script is checked wherever there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

import rehearse  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

AUTOCAST = {"16-mixed": "fp16", "bf16-mixed": "bf16"}


def precisions() -> list[str]:
    """conf/trainer/gpu.yaml's precision, then bf16-mixed (the other mixed precision)."""
    configured = str(OmegaConf.load(ROOT / "conf" / "trainer" / "gpu.yaml").precision)
    return [configured] + [p for p in AUTOCAST if p != configured]


def mc_dropout_throughput(name: str, captions: int, passes: int, device: str, dtype: str) -> str:
    """uCLIP MC dropout: `passes` stochastic text passes over `captions` captions."""
    from xmodal.backbones import build, get_config
    from xmodal.evaluators.uclip import mc_dropout

    cfg = get_config(name)
    cfg.pretrained = None
    torch.manual_seed(0)
    model, _, tokenizer = build(cfg)
    model = model.to(device)
    words = rehearse.CAPTION.split()
    texts = [" ".join(words[i % 7 : i % 7 + 12]) for i in range(captions)]
    tokens = tokenizer(texts)
    tokens = rehearse._to(tokens, device)
    autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    outs = []
    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=autocast):
        with mc_dropout(model, 0.2):
            model.encode_text(_rows(tokens, 0, 8))  # warm-up
            rehearse._sync(torch.device(device))
            start = time.perf_counter()
            for _ in range(passes):
                chunks = [
                    model.encode_text(_rows(tokens, i, i + 256)) for i in range(0, captions, 256)
                ]
                outs.append(torch.cat(chunks).float())
            rehearse._sync(torch.device(device))
            seconds = time.perf_counter() - start
    stacked = torch.stack(outs)
    assert stacked.shape[:2] == (passes, captions) and torch.isfinite(stacked).all()
    assert not torch.equal(stacked[0], stacked[1]), "MC-dropout passes are identical"
    rate = passes * captions / seconds
    return f"uclip MC dropout {name}: {passes} passes x {captions} captions, {rate:.0f} captions/s"


def _rows(tokens, start: int, stop: int):
    return (
        {k: v[start:stop] for k, v in tokens.items()}
        if isinstance(tokens, dict)
        else tokens[start:stop]
    )


def _formats(formats: list[str]) -> str:
    return f"{len(formats)} weight formats reloaded exactly" if formats else "formats: see above"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny backbones")
    args = parser.parse_args()
    dry = args.dry_run
    rehearse.quiet()
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --dry-run to check the script on the CPU")
        return 2
    clip, blip2 = (
        ("tiny_clip", "tiny_blip2") if dry else ("openclip_vit_b_32_openai", "blip2_qformer")
    )
    mcd_model, captions = ("tiny_clip", 50) if dry else ("openclip_vit_l_14_openai", 1000)
    batch = 2 if dry else 8
    start = time.time()
    print(f"device: {torch.cuda.get_device_name() if not dry else 'cpu (dry run)'}", flush=True)
    workloads = {clip: ["retrieval", "uclip", "ruir"], blip2: ["hug", "retrieval"]}
    for i, precision in enumerate(precisions()):
        for name, kinds in workloads.items():
            t = time.time()
            r = rehearse.rehearse_one(
                name,
                kinds,
                batch,
                device=device,
                autocast=AUTOCAST[precision],
                check_formats=i == 0,  # the weight formats once: they do not depend on autocast
                repeats=1 if dry else 3,
            )
            print(
                f"[{precision}] {name} ({r['params_M']}M, {r['input']}): "
                f"{_formats(r['formats'])}; {'; '.join(r['workloads'])}; "
                f"{time.time() - t:.0f}s, peak GPU {r['peak_gpu_GB']} GB, "
                f"RSS {r['peak_rss_GB']} GB",
                flush=True,
            )
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        print(
            mc_dropout_throughput(mcd_model, captions, 5, device, AUTOCAST[precision]), flush=True
        )
    print(json.dumps({"gpu_check": "ok", "seconds": round(time.time() - start)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
