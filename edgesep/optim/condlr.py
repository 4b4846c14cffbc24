"""CondLR: momentum SGD that keeps low-rank layers W = U S Vᵀ orthonormal and well-conditioned.

"Robust low-rank training via approximate orthonormal constraints" (Savostianova et al., NeurIPS 2023). One step,
for each low-rank triplet (U (m x r), S (r x r), V (n x r)):

1. Riemannian gradients of U and V: the Euclidean gradient G projected onto the tangent space of the Stiefel
   manifold at U (embedded metric), ``P_U(G) = G - U sym(Uᵀ G)`` with sym(A) = (A + Aᵀ) / 2, then scaled by
   ``c``: c = 1 / a with a = ||S||_F² / r when tau = 1 (S = sqrt(a) Q, so UᵀU-directions move W at unit speed),
   and c = (sigma_min(S) / sigma_max(S))² when tau > 1 (a damping in [1 / tau², 1]).
2. Momentum (heavy ball, dampening 0) on the scaled tangent vectors; the buffer is transported to the new point
   by projecting it onto the current tangent space before it is used (projection transport).
3. Retraction: U <- qf(U - lr * d_U) with the sign-fixed QR (diag(R) >= 0), the same for V.
4. S takes a plain momentum-SGD step (with weight decay), then is conditioned: with its SVD S = P diag(s) Qᵀ and
   mu = sqrt(a) = ||S||_F / sqrt(r) (the RMS of its singular values), tau = 1 sets S <- mu P Qᵀ = sqrt(a) Q
   (Q = P Qᵀ orthogonal, the nearest orthogonal matrix to S), and tau > 1 clamps s to [mu - e, mu + e] with
   e = mu (tau - 1) / (tau + 1), so cond(S) <= (mu + e) / (mu - e) = tau.

Every other parameter takes a plain momentum-SGD step (the same update as ``torch.optim.SGD`` with dampening 0,
nesterov off). U and V get no weight decay (their norm is fixed). Retraction and conditioning run in float64 and
are cast back, so ||UᵀU - I|| stays at float32 rounding.

Parameter groups: a low-rank triplet is a group ``{"params": [U, S, V], "lowrank": True}``; ``CondLR.for_model``
builds one per layer that has ``factor_params()`` (``edgesep.layers.lowrank``) plus one plain group. The groups'
options (lr, momentum, tau, weight_decay, lowrank) are JSON-serializable, and the state is one ``momentum_buffer``
tensor per parameter, so ``state_dict()`` / ``load_state_dict()`` round-trip through safetensors + JSON (resume).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from edgesep.errors import ConfigError
from edgesep.layers.lowrank import sign_fixed_qr

__all__ = ["CondLR", "condition_core", "condlr_param_groups", "sign_fixed_qr", "stiefel_project"]


def stiefel_project(u: Tensor, g: Tensor) -> Tensor:
    """Project g (m, r) onto the tangent space of the Stiefel manifold at u (m, r), UᵀU = I (embedded metric):
    G - U sym(Uᵀ G). The result Z satisfies Uᵀ Z + Zᵀ U = 0."""
    utg = u.transpose(0, 1) @ g  # (r, r)
    return g - u @ (0.5 * (utg + utg.transpose(0, 1)))


def condition_core(s: Tensor, tau: float) -> Tensor:
    """The conditioned core: tau = 1 -> sqrt(a) Q with a = ||S||_F² / r and Q the orthogonal polar factor of S;
    tau > 1 -> singular values clamped to [mu - e, mu + e], mu = sqrt(a), e = mu (tau - 1) / (tau + 1).
    Computed in float64, returned in s's dtype. cond of the result <= tau."""
    r = s.shape[0]
    p, sv, qh = torch.linalg.svd(s.double())
    mu = sv.pow(2).sum().div(r).sqrt()  # sqrt(a), the RMS of the singular values
    if tau == 1.0:
        new = torch.full_like(sv, mu.item())
    else:
        e = mu * (tau - 1.0) / (tau + 1.0)
        new = sv.clamp(mu - e, mu + e)
    return ((p * new) @ qh).to(s.dtype)  # P diag(new) Qᵀ


def _uv_scale(s: Tensor, tau: float) -> float:
    """The U, V gradient scale: 1 / a (a = ||S||_F² / r) for tau = 1, (sigma_min / sigma_max)² of S otherwise."""
    if tau == 1.0:
        a = s.double().pow(2).sum().item() / s.shape[0]
        return 1.0 / a if a > 0 else 1.0
    sv = torch.linalg.svdvals(s.double())
    return (sv.min() / sv.max()).item() ** 2 if sv.max() > 0 else 1.0


