"""Device facts: dtype choice and the cached CPU peak used for MFU."""

import json
import time

import torch

from leantrain.device import cpu_model, peak_flops, resolve_dtype


def _key(kind):
    return f"{cpu_model()}|threads={torch.get_num_threads()}|{kind}|torch={torch.__version__}"


def test_low_cached_peak_is_replaced_on_refresh(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANTRAIN_CACHE_DIR", str(tmp_path))
    cache = tmp_path / "peak_flops.json"
    cache.write_text(json.dumps({_key("fp32"): {"flops": 1e6, "time": time.time()}}))
    cpu = torch.device("cpu")
    assert peak_flops(cpu, torch.float32)[0] == 1e6  # a fresh entry is trusted...
    refreshed, source = peak_flops(cpu, torch.float32, refresh=True)
    assert refreshed > 1e9 and "probe" in source  # ...until the trainer sees it beaten
    assert json.loads(cache.read_text())[_key("fp32")]["flops"] == refreshed
    cache.write_text(json.dumps({_key("fp32"): 5e5}))  # an older format is probed again
    assert peak_flops(cpu, torch.float32)[0] > 1e9


def test_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_dtype("fp32", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("auto", cpu) in (torch.float32, torch.bfloat16)
