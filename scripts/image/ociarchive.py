"""Read an OCI image archive (what `buildah push oci-archive:` writes) without a container engine.

`make image` prints the sizes with `describe`; the image tests (tests/image/) read the
configuration and unpack the root file system with the same code, so what is measured and what
is tested is one reading of one file. Standard library only: it runs before any venv exists.

    python scripts/image/ociarchive.py describe dist/meshlet-0.1.0.oci.tar
    python scripts/image/ociarchive.py unpack dist/meshlet-0.1.0.oci.tar /tmp/rootfs
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

REF_NAME = "org.opencontainers.image.ref.name"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int  # compressed, as stored and as a registry sends it
    media_type: str


@dataclass(frozen=True)
class Image:
    path: Path
    name: str  # the reference a cluster stores it under once imported
    config: dict  # the OCI image config's `config` (User, Env, Entrypoint, Cmd, Labels...)
    layers: tuple[Layer, ...]

    @property
    def compressed_size(self) -> int:
        return sum(layer.size for layer in self.layers)


def _blob(archive: tarfile.TarFile, digest: str):
    algorithm, _, value = digest.partition(":")
    member = archive.extractfile(f"blobs/{algorithm}/{value}")
    if member is None:
        raise ValueError(f"blob {digest} missing")
    return member


def read(path: str | os.PathLike) -> Image:
    """The one image in an archive; ValueError names what is missing or not one image."""
    path = Path(path)
    with tarfile.open(path) as archive:
        index = json.load(archive.extractfile("index.json"))
        manifests = index.get("manifests", [])
        if len(manifests) != 1:
            raise ValueError(f"{path}: expected one image in index.json, found {len(manifests)}")
        entry = manifests[0]
        manifest = json.load(_blob(archive, entry["digest"]))
        config = json.load(_blob(archive, manifest["config"]["digest"]))
    layers = tuple(Layer(d["digest"], d["size"], d["mediaType"]) for d in manifest["layers"])
    return Image(path, entry.get("annotations", {}).get(REF_NAME, ""), config.get("config", {}), layers)


def _safe(name: str) -> PurePosixPath:
    relative = PurePosixPath(name.lstrip("/"))
    if ".." in relative.parts:
        raise ValueError(f"layer member {name!r} leaves the root file system")
    return relative


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _apply(layer: tarfile.TarFile, dest: Path) -> None:
    """One layer over `dest`: whiteouts delete what lower layers put there (OCI image spec)."""
    for member in layer:
        relative = _safe(member.name)
        target = dest / relative
        if relative.name == OPAQUE:
            for child in target.parent.iterdir():
                _remove(child)
            continue
        if relative.name.startswith(WHITEOUT):
            _remove(target.parent / relative.name[len(WHITEOUT):])
            continue
        if not (member.isdir() and target.is_dir()):
            _remove(target)
        layer.extract(member, dest, set_attrs=True, numeric_owner=True, filter="fully_trusted")


def unpack(path: str | os.PathLike, dest: str | os.PathLike) -> Image:
    """The image's root file system into `dest` (owners kept when run as root)."""
    image = read(path)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dest.chmod(0o755)  # layers need not carry the root directory itself; a runtime's root is 0755
    with tarfile.open(image.path) as archive:
        for layer in image.layers:
            with tarfile.open(fileobj=_blob(archive, layer.digest), mode="r|*") as stream:
                _apply(stream, dest)
    return image


def describe(image: Image) -> str:
    layers = " + ".join(f"{layer.size / 1e6:.1f}" for layer in image.layers)
    return f"{image.name}: {image.compressed_size / 1e6:.1f} MB compressed ({layers} MB layers), {image.path}"


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "describe":
        for path in argv[1:]:
            print(describe(read(path)))
        return 0
    if len(argv) == 3 and argv[0] == "unpack":
        print(describe(unpack(argv[1], argv[2])))
        return 0
    print("usage: ociarchive.py describe ARCHIVE... | unpack ARCHIVE DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
