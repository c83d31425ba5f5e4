"""Export a `leantrain compress` int8 / int8-dynamic / int4 / convert output as a Hugging Face folder that
transformers loads as the same quantized model.

The weights are torchao's flattened tensors (int data, scales, zero points) in model.safetensors with torchao's
description in the safetensors metadata, and config.json carries `quantization_config` in transformers'
`TorchAoConfig` form (quant_method "torchao"): `AutoModelForCausalLM.from_pretrained(DIR)` rebuilds the
torchao tensors without re-quantizing (tests/test_compress.py checks the logits match). int4 is written as
torchao keeps it in memory (one value per int8), since that is the form transformers reads back; the
compressed run folder itself packs two values per byte. Formats no consumer reads quantized this way
(ONNX, GGUF, PEFT, GPT-2's and Phi-3's fused layouts) are refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from leantrain.errors import ConfigError

READABLE_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def check_quantized_export(run_dir: str | Path, method: str, format: str, dtype: str | None,
                           quantize: str | None) -> None:
    """Refuse, before anything is read or written, the combinations no consumer reads."""
    from leantrain.config import load_config

    if format != "hf":
        raise ConfigError(f"{run_dir} is quantized by torchao ({method}) and --format {format} cannot carry torchao "
                          "tensors; export it with --format hf (transformers loads it), or export the source run "
                          f"with --format {format}" + (" --quantize int8" if format == "onnx" else
                                                      " --quantize q8_0" if format == "gguf" else ""))
    if dtype is not None or quantize is not None:
        raise ConfigError(f"{run_dir} is quantized already ({method}); drop --dtype/--quantize (the weights keep "
                          "their quantized form)")
    cfg = load_config(Path(run_dir) / "config.toml")
    if cfg.model.arch not in READABLE_ARCHS or cfg.model.moe_experts:
        raise ConfigError(f"{run_dir} is quantized ({method}) and its architecture ({cfg.model.arch}"
                          f"{', mixture of experts' if cfg.model.moe_experts else ''}) fuses or regroups weights in "
                          "the Hugging Face layout, which quantized tensors cannot be; export the source run instead")


def export_quantized_hf(run_dir: str | Path, out_dir: str | Path, method: str, checkpoint: str | Path | None = None,
                        overwrite: bool = False) -> dict[str, Any]:
    """Write the quantized run as a transformers folder (see the module docstring); returns a summary."""
    from leantrain.model.quant import import_torchao

    import_torchao()
    from safetensors.torch import save
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    from transformers import TorchAoConfig

    from leantrain.export.hf import check_export_target, mark_export, publish, write_hf_folder
    from leantrain.files import write_durable
    from leantrain.model.hf import to_hf
    from leantrain.model.quant import torchao_config
    from leantrain.train.runs import load_trained

    out = Path(out_dir)
    check_export_target(out, run_dir, overwrite)
    model, tok, cfg, step, warnings = load_trained(run_dir, checkpoint)
    scheme = cfg.quant.qat if method == "convert" else method
    group = json.loads((Path(run_dir) / "compression.json").read_text()).get("settings", {}).get("group_size") or 32
    quant_config = TorchAoConfig(quant_type=torchao_config(scheme, group, qat=method == "convert")).to_dict()

    def fill(folder: Path) -> list[str]:
        files = write_hf_folder(folder, {}, tok, cfg, run_dir, "fp32")  # config, tokenizer; weights next
        flat, meta = flatten_tensor_state_dict(to_hf(model.state_dict(), cfg.model))
        tensors = {k: v.detach().cpu().contiguous() for k, v in flat.items()}
        write_durable(folder / "model.safetensors", save(tensors, metadata={"format": "pt", **meta}), sync_dir=False)
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = quant_config
        write_durable(folder / "config.json", json.dumps(config, indent=2), sync_dir=False)
        mark_export(folder, f"hf-torchao-{method}", step, run_dir)
        return files

    files = publish(out, fill)
    return {"out_dir": str(out), "step": step, "arch": cfg.model.arch, "files": sorted(files),
            "dtype": f"torchao {scheme}", "params": sum(p.numel() for p in model.parameters()), "warnings": warnings}
