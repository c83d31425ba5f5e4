"""Small test helpers shared by several test files."""

from leantrain.config import load_config


def tiny_config(data_path, **over):
    """The tests' tiny model on `data_path`; `section__key=value` overrides any field."""
    base = {
        "model": {"n_layers": 2, "dim": 64, "n_heads": 4, "n_kv_heads": 2, "seq_len": 64, "vocab_size": 512},
        "data": {"path": str(data_path)},
        "train": {"steps": 12, "micro_batch_size": 4, "eval_every": 6, "eval_steps": 2, "sample_tokens": 0},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "precision": {"dtype": "fp32"},
        "checkpoint": {"every": 6, "keep": 2},
        "log": {"every": 1, "progress": "none"},
    }
    for dotted, value in over.items():
        section, key = dotted.split("__")
        base.setdefault(section, {})[key] = value
    return load_config(overrides=base)


class StopAt:
    """An observer that asks the trainer to stop after a step, as SIGTERM would."""

    def __init__(self, trainer, step):
        self.trainer, self.step = trainer, step

    def on_step(self, r):
        if r["step"] == self.step:
            self.trainer.request_stop("SIGTERM")

    def on_event(self, e):
        self.on_step(e)

    def on_end(self, s):
        pass
