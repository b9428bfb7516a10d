"""Image references (files and tar members) and the corrupt-image policy of ImageDataset."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from xmodal.data import images
from xmodal.data.images import CorruptImageError, ImageDataset, open_image, tar_ref


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A tiny fixed-size transform (resize to 4x4, CHW float)."""
    img = img.resize((4, 4))
    return torch.tensor(list(img.getdata()), dtype=torch.float32).T.reshape(3, 4, 4) / 255


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path | str]:
    good = tmp_path / "good.png"
    Image.new("RGBA", (6, 5), (10, 20, 30, 255)).save(good)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    truncated = tmp_path / "truncated.jpg"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 0, 0)).save(buf, format="JPEG")
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    shard = tmp_path / "0.tar"
    with tarfile.open(shard, "w") as tar:
        data = good.read_bytes()
        info = tarfile.TarInfo("000001.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return {
        "good": good,
        "corrupt": corrupt,
        "truncated": truncated,
        "missing": tmp_path / "missing.jpg",
        "tar": tar_ref(shard, "000001.png"),
        "tar_missing": tar_ref(shard, "nope.png"),
    }


def test_open_image_file_and_tar_member_are_rgb_and_equal(files: dict) -> None:
    a, b = open_image(files["good"]), open_image(files["tar"])
    assert a.mode == b.mode == "RGB" and a.size == (6, 5)
    assert list(a.getdata()) == list(b.getdata())
    assert any(key[1] == str(files["tar"]).split("::")[0] for key in images._TARS)


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "missing", "tar_missing"])
def test_open_image_errors_name_the_file(files: dict, kind: str) -> None:
    with pytest.raises(CorruptImageError, match="cannot read image") as err:
        open_image(files[kind])
    assert str(files[kind]) in str(err.value)


def test_dataset_fail_names_file_and_switch(files: dict) -> None:
    ds = ImageDataset([files["good"], files["corrupt"]], to_tensor)
    index, tensor, valid = ds[0]
    assert (index, tuple(tensor.shape), valid) == (0, (3, 4, 4), True)
    with pytest.raises(CorruptImageError) as err:
        ds[1]
    assert str(files["corrupt"]) in str(err.value) and "data.on_corrupt=skip" in str(err.value)


def test_dataset_skip_yields_zero_tensor_and_invalid(files: dict) -> None:
    refs = [files["corrupt"], files["good"], files["truncated"], files["tar"], files["missing"]]
    ds = ImageDataset(refs, to_tensor, on_corrupt="skip")
    items = [ds[i] for i in range(len(ds))]
    assert [valid for _, _, valid in items] == [False, True, False, True, False]
    assert all(t.shape == (3, 4, 4) for _, t, _ in items)
    assert all(not t.any() for _, t, v in items if not v)
    assert torch.equal(items[1][1], items[3][1])
    batch = torch.utils.data.default_collate(items)
    assert batch[2].tolist() == [False, True, False, True, False]


def test_dataset_rejects_unknown_policy(files: dict) -> None:
    with pytest.raises(ValueError, match="on_corrupt"):
        ImageDataset([files["good"]], to_tensor, on_corrupt="ignore")
