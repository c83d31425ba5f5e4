"""Small test helpers shared by several test files."""

import torch

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


def stop_then_resume(cfg, run_dir, at: int):
    """Train `cfg` into `run_dir`, stopped after step `at` as SIGTERM would, then resume it to the end;
    returns the resumed Trainer."""
    from leantrain.train.trainer import Trainer

    first = Trainer(cfg, run_dir)
    first.observers.append(StopAt(first, at))
    assert first.fit()["step"] == at
    second = Trainer(cfg, run_dir)
    assert second.step == at
    second.fit()
    return second


class Tied(torch.nn.Module):
    """A tiny module with tied weights (embedding = output), the case checkpoint formats get wrong."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.out = torch.nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight
        self.mid = torch.nn.Linear(4, 4)


def trained_tied(seed: int = 0, steps: int = 3) -> tuple[Tied, torch.optim.Optimizer]:
    """A `Tied` and its AdamW after `steps` updates, so the optimizer has state to save."""
    torch.manual_seed(seed)
    m = Tied()
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    for _ in range(steps):
        m.out(m.mid(m.emb(torch.arange(10)))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return m, opt
