"""Neighbourhood distillation: the student ranks a bank of teacher embeddings the way the teacher does.

Feature terms make the student's embedding point where the teacher's points; this term makes the student's
*similarities* to other images match the teacher's, which is what a kNN classifier and retrieval read. The
student's summary (through the teacher's projection head) and the teacher's summary are both compared with
a bank of anchors, the teacher's own L2-normalised summaries of recent images (the current batch, then a
FIFO queue of earlier batches), and the student's softmax over those similarities is trained towards the
teacher's with cross-entropy (logged as the KL divergence, 0 when the rankings agree). This is SEED (Fang
et al., ICLR 2021) and CompRess (Abbasi Koohpayegani et al., NeurIPS 2020), who found it keeps more of a
self-supervised teacher's nearest-neighbour accuracy than regressing its features. The anchors come from a
frozen teacher, so queued entries never go stale (unlike a MoCo queue of a moving encoder).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from multiteach.errors import MultiteachError
from multiteach.losses.base import LOSSES, BuildInfo, LossContext, LossTerm
from multiteach.losses.terms import required_teacher_spec


def similarity_distillation(
    student: torch.Tensor, teacher: torch.Tensor, anchors: torch.Tensor, t_temp: float, s_temp: float
) -> torch.Tensor:
    """KL divergence from the teacher's to the student's softmax over similarities to anchors.

    The cross-entropy SEED trains with, minus the teacher's entropy (a constant): the same gradient, and a
    logged value that reaches 0 when the student ranks the anchors exactly as the teacher does.

    Args:
        student: (B, D) student embeddings in the teacher's space (any norm).
        teacher: (B, D) teacher embeddings of the same images (any norm).
        anchors: (K, D) L2-normalised teacher embeddings.
        t_temp: Teacher softmax temperature (sharper = fewer neighbours matter).
        s_temp: Student softmax temperature.

    Returns:
        Scalar: mean over rows of ``sum_k p_t(k) (log p_t(k) - log p_s(k))``.
    """
    s_log = torch.log_softmax(F.normalize(student, dim=-1) @ anchors.T / s_temp, dim=-1)
    with torch.no_grad():
        t_log = torch.log_softmax(F.normalize(teacher, dim=-1) @ anchors.T / t_temp, dim=-1)
    return (t_log.exp() * (t_log - s_log)).sum(-1).mean()


def _check_number(term: str, key: str, value: Any, integer: bool = False) -> None:
    """Refuse a queue that is not an integer >= 0, or a temperature that is not a number > 0."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = is_number and (value >= 0 and int(value) == value if integer else value > 0)
    if not ok:
        allowed = "an integer >= 0" if integer else "a number > 0"
        raise MultiteachError(f"losses.{term}.{key}: {value!r} is not allowed; expected {allowed}")


@LOSSES.register("similarity")
class SimilarityTerm(LossTerm):
    """Neighbourhood (similarity-distribution) distillation of a teacher's summary embedding (SEED/CompRess).

    Recipe keys: ``teacher``; ``queue`` (teacher embeddings kept as anchors besides the current batch,
    default 4096; 0 = the batch only); ``temperature`` (teacher softmax, default 0.05) and
    ``student_temperature`` (default: the teacher's).

    The queue is a buffer: it is saved in checkpoints and restored on resume. With several processes each
    keeps its own queue of the images it saw.

    Shapes:
        student_global.summary (n_global * B, D_s) -> head -> (n_global * B, D_t);
        teachers[teacher].summary (n_global * B, D_t); anchors (n_global * B + filled queue, D_t) -> scalar.
    """

    allowed_keys = ("teacher", "queue", "temperature", "student_temperature")

    def __init__(
        self,
        name: str,
        weight: float,
        teacher: str,
        dim: int,
        queue: int = 4096,
        temperature: float = 0.05,
        student_temperature: float | None = None,
    ) -> None:
        super().__init__(name, weight)
        _check_number(name, "queue", queue, integer=True)
        _check_number(name, "temperature", temperature)
        if student_temperature is not None:
            _check_number(name, "student_temperature", student_temperature)
        self.teacher = teacher
        self.dim = dim
        self.t_temp = float(temperature)
        self.s_temp = float(student_temperature if student_temperature is not None else temperature)
        self.register_buffer("queue", torch.zeros(int(queue), dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, name: str, cfg: Mapping[str, Any], info: BuildInfo) -> SimilarityTerm:
        spec = required_teacher_spec(name, cfg, info)
        kwargs = {k: v for k, v in cfg.items() if k not in ("type", "weight")}
        return cls(name, cfg["weight"], dim=spec.summary_dim, **kwargs)

    def head_targets(self) -> dict[str, dict[str, int]]:
        return {self.teacher: {"summary": self.dim}}

    def anchors(self, batch: torch.Tensor) -> torch.Tensor:
        """(B + filled, D_t): this batch's normalised teacher embeddings, then the filled part of the queue."""
        return torch.cat([batch, self.queue[: int(self.filled)].to(batch.dtype)])

    @torch.no_grad()
    def enqueue(self, batch: torch.Tensor) -> None:
        """Push (B, D_t) normalised teacher embeddings into the FIFO queue (the newest replace the oldest)."""
        size = self.queue.shape[0]
        if size == 0:
            return
        batch = batch[-size:].to(self.queue.dtype)
        idx = (int(self.ptr) + torch.arange(batch.shape[0], device=batch.device)) % size
        self.queue[idx] = batch
        self.ptr.fill_((int(self.ptr) + batch.shape[0]) % size)
        self.filled.fill_(min(size, int(self.filled) + batch.shape[0]))

    def forward(self, ctx: LossContext) -> torch.Tensor:
        """KL divergence of the student's similarity distribution from the teacher's, over the anchors."""
        s = ctx.heads(self.teacher, "summary", ctx.student_global.summary).float()
        t = ctx.teachers[self.teacher].summary.float()
        t_n = F.normalize(t, dim=-1).detach()
        value = similarity_distillation(s, t, self.anchors(t_n), self.t_temp, self.s_temp)
        if self.training:
            self.enqueue(t_n)
        return value