def condlr_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """One ``{"params": [U, S, V], "lowrank": True}`` group per module with ``factor_params()``, then one plain
    group with every other parameter (empty groups are left out)."""
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for m in model.modules():
        fp = getattr(m, "factor_params", None)
        if callable(fp):
            u, s, v = fp()
            groups.append({"params": [u, s, v], "lowrank": True})
            seen.update((id(u), id(s), id(v)))
    rest = [p for p in model.parameters() if id(p) not in seen]
    if rest:
        groups.append({"params": rest, "lowrank": False})
    return groups


class CondLR(torch.optim.Optimizer):
    """CondLR (see the module docstring).

    Args:
        params: parameters or groups; a group with ``lowrank=True`` holds exactly [U, S, V] of one layer.
            ``CondLR.for_model(model, ...)`` builds them.
        lr: learning rate.
        momentum: heavy-ball momentum in [0, 1).
        tau: the bound on cond(S), >= 1 (1: S is a multiple of an orthogonal matrix).
        weight_decay: L2 added to the gradients of S and of plain parameters (not of U, V).
    Raises:
        ConfigError: bad option values or a low-rank group that is not an orthonormal-shaped triplet.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        momentum: float = 0.9,
        tau: float = 1.0,
        weight_decay: float = 0.0,
    ):
        if not lr > 0:
            raise ConfigError(f"CondLR: lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"CondLR: momentum must be in [0, 1), got {momentum}")
        if not (math.isfinite(tau) and tau >= 1.0):
            raise ConfigError(f"CondLR: tau (the bound on cond(S)) must be a finite number >= 1, got {tau}")
        if weight_decay < 0:
            raise ConfigError(f"CondLR: weight_decay must be >= 0, got {weight_decay}")
        defaults = {"lr": lr, "momentum": momentum, "tau": float(tau), "weight_decay": weight_decay, "lowrank": False}
        super().__init__(params, defaults)
        for g in self.param_groups:
            if g["lowrank"]:
                ps = g["params"]
                ok = len(ps) == 3 and ps[1].dim() == 2 and ps[1].shape[0] == ps[1].shape[1]
                ok = ok and ps[0].dim() == 2 and ps[2].dim() == 2 and ps[0].shape[1] == ps[2].shape[1] == ps[1].shape[0]
                if not ok:
                    raise ConfigError(
                        "CondLR: a lowrank group must hold [U (m, r), S (r, r), V (n, r)]; build groups with "
                        "CondLR.for_model(model) or edgesep.optim.condlr_param_groups(model)"
                    )

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs: Any) -> CondLR:
        """A CondLR over ``model``: every low-rank layer's (U, S, V) as a triplet, everything else plain SGD."""
        return cls(condlr_param_groups(model), **kwargs)

    def _buffer(self, p: Tensor, d: Tensor, momentum: float, project_on: Tensor | None = None) -> Tensor:
        """Heavy-ball buffer: b <- momentum * b + d (b projected onto the tangent space at ``project_on`` first)."""
        if momentum == 0:
            return d
        st = self.state[p]
        buf = st.get("momentum_buffer")
        if buf is None:
            buf = d.clone()
        else:
            if project_on is not None:
                buf = stiefel_project(project_on, buf)  # transport to the current tangent space
            buf = buf.mul(momentum).add_(d)
        st["momentum_buffer"] = buf
        return buf

    @torch.no_grad()
    def step(self, closure=None):
        """One CondLR step; returns the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            lr, mom, wd, tau = g["lr"], g["momentum"], g["weight_decay"], g["tau"]
            if not g["lowrank"]:
                for p in g["params"]:
                    if p.grad is None:
                        continue
                    d = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                    p.add_(self._buffer(p, d, mom), alpha=-lr)
                continue
            u, s, v = g["params"]
            scale = _uv_scale(s, tau)
            for w in (u, v):
                if w.grad is None:
                    continue
                d = stiefel_project(w, w.grad) * scale
                step = stiefel_project(w, self._buffer(w, d, mom, project_on=w))
                w.copy_(sign_fixed_qr(w - lr * step))
            if s.grad is not None:
                d = s.grad if wd == 0 else s.grad.add(s, alpha=wd)
                s.add_(self._buffer(s, d, mom), alpha=-lr)
            s.copy_(condition_core(s, tau))
        return loss
