"""Backbone weights, resolved in one place before anything is built.

One rule for every backbone kind: `backbone.pretrained` is null (random weights), a pretrained tag
(open_clip), a Hugging Face hub id, a local file or a local folder. `locate` finds where the
weights are (a hub id becomes its cached snapshot folder), `read` loads what the kind needs from
there (state dict, the architecture and preprocessing recorded with the weights, tokenizer files),
and after the kind has built its architecture `load_checked` puts the state dict in, reporting
missing, unexpected and mis-shaped keys by name in one paragraph.

Files are read without ever unpickling code: `torch.load(weights_only=True)`, with any other
Python object in a training checkpoint (argparse.Namespace, a config object) replaced by an inert
stand-in; safetensors; or, for OpenAI's original CLIP `.pt`, TorchScript's loader.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xmodal.backbones.config import (
    META_KEY,
    BackboneConfig,
    WeightsMismatchError,
    WeightsNotFoundError,
    hub_cache,
    hub_download_command,
    is_offline,
    offline_error,
)
from xmodal.errors import BrokenFileError, ConfigError, broken_file

log = logging.getLogger("xmodal")

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz", ".tar")
#: Weight files of a save_pretrained / open_clip hub folder, most preferred first.
FOLDER_WEIGHTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "open_clip_model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
)
FOLDER_CONFIGS = ("config.json", "open_clip_config.json")
#: Containers of a state dict inside a checkpoint: Lightning/open_clip, HUG's train.py, LAVIS.
CONTAINERS = {
    "state_dict": "training checkpoint",
    "model_state_dict": "training checkpoint",
    "model": "LAVIS-style checkpoint",
}
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
MAX_LISTED = 8


@dataclass
class Weights:
    """Where a backbone's weights come from and what was read from there."""

    source: str  # "random" | "tag" | "hub" | "file" | "folder"
    label: str  # how messages name them
    path: Path | None = None  # the local file or folder (tag, hub: in the cache)
    revision: str | None = None  # commit of a hub snapshot
    state_dict: dict[str, Tensor] | None = None
    fmt: str = ""  # what the file turned out to be, e.g. "LAVIS BLIP-2 checkpoint"
    meta: dict[str, Any] | None = None  # xmodal metadata (saved backbone config + preprocessing)
    preprocess: dict[str, Any] = field(default_factory=dict)  # pinned by the weights
    trained_quick_gelu: bool | None = None  # the activation they were trained with (None: unknown)
    model_config: dict[str, Any] | None = None  # architecture stored with them (config.json)
    tokenizer_dir: Path | None = None  # a folder with tokenizer files, if they came with one
    ignored: list[str] = field(default_factory=list)  # keys that are not this backbone's weights

    @property
    def random(self) -> bool:
        return self.source == "random"


# -- where ------------------------------------------------------------------------------------


def hub_repo(value: str) -> str | None:
    """The repo of a hub id ("org/name" or "hf-hub:org/name"), else None."""
    repo = value.removeprefix("hf-hub:")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", repo) and not repo.endswith(WEIGHT_SUFFIXES):
        return repo
    return None


def looks_like_path(value: str) -> bool:
    return (
        "/" in value
        or "\\" in value
        or value.startswith(("~", "."))
        or value.endswith(WEIGHT_SUFFIXES)
    )


def locate(cfg: BackboneConfig, is_tag: bool = False, hub_patterns: Iterable[str] = ()) -> Weights:
    """Where `cfg.pretrained` is: random, a tag (the kind finds its file), a local file or folder,
    or a hub id (downloaded into the cache when online, read from the cache when offline)."""
    value = cfg.pretrained
    if not value:
        return Weights("random", "random weights")
    path = Path(value).expanduser()
    if path.is_file():
        return Weights("file", str(path.resolve()), path.resolve())
    if path.is_dir():
        return Weights("folder", str(path.resolve()), path.resolve())
    if is_tag:
        return Weights("tag", f"pretrained tag '{value}' of {cfg.arch}")
    repo = hub_repo(value)
    if repo and not value.startswith(("./", "../", "/", "~")):
        folder, revision = hub_snapshot(repo, cfg.cache_dir, list(hub_patterns))
        return Weights("hub", f"hub {repo}@{revision[:12]}", folder, revision)
    if looks_like_path(value):
        raise missing_weights_error(cfg, path)
    raise ConfigError(
        f"backbone.pretrained={value!r} is neither an existing file or folder, nor a hub id "
        f"(org/name){', nor a pretrained tag of ' + cfg.arch if cfg.kind == 'open_clip' else ''}. "
        "Fix: set it to a local weights file/folder, a hub id, or null for random weights."
    )


