"""Knowledge distillation: a trained teacher's softened logits as an extra target for the student.

The student's loss becomes alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE
(Hinton et al. 2015; T^2 keeps the KL term's gradients on the scale of the cross-entropy's as T grows).
The teacher is loaded once, in eval mode with no gradients, and runs whole on every process. Its output
projection is taken off (`output` becomes the identity) so its forward returns hidden states, and its
logits are made `distill.chunk` positions at a time, only as many as the loss needs at once: a large
vocabulary's teacher logits never exist for a whole batch. The student's logits are whole (its backward
needs them); the float32 copies the loss works on are per chunk too.

Teacher and student must share the tokenizer: the same token ids mean the same strings, or the KL
term would teach the student nonsense. A teacher with another vocabulary is refused before any folder
is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leantrain.config import Config
from leantrain.errors import ConfigError


def check_teacher(teacher_dir: str | Path, teacher_cfg: Config, student_cfg: Config) -> None:
    """Refuse a teacher whose tokenizer, vocabulary or context does not match the student's data."""
    from tokenizers import Tokenizer

    teacher_tok = Path(teacher_dir) / "tokenizer.json"
    student_tok = Path(student_cfg.data.path) / "tokenizer.json"
    if not teacher_tok.is_file():
        raise ConfigError(f"distill.teacher {teacher_dir} has no tokenizer.json; give a leantrain run folder")
    same = teacher_tok.read_bytes() == student_tok.read_bytes() or (
        Tokenizer.from_file(str(teacher_tok)).get_vocab() == Tokenizer.from_file(str(student_tok)).get_vocab())
    if not same:
        raise ConfigError(f"distill.teacher {teacher_dir} was trained with another tokenizer than {student_tok}; "
                          "distill on data prepared with the teacher's tokenizer (data prepare --tokenizer TEACHER)")
    tv, sv = teacher_cfg.model.vocab_size, student_cfg.model.vocab_size
    if tv != sv:
        raise ConfigError(f"distill.teacher has model.vocab_size = {tv} but the student {sv}; set "
                          f"--model.vocab_size={tv} so both score the same tokens")
    if teacher_cfg.model.seq_len < student_cfg.model.seq_len:
        raise ConfigError(f"distill.teacher reads at most {teacher_cfg.model.seq_len} tokens but the student's "
                          f"model.seq_len = {student_cfg.model.seq_len}; lower model.seq_len to it")


class Distiller:
    """The teacher and the distillation loss; `loss` replaces the student's cross-entropy in the step."""

    def __init__(self, teacher: nn.Module, cfg: Config):
        self.temperature, self.alpha, self.chunk = cfg.distill.temperature, cfg.distill.alpha, cfg.distill.chunk
        self.teacher = teacher.eval().requires_grad_(False)
        self.out_weight = teacher.output.weight  # the tied embedding or its own head
        self.teacher.output = nn.Identity()  # forward now returns the final normed hidden states
        self._ce = self._kl = self._n = 0.0

    @classmethod
    def of(cls, cfg: Config, device: torch.device) -> Distiller | None:
        """The run's distiller (teacher loaded and checked), or None without distill.teacher."""
        if not cfg.distill.teacher:
            return None
        from leantrain.train.runs import load_trained

        teacher_dir = Path(cfg.distill.teacher)
        if not (teacher_dir / "config.toml").is_file():
            raise ConfigError(f"distill.teacher {teacher_dir} is not a leantrain run folder (no config.toml); pass "
                              "the folder `leantrain train` printed")
        model, _, teacher_cfg, _, _ = load_trained(teacher_dir, device=device)
        check_teacher(teacher_dir, teacher_cfg, cfg)
        return cls(model, cfg)

    def loss(self, student: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The summed distillation objective of one micro-batch (the trainer divides by the step's targets)."""
        logits = student(x)
        with torch.no_grad():
            hidden = self.teacher(x)
        T, chunk = self.temperature, self.chunk or x.size(1)
        ce_sum = kl_sum = logits.new_zeros((), dtype=torch.float32)
        for start in range(0, x.size(1), chunk):
            s = logits[:, start:start + chunk].float().flatten(0, 1)
            t_part = y[:, start:start + chunk].flatten()
            with torch.no_grad():
                t = F.linear(hidden[:, start:start + chunk], self.out_weight.to(hidden.dtype)).float().flatten(0, 1)
                t_logp = F.log_softmax(t if T == 1 else t / T, dim=-1)
                t_p = t_logp.exp()
                neg_entropy = (t_p * t_logp).sum(-1)
            valid = (t_part != -100).float()
            ce_sum = ce_sum + F.cross_entropy(s, t_part, ignore_index=-100, reduction="sum")
            # KL(p_t || p_s) = cross-entropy against the teacher's probabilities - the teacher's entropy: one fused
            # op on the student's side (a third faster than kl_div over log-probabilities on CPU)
            kl = F.cross_entropy(s if T == 1 else s / T, t_p, reduction="none") + neg_entropy
            kl_sum = kl_sum + (kl * valid).sum()
        self._ce += ce_sum.detach()
        self._kl += kl_sum.detach()
        self._n += int((y != -100).sum())
        return self.alpha * T * T * kl_sum + (1 - self.alpha) * ce_sum

    def metrics(self) -> dict[str, Any]:
        """Mean cross-entropy and KL per target token since the last call (this process's micro-batches)."""
        if not self._n:
            return {}
        out = {"distill_ce": round(float(self._ce) / self._n, 6), "distill_kl": round(float(self._kl) / self._n, 6)}
        self._ce = self._kl = self._n = 0.0
        return out
