"""The image store on real files: durable, private, signed, and strict about what it loads."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from kernelhib import image_store
from kernelhib.image_store import ImageError, ImageStore, claim
from kernelhib.paths import UnsafeDirectory

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
    assert sorted(p.name for p in store.root.iterdir()) == [".chunks", "secret.key"]


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


def test_read_signed_checks_the_signature_without_hashing_files(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    image = store.commit(staged(store), KERNEL, {"engine": "criu", "cwd": "/home/me"})
    (image.path / "pages-1.img").write_bytes(b"PAGES")  # found only by authenticate

    assert store.read_signed(KERNEL).manifest["cwd"] == "/home/me"

    manifest = json.loads((image.path / "manifest.json").read_text())
    manifest["cwd"] = "/root"
    (image.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ImageError, match="not signed by this server's key"):
        store.read_signed(KERNEL)
    (image.path / "manifest.json").write_text("[]")
    with pytest.raises(ImageError, match="not a JSON object"):
        store.read_signed(KERNEL)
    assert image.path.is_dir()


def test_restore_dir_holds_exactly_the_signed_files(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    staging = staged(store)
    (staging / "dill").mkdir()
    (staging / "dill" / "snapshot.pkl").write_bytes(b"pickle")
    image = store.commit(staging, KERNEL, {"engine": "criu"})
    for extra in ("remap-fpath.img", "sk-queues.img", "restore.log", "dill/state.json"):
        (image.path / extra).write_bytes(b"planted")

    linked = store.restore_dir(store.authenticate(store.read(KERNEL)))

    assert linked.parent == store.root and linked.name.startswith(".")
    files = {str(p.relative_to(linked)) for p in linked.rglob("*") if p.is_file()}
    assert (
        files == set(image.manifest["files"]) == {"core-1.img", "pages-1.img", "dill/snapshot.pkl"}
    )
    # The very files that were checked: links, not copies.
    assert all((linked / name).samefile(image.path / name) for name in files)
    assert stat.S_IMODE(linked.stat().st_mode) == 0o700
    assert store.kernel_ids() == [KERNEL]
    store.sweep()  # as a server starting after a crash mid-restore does
    assert not linked.exists()
    assert (image.path / "pages-1.img").read_bytes() == b"pages"


def test_restore_dir_of_an_image_missing_a_file_is_refused_and_left_nowhere(
    tmp_path: Path,
) -> None:
    store = ImageStore(tmp_path / "images")
    image = store.commit(staged(store), KERNEL, {"engine": "criu"})
    (image.path / "pages-1.img").unlink()  # pages are checked while CRIU restores
    with pytest.raises(ImageError, match=r"pages-1\.img is missing"):
        store.restore_dir(store.read_signed(KERNEL))
    assert sorted(p.name for p in store.root.iterdir()) == [".chunks", KERNEL, "secret.key"]


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"abcd\n", "is damaged"), (b"zz" * 32, "is damaged")],
)
def test_a_key_that_is_not_whole_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "images").mkdir(mode=0o700)
    (tmp_path / "images" / "secret.key").write_bytes(content)
    with pytest.raises(ImageError, match=rf"secret.key {message}: .* remove it and restart"):
        ImageStore(tmp_path / "images")


def test_a_planted_key_is_refused(tmp_path: Path) -> None:
    root = ImageStore(tmp_path / "images").root
    key = root / "secret.key"
    (tmp_path / "attacker.key").write_text("00" * 32)
    key.unlink()
    key.symlink_to(tmp_path / "attacker.key")
    with pytest.raises(ImageError, match=r"secret\.key: it is a symbolic link"):
        ImageStore(root)
    if os.geteuid() == 0:
        key.unlink()
        key.write_text("00" * 32)
        os.chown(key, 65534, 65534)
        with pytest.raises(ImageError, match=r"owner uid 65534\).* planted"):
            ImageStore(root)


def test_the_key_is_durable_before_it_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsynced under another name, linked into place, then its directory fsynced:
    a power loss leaves a whole key or none, never an empty one."""
    root = tmp_path / "images"
    events: list[str] = []
    real_fsync = os.fsync

    def file_fsync(fd: int) -> None:
        events.append("file" if (root / "secret.key").exists() else "file before link")
        real_fsync(fd)

    def dir_fsync(path: Path) -> None:
        events.append(f"{path.name} with key" if (root / "secret.key").exists() else path.name)

    monkeypatch.setattr(image_store.os, "fsync", file_fsync)
    monkeypatch.setattr(image_store, "fsync", dir_fsync)
    store = ImageStore(root)
    assert events == ["file before link", "images with key"]
    assert len((root / "secret.key").read_text()) == 64
    root.joinpath(".partial-secret.key.1234abcd").write_text("")  # a crash mid-write
    store.sweep()
    assert sorted(p.name for p in root.iterdir()) == [".chunks", "secret.key"]


