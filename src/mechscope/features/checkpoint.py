"""The checkpoint of an unfinished build, and the identity check that guards resuming and reopening.

``out/checkpoint/`` holds ``state-<batch>.safetensors`` (the running state's tensors) and
``progress.json`` naming it with its SHA-256, the contexts and batches done, and the document labels
kept examples point at. Both are written atomically, the state first: a crash at any moment leaves
the previous checkpoint valid, and a state file that ``progress.json`` does not name is ignored.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from mechscope.features.stats import RunningStats
from mechscope.features.tables import IncompatibleFeatureDBError
from mechscope.saes.formats.native import sha256, write_json_atomic, write_safetensors_atomic


def differences(want: dict, have: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(want) | set(have)):
        a, b = want.get(k), have.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def refuse(where: Path, what: str, want: dict, have: dict) -> IncompatibleFeatureDBError:
    """The error for a ``what`` in ``where`` made with another identity, naming what differs."""
    diff = differences(want, have)
    return IncompatibleFeatureDBError(
        f"{where} holds a {what} made with another {', '.join(diff[:6])}; use a new out_dir, or delete "
        f"{where} to start over"
    )


class Checkpoint:
    """``out/checkpoint/`` for a build of ``identity`` (see the module docstring)."""

    def __init__(self, root: Path, identity: dict[str, Any]):
        self.root, self.identity = root, identity

    def load(self, stats: RunningStats) -> tuple[int, int, dict[int, str]]:
        """(contexts done, batches done, document labels) and ``stats`` restored; zeros if none."""
        progress = self.root / "progress.json"
        if not progress.is_file():
            return 0, 0, {}
        p = json.loads(progress.read_text())
        if p["identity"] != self.identity:
            raise refuse(self.root, "checkpoint", self.identity, p["identity"])
        state = self.root / p["state_file"]
        if not state.is_file() or sha256(state) != p["state_sha256"]:
            raise IncompatibleFeatureDBError(
                f"{state} is missing or does not match {progress}; delete {self.root} to start over"
            )
        stats.load_state_dict(load_file(state), p["tokens"])
        return p["contexts"], p["batches"], {int(k): v for k, v in p["documents"].items()}

    def save(self, stats: RunningStats, contexts: int, batches: int, documents: dict[int, str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"state-{batches:09d}.safetensors"
        digest = write_safetensors_atomic(
            self.root / name, stats.state_dict(), {"format": "mechscope.features"}
        )
        write_json_atomic(
            self.root / "progress.json",
            {
                "identity": self.identity,
                "contexts": contexts,
                "batches": batches,
                "tokens": stats.n_tokens,
                "state_file": name,
                "state_sha256": digest,
                "documents": {str(k): v for k, v in sorted(documents.items())},
            },
        )
        for old in self.root.glob("state-*.safetensors"):
            if old.name != name:
                old.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
