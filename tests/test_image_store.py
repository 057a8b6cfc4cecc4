"""The image store on real files: durable, private, signed, and strict about what it loads."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from kernelhib.image_store import ImageError, ImageStore

KERNEL = "0f69af99-bd84-4431-a3eb-71c4e62a4ed6"


def staged(store: ImageStore, content: bytes = b"pages") -> Path:
    staging = store.stage(KERNEL)
    (staging / "pages-1.img").write_bytes(content)
    (staging / "core-1.img").write_bytes(b"core")
    return staging


def test_committed_image_loads_with_its_metadata(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    image = store.commit(staged(store), KERNEL, {"engine": "criu", "rss_bytes": 10})

    loaded = store.authenticate(store.read(KERNEL))

    assert loaded.manifest == image.manifest
    assert loaded.manifest["engine"] == "criu"
    assert loaded.bytes == len(b"pages") + len(b"core")
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    assert stat.S_IMODE((store.root / "secret.key").stat().st_mode) == 0o600
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in image.path.iterdir())


def test_staging_is_not_an_image_until_committed(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    staging = staged(store)
    assert store.kernel_ids() == []
    with pytest.raises(ImageError, match="no image of kernel"):
        store.authenticate(store.read(KERNEL))
    store.discard(staging)
    assert sorted(p.name for p in store.root.iterdir()) == ["secret.key"]


def test_an_image_is_never_overwritten(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    store.commit(staged(store), KERNEL, {"engine": "criu"})
    with pytest.raises(ImageError, match="already exists"):
        store.commit(staged(store, b"other"), KERNEL, {"engine": "criu"})
    assert (store.path(KERNEL) / "pages-1.img").read_bytes() == b"pages"


def test_another_servers_key_is_refused(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    store.commit(staged(store), KERNEL, {"engine": "criu"})
    (store.root / "secret.key").write_text("00" * 32)
    with pytest.raises(ImageError, match="not signed by this server's key"):
        (other := ImageStore(store.root)).authenticate(other.read(KERNEL))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda p: (p / "pages-1.img").write_bytes(b"PAGES"), "does not match its signed hash"),
        (lambda p: (p / "core-1.img").unlink(), "is missing"),
        (lambda p: (p / "manifest.json").write_text("{"), "unreadable"),
    ],
)
def test_altered_images_are_refused_and_kept(tmp_path: Path, tamper, message: str) -> None:
    store = ImageStore(tmp_path / "images")
    image = store.commit(staged(store), KERNEL, {"engine": "criu"})
    tamper(image.path)
    with pytest.raises(ImageError, match=message):
        store.authenticate(store.read(KERNEL))
    assert image.path.is_dir()


def test_manifest_fields_cannot_be_edited(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    image = store.commit(staged(store), KERNEL, {"engine": "criu"})
    manifest = json.loads((image.path / "manifest.json").read_text())
    manifest["engine"] = "dill"
    (image.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ImageError, match="not signed"):
        store.authenticate(store.read(KERNEL))


@pytest.mark.parametrize("bad", ["", "../etc", ".partial-x", "a/b"])
def test_kernel_ids_cannot_escape_the_store(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ImageError, match="invalid kernel id"):
        ImageStore(tmp_path / "images").path(bad)