def test_commit_makes_every_directory_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ImageStore(tmp_path / "images")
    staging = staged(store)
    (staging / "dill" / "arrays").mkdir(parents=True)
    (staging / "dill" / "arrays" / "0.npy").write_bytes(b"array")
    synced: list[Path] = []
    monkeypatch.setattr(image_store, "fsync", lambda path: synced.append(path))

    store.commit(staging, KERNEL, {"engine": "criu"})

    assert {staging / "dill", staging / "dill" / "arrays", staging, store.root} <= set(synced)
    assert staging / "dill" / "arrays" / "0.npy" in synced


def test_retiring_an_image_is_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A woken or shut down kernel's image must not come back after a power loss."""
    store = ImageStore(tmp_path / "images")
    store.commit(staged(store), KERNEL, {"engine": "criu"})
    synced: list[tuple[Path, bool]] = []
    monkeypatch.setattr(
        image_store, "fsync", lambda path: synced.append((path, store.path(KERNEL).exists()))
    )

    retired = store.retire(KERNEL)
    assert synced == [(store.root, False)]
    store.discard(retired)

    store.commit(staged(store), KERNEL, {"engine": "criu"})
    synced.clear()
    store.discard(KERNEL)  # a kernel shut down while hibernated
    assert (store.root, False) in synced
    assert store.kernel_ids() == []
    assert sorted(p.name for p in store.root.iterdir()) == [".chunks", "secret.key"]


def test_a_symlinked_image_dir_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o755)
    (tmp_path / "images").symlink_to(target)
    with pytest.raises(UnsafeDirectory, match=r"images is a symbolic link .*elsewhere"):
        ImageStore(tmp_path / "images")
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert list(target.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_an_image_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir(mode=0o700)
    os.chown(tmp_path / "images", 65534, 65534)
    with pytest.raises(UnsafeDirectory, match="belongs to uid 65534, not to this server's uid 0"):
        ImageStore(tmp_path / "images")
    assert list((tmp_path / "images").iterdir()) == []


def test_an_image_dir_others_may_write_is_refused_and_a_readable_one_made_private(
    tmp_path: Path,
) -> None:
    (tmp_path / "images").mkdir()
    os.chmod(tmp_path / "images", 0o777)
    with pytest.raises(UnsafeDirectory, match=r"writable by other users \(mode 777\).*chmod 700"):
        ImageStore(tmp_path / "images")
    assert list((tmp_path / "images").iterdir()) == []

    os.chmod(tmp_path / "images", 0o755)
    assert stat.S_IMODE(ImageStore(tmp_path / "images").root.stat().st_mode) == 0o700


def test_a_planted_lock_file_link_is_not_followed(tmp_path: Path) -> None:
    root = ImageStore(tmp_path / "images").root
    (root / "server.lock").symlink_to(tmp_path / "created-by-root")
    with pytest.raises(OSError, match=r"server\.lock"):
        claim(root)
    assert not (tmp_path / "created-by-root").exists()
