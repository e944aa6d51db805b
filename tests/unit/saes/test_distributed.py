"""Data parallel under torchrun: two gloo processes give the one-process store (byte for byte) and SAE."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mechscope.saes.formats import load_sae

SCRIPT = Path(__file__).with_name("ddp_train_script.py")
HARVEST = Path(__file__).with_name("ddp_harvest_script.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_gloo_processes_equal_one(tmp_path):
    run([sys.executable, str(SCRIPT), str(tmp_path / "one")])
    run([*TORCHRUN, str(SCRIPT), str(tmp_path / "two")])
    one, two = load_sae(tmp_path / "one/sae"), load_sae(tmp_path / "two/sae")
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    log = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(log(tmp_path / "one"), log(tmp_path / "two"), strict=True):
        assert a["step"] == b["step"]
        assert a["fvu"] == pytest.approx(b["fvu"], rel=1e-4)
        assert a["dead_fraction"] == b["dead_fraction"]
    assert json.loads((tmp_path / "two/run.json").read_text())["world_size"] == 2


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_gloo_processes_harvest_the_one_process_store(tmp_path):
    run([sys.executable, str(HARVEST), str(tmp_path / "one")])
    run([*TORCHRUN, str(HARVEST), str(tmp_path / "two")])

    def files(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
        }

    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert sorted(one) == sorted(two)
    assert len([k for k in one if k.endswith("index.npy")]) == 6  # 45 contexts, 8 per shard
    for name in one:
        assert one[name] == two[name], name