def hub_snapshot(repo: str, cache_dir: str | None, patterns: list[str]) -> tuple[Path, str]:
    """The local snapshot folder of a hub repo and its commit; downloads only when online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = is_offline()
    try:
        folder = snapshot_download(
            repo, cache_dir=cache_dir, allow_patterns=patterns or None, local_files_only=offline
        )
    except LocalEntryNotFoundError:
        how = hub_download_command(repo, cache_dir)
        if offline:
            raise offline_error(f"hub weights {repo}", hub_cache(cache_dir), how) from None
        raise WeightsNotFoundError(
            f"hub weights {repo} could not be downloaded (no connection to the hub) and are not "
            f"in the local cache ({hub_cache(cache_dir)}). Fix: on a machine with internet run "
            f"`{how}`, then copy that cache here (and set HF_HUB_OFFLINE=1 to skip the network)."
        ) from None
    except OSError as err:  # repository not found, no access, network failure
        raise WeightsNotFoundError(
            f"hub weights {repo} could not be fetched ({type(err).__name__}: {err}). Fix: check "
            "the id, log in with `hf auth login` for gated repos, or download it elsewhere with "
            f"`{hub_download_command(repo, cache_dir)}` and copy the cache here."
        ) from None
    return Path(folder), Path(folder).name


def _exporting_experiments(stem: str) -> list[str]:
    """Experiments (conf/experiment/**.yaml) whose `method.export_name` writes `<stem>.pt`."""
    from xmodal.config import conf_dir

    found = []
    root = conf_dir() / "experiment"
    for path in sorted(root.rglob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        match = re.search(r"^\s*export_name:\s*(\S+)\s*$", text, re.M)
        if not match:
            continue
        pattern = re.escape(match.group(1)).replace(r"\$\{seed\}", r"\d+")
        pattern = re.sub(r"\\\$\\\{[^}]*\\\}", ".*", pattern)
        if re.fullmatch(pattern, stem):
            found.append(path.relative_to(root).with_suffix("").as_posix())
    return found


def missing_weights_error(cfg: BackboneConfig, path: Path) -> WeightsNotFoundError:
    """The paragraph for a `pretrained` path that does not exist, with the command that makes it."""
    where = path.resolve()
    fix = (
        "point backbone.pretrained at an existing weights file or folder, a hub id, "
        + ("a pretrained tag, " if cfg.kind == "open_clip" else "")
        + "or null for random weights"
    )
    producers = _exporting_experiments(path.stem)
    if producers:
        commands = " or ".join(f"`xmodal-train experiment={p}`" for p in producers)
        fix = f"it is written by {commands}: run that first (make demo does), or " + fix
    url = _known_download(cfg, path.name)
    if url:
        fix = f"download it with `curl -L -o {where} {url}`, or " + fix
    return WeightsNotFoundError(
        f"Backbone weights not found: backbone.pretrained={cfg.pretrained} ({where}) does not "
        f"exist. Expected weights of {cfg.kind} arch {cfg.arch}. Fix: {fix}."
    )


def _known_download(cfg: BackboneConfig, filename: str) -> str | None:
    from xmodal.backbones.config import MODEL_CONFIG_DIR

    spec_file = MODEL_CONFIG_DIR / f"{cfg.arch}.json"
    if cfg.kind == "open_clip" or not spec_file.is_file():
        return None
    urls = json.loads(spec_file.read_text(encoding="utf-8")).get("weights_urls", {})
    return urls.get(filename)


# -- what -------------------------------------------------------------------------------------


class _Inert:
    """Stand-in for a non-tensor object in a checkpoint: built from anything, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)`; objects it refuses become inert stand-ins (at most 20)."""
    stand_ins: list[tuple[Any, str]] = []
    for _ in range(20):
        try:
            with torch.serialization.safe_globals(stand_ins):
                try:  # mmap: reading the metadata of a large file costs nothing
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as err:
                    if "mmap" not in str(err):
                        raise
                    return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means "not a readable checkpoint"
            match = _UNSUPPORTED.search(str(err))
            if not match:
                raise
            name = match.group(1)
            stand_in = type(name.rsplit(".", 1)[-1], (_Inert,), {})
            stand_ins.append((stand_in, name))
    raise RuntimeError("more than 20 kinds of Python objects besides tensors")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.split("/", 1)[-1] == "constants.pkl" for n in archive.namelist())


def read_file(path: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None, str]:
    """Load a weights file: (state dict, xmodal metadata or None, what the file is).

    Unwraps training checkpoints (`state_dict`, `model_state_dict`, LAVIS' `model`) and strips
    DDP `module.` / torch.compile `_orig_mod.` prefixes. Anything unreadable raises
    BrokenFileError naming the file.
    """
    kinds = "a PyTorch checkpoint (torch.save), a safetensors file or a TorchScript archive"
    fix = (
        "point backbone.pretrained at a weights file (re-download or re-export it if it was "
        "truncated or overwritten)"
    )
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                obj: Any = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
                header = f.metadata() or {}
            if META_KEY in header:
                obj = {"state_dict": obj, META_KEY: json.loads(header[META_KEY])}
            fmt = "safetensors"
        elif _is_torchscript(path):  # OpenAI's original CLIP files
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
            for key in ("input_resolution", "context_length", "vocab_size"):
                obj.pop(key, None)
            fmt = "TorchScript archive"
        else:
            obj = _torch_load(path)
            fmt = "checkpoint"
    except BrokenFileError:
        raise
    except Exception as err:  # noqa: BLE001
        first = str(err).splitlines()[0][:200] if str(err) else ""
        unsafe_advice = re.search(r"weights.only|trust|arbitrary code", first, re.I)
        reason = type(err).__name__ + ("" if unsafe_advice or not first else f": {first}")
        raise broken_file(path, f"cannot be read as {kinds} ({reason}).", fix) from None
    if not isinstance(obj, Mapping):
        raise broken_file(
            path, f"holds a {type(obj).__name__}, not a state dict (a mapping of tensors).", fix
        )
    meta = obj.get(META_KEY) if isinstance(obj.get(META_KEY), Mapping) else None
    state: Any = obj
    for key, what in CONTAINERS.items():
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
            state, fmt = inner, f"{what} ('{key}')"
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        keys = ", ".join(list(map(str, obj))[:MAX_LISTED])
        raise broken_file(path, f"holds no tensors (top-level keys: {keys}).", fix)
    if meta is not None:
        fmt = "xmodal checkpoint"
    return strip_wrappers(tensors), dict(meta) if meta else None, fmt


def strip_wrappers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes of every key."""
    out = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def read_folder(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any], str]:
    """Load a save_pretrained / open_clip hub folder: (state dict, its config, config file name)."""
    config_name = next((n for n in FOLDER_CONFIGS if (folder / n).is_file()), None)
    weights = next((n for n in FOLDER_WEIGHTS if (folder / n).is_file()), None)
    if config_name is None or weights is None:
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "nothing"
        raise WeightsNotFoundError(
            f"{folder} is not a weights folder: expected a config ({' or '.join(FOLDER_CONFIGS)}) "
            f"and weights ({', '.join(FOLDER_WEIGHTS)}), found {present}. Fix: point "
            "backbone.pretrained at a folder written by save_pretrained (or a hub snapshot), or "
            "at the weights file itself."
        )
    config = json.loads((folder / config_name).read_text(encoding="utf-8"))
    files = [folder / weights]
    if weights.endswith(".index.json"):
        index = json.loads(files[0].read_text(encoding="utf-8"))
        files = [folder / n for n in sorted(set(index["weight_map"].values()))]
    state: dict[str, Tensor] = {}
    for file in files:
        if not file.is_file():
            raise WeightsNotFoundError(
                f"{folder}: the shard {file.name} named by {weights} is missing. Fix: download "
                "the folder again (every shard)."
            )
        state.update(read_file(file)[0])
    return state, config, config_name


# -- into the model ---------------------------------------------------------------------------


def align_keys(
    state: Mapping[str, Tensor], expected: Iterable[str]
) -> tuple[dict[str, Tensor], list[str]]:
    """Find the backbone inside a bigger state dict: (its keys without their common prefix, the
    keys outside it). E.g. a Lightning checkpoint of RUIR holds the backbone under `backbone.`."""
    expected = set(expected)
    if not expected or sum(k in expected for k in state) * 2 >= len(expected):
        return dict(state), []
    counts: dict[str, int] = {}
    anchors = sorted(expected, key=len, reverse=True)[:50]
    for key in state:
        for anchor in anchors:
            if key.endswith("." + anchor):
                prefix = key[: -len(anchor)]
                counts[prefix] = counts.get(prefix, 0) + 1
    if not counts:
        return dict(state), []
    prefix = max(counts, key=counts.__getitem__)
    inside = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return inside, [k for k in state if not k.startswith(prefix)]


@contextlib.contextmanager
def construction(weights: Weights) -> Iterator[None]:
    """Context for building an architecture: random init only when no weights will overwrite it
    (skipping it saves ~25 s for BLIP-2; `load_checked` then sets every parameter and buffer of
    the state dict, strictly, and non-persistent buffers are computed at construction)."""
    if weights.random:
        yield
        return
    from transformers.initialization import no_init_weights

    with no_init_weights():
        yield


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f", ... ({len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else "")


def load_checked(model: nn.Module, weights: Weights, what: str) -> None:
    """Put `weights.state_dict` into `model` (strict); any mismatch is one paragraph naming keys.

    `what` names the architecture in the message (e.g. "blip2 arch blip2-itm-vit-g").
    """
    assert weights.state_dict is not None
    expected = model.state_dict()
    state, outside = align_keys(weights.state_dict, expected)
    computed = {n for n, _ in model.named_buffers()} - set(expected)  # non-persistent buffers
    outside += [k for k in state if k in computed]  # e.g. a traced model's attention mask
    state = {k: v for k, v in state.items() if k not in computed}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(state[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_listed(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_listed(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} keys of another shape, file vs model ({_listed(shapes)})")
        raise WeightsMismatchError(
            f"{weights.label} ({weights.fmt or weights.source}) does not fit {what}: "
            f"{'; '.join(parts)}. Expected the weights of that architecture. Fix: point "
            "backbone.pretrained at weights of this architecture, or set backbone.arch to the "
            "one the weights were saved from."
        )
    model.load_state_dict(state, strict=True)
    ignored = weights.ignored + outside
    if ignored:
        log.info(
            "backbone weights %s: ignored %d keys that are not %s's (%s)",
            weights.label,
            len(ignored),
            what,
            _listed(ignored),
        )


# -- identity ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Content hash of a file, memoised on (path, size, mtime) so it is computed once."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def content_identity(path: str | Path) -> dict[str, Any]:
    """Identity of weights by content: sha256 + size of a file, or of every file of a folder
    (names included), so a moved copy keeps its key and any changed byte changes it."""
    path = Path(path).expanduser().resolve()
    if path.is_file():
        return {"sha256": file_sha256(path), "size": path.stat().st_size}
    if path.is_dir():
        digest, size = hashlib.sha256(), 0
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = file.relative_to(path).as_posix()
            if rel.startswith(".") or "/." in rel:
                continue
            real = file.resolve()  # hub snapshots link to blobs
            digest.update(f"{rel}\0{file_sha256(real)}\0".encode())
            size += real.stat().st_size
        return {"sha256": digest.hexdigest(), "size": size}
    raise WeightsNotFoundError(f"Backbone weights not found: {path} does not exist.")


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load a weights file safely: (state dict, xmodal metadata or None).

    See `read_file` (which also says what the file is).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"Backbone checkpoint file not found: {path.resolve()}.")
    state, meta, _ = read_file(path)
    return state, meta
