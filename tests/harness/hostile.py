"""What someone with write access to the bucket could plant: a pickle that runs code when loaded."""

from __future__ import annotations

import pathlib


class Touch:
    """Unpickling this creates ``path``: what a hostile pickle could do instead (any code)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))
