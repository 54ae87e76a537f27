"""pipelines/validate_precision.py --write on a stand-in data folder: what it records, per
precision that runs here, and that the rewritten file keeps its weight storage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image
from synthetic_slides import synthetic_he

from wsi_ircr.io.images import write_label_png
from wsi_ircr.model import engines
from wsi_ircr.model.checkpoint import load_checkpoint, save_checkpoint
from wsi_ircr.model.precision import native_bf16, resolve_precision

REPO = Path(__file__).resolve().parent.parent


def test_write_records_every_precision_that_ran_and_keeps_float16_storage(tmp_path):
    from model_fixtures import signal_checkpoint

    data = tmp_path / "monuseg"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    image, labels = synthetic_he((256, 256), n_nuclei=20, seed=7)
    Image.fromarray(image).save(data / "images" / "val-a.tif")
    write_label_png(data / "labels" / "val-a.png", labels)
    (data / "meta.json").write_text(json.dumps({"kumar_split": {"val": ["val-a"]}}))
    model = signal_checkpoint(tmp_path / "m.pt", image)
    save_checkpoint(model, load_checkpoint(model), weights_dtype="float16")
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "validate_precision.py"), str(model), "--data", str(data),
                           "--threads", "1", "--write"], env={**os.environ, "WSI_IRCR_CACHE": str(tmp_path / "cache")},
                          capture_output=True, text=True, cwd=REPO)
    cpu = torch.device("cpu")
    expected = {"bf16"} if native_bf16(cpu) else set()
    expected |= {"int8"} if "onnxruntime" in engines.installed_engines() else set()
    if not expected:
        assert done.returncode == 2 and done.stderr.startswith("error: --write: neither int8")
        return
    assert done.returncode == 0, done.stderr
    after = load_checkpoint(model)
    record = after.meta["precision"]["cpu"]
    assert set(record) == expected and after.weights_dtype == "float16"
    for name, entry in record.items():
        assert entry["tiles"] == "MoNuSeg Kumar validation (val-a)" and 0 <= entry["aji"] <= 1 and 0 <= entry["fp32_aji"] <= 1
    if "bf16" in record:  # auto follows the record: bf16 only where it was within the tolerance
        proven = record["bf16"]["aji"] >= record["bf16"]["fp32_aji"] - 0.005
        assert (resolve_precision("auto", cpu, after) == "bf16") == proven
