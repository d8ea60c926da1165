"""What a site checks about a model, its loss and the clipping mode before a DP round.

``check_dp_model`` runs before the privacy ledger is charged, so everything
that would make the round's update leak more than the charged Gaussian
mechanism (or crash after the charge) stops the round first:

* **no private state leaves**: every buffer travels to the server in the
  ``state_dict``; a buffer that training changes (BatchNorm's running stats,
  InstanceNorm with ``track_running_stats``, any custom buffer a forward pass
  updates) is computed on private batches without noise, and BatchNorm in any
  form also mixes samples, so a per-sample gradient no longer exists;
* **the loss is a mean of per-sample terms**, so that ``loss * len(batch)`` is
  the sum DP-SGD clips: class weights (``CrossEntropyLoss(weight=...)``)
  renormalise by the batch's total weight, a custom ``ignore_index`` by the
  batch's count, and losses not known to be per-sample are refused;
* **the clipping mode computes true per-sample gradients**: the structural
  rules of book-keeping clipping (``bookkeeping.unsupported_reason``), then a
  probe: on a synthetic batch of the model's input shape, the chosen mode's
  per-sample gradients are compared with a per-example loop. ``auto`` takes
  book-keeping when it passes, else Opacus's hooks, else expanded weights;
  an explicitly requested mode that fails is an error.

The probe uses only the shape and dtype of ``example_input`` (never its
values), so whether a round is refused does not depend on private data.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from opacus import GradSampleModule
from torch import nn

from fedmeta.data.tasks.base import SampleMSELoss
from fedmeta.privacy.bookkeeping import BookKeepingClipper, BookKeepingError, unsupported_reason

EW_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.LayerNorm, nn.GroupNorm)
MODES = ("auto", "bk", "hooks", "ew", "functorch", "ghost")
PROBE_BATCH = 3
#: losses whose reduction='mean' value is the mean of one term per sample
PER_SAMPLE_LOSSES = (
    nn.CrossEntropyLoss,
    nn.NLLLoss,
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    SampleMSELoss,
)
NORM_FIX = "replace it with GroupNorm or LayerNorm (no running statistics)"


class DPModelError(ValueError):
    """The model, loss or clipping mode cannot be trained under DP (one line, names the fix)."""


def check_dp_model(
    model: nn.Module, loss_fn: nn.Module, requested_mode: str, example_input: torch.Tensor
) -> str:
    """The grad-sample mode to train ``model`` with under DP, or DPModelError.

    ``example_input`` is one batch (or one record with its batch dimension)
    of the model's input; only its shape and dtype are used. The verdict is
    remembered per architecture (module types and their public plain-valued
    attributes, parameter shapes and trainable flags, buffers, loss, mode,
    input shape): a site checks its model once per process, not once per
    round. A custom module whose forward depends on anything else (globals,
    tensors held outside parameters and buffers) is outside this key.
    """
    example_input = torch.as_tensor(example_input)
    key = _structure_key(model, loss_fn, requested_mode, example_input)
    verdict = _VERDICTS.get(key)
    if verdict is None:
        try:
            verdict = _check(model, loss_fn, requested_mode, example_input)
        except DPModelError as exc:
            verdict = exc
        if len(_VERDICTS) < 64:
            _VERDICTS[key] = verdict
    if isinstance(verdict, DPModelError):
        raise DPModelError(str(verdict))
    return verdict


_VERDICTS: dict[tuple, str | DPModelError] = {}


def _structure_key(model: nn.Module, loss_fn: nn.Module, mode: str, example: torch.Tensor) -> tuple:
    # classes themselves (not their names: two classes of one name stay apart)
    modules = tuple((n, type(m), _settings(m)) for n, m in model.named_modules())
    params = tuple(
        (n, p.shape, p.requires_grad, p.dtype, p.device) for n, p in model.named_parameters()
    )
    buffers = tuple((n, b.shape) for n, b in model.named_buffers())
    loss = (type(loss_fn), _settings(loss_fn), getattr(loss_fn, "weight", None) is not None)
    key = (
        type(model),
        modules,
        params,
        buffers,
        loss,
        mode,
        tuple(example.shape[1:]),
        example.dtype,
    )
    try:
        hash(key)
    except TypeError:  # a settings tuple holding a list or dict: compare its text
        return (repr(key),)
    return key


_PLAIN = (bool, int, float, str, tuple, type(None))


def _settings(obj: object) -> tuple:
    """An object's public plain-valued attributes (a layer's settings, a custom flag), by
    name in the order the object set them: an attribute set in another order only
    misses the cache (a fresh check), never hits a wrong verdict. ``(type, value)``
    pairs, so that 1, 1.0 and True stay apart."""
    return tuple(
        (k, type(v), v) for k, v in vars(obj).items() if k[0] != "_" and isinstance(v, _PLAIN)
    )


def _check(
    model: nn.Module, loss_fn: nn.Module, requested_mode: str, example_input: torch.Tensor
) -> str:
    if requested_mode not in MODES:
        raise DPModelError(f"grad-sample-mode {requested_mode!r}: use one of {', '.join(MODES)}")
    if not any(p.requires_grad for p in model.parameters()):
        raise DPModelError("the model has no trainable parameter; nothing to train under DP")
    check_loss(loss_fn)
    probe = _probe_input(example_input)
    check_buffers(model, probe)
    if requested_mode in ("bk", "auto"):
        reason = bk_problem(model, probe)
        if reason is None:
            return "bk"
        if requested_mode == "bk":
            raise DPModelError(
                f"book-keeping clipping: {reason}; use grad-sample-mode auto or hooks"
            )
        for mode in _fallbacks(model):
            if opacus_problem(model, probe, mode) is None:
                return mode
        problem = opacus_problem(model, probe, "hooks")
        raise DPModelError(
            f"no clipping mode computes this model's per-sample gradients "
            f"({reason}; Opacus hooks: {problem}); use standard layers"
        )
    if requested_mode in ("hooks", "ew"):
        problem = opacus_problem(model, probe, requested_mode)
        if problem is not None:
            raise DPModelError(
                f"grad-sample-mode {requested_mode}: {problem}; use grad-sample-mode auto"
            )
    return requested_mode


def _fallbacks(model: nn.Module) -> tuple[str, ...]:
    """Opacus's expanded weights first where all trainable layers are standard (faster)."""
    trainable = [
        m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    return ("ew", "hooks") if all(type(m) in EW_LAYERS for m in trainable) else ("hooks", "ew")


# ---- loss ---------------------------------------------------------------------
def check_loss(loss_fn: nn.Module) -> None:
    """DPModelError unless ``loss_fn`` is a mean of one term per sample."""
    name = type(loss_fn).__name__
    if not isinstance(loss_fn, PER_SAMPLE_LOSSES):
        raise DPModelError(
            f"loss {name} is not known to be a mean of per-sample terms; use "
            "CrossEntropyLoss, MSELoss, BCEWithLogitsLoss or another torch "
            "per-sample loss"
        )
    if getattr(loss_fn, "reduction", None) != "mean":
        raise DPModelError(
            f"loss {name}(reduction={loss_fn.reduction!r}): DP training needs "
            "reduction='mean' (the batch's sum is taken from it)"
        )
    if getattr(loss_fn, "weight", None) is not None:
        raise DPModelError(
            f"loss {name}(weight=...): class or element weights make the loss "
            "depend on the whole batch; drop weight= (resample or use "
            "per-sample losses instead)"
        )
    if isinstance(loss_fn, nn.CrossEntropyLoss | nn.NLLLoss) and loss_fn.ignore_index != -100:
        raise DPModelError(
            f"loss {name}(ignore_index={loss_fn.ignore_index}): ignored labels "
            "make the mean depend on the batch; drop ignore_index"
        )


# ---- buffers --------------------------------------------------------------------
def check_buffers(model: nn.Module, probe: torch.Tensor) -> None:
    """DPModelError for any state a training step computes from private data."""
    for name, m in model.named_modules():
        label = f"layer {name or '<model>'!r} ({type(m).__name__})"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise DPModelError(
                f"{label}: BatchNorm mixes samples and its running statistics "
                f"leave the site without noise; {NORM_FIX}"
            )
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            raise DPModelError(
                f"{label}: track_running_stats=True sends statistics of private "
                f"batches to the server; set track_running_stats=False or "
                f"{NORM_FIX}"
            )
    buffers = dict(model.named_buffers())
    if not buffers:
        return
    twin = copy.deepcopy(model).train()
    before = {k: v.detach().clone() for k, v in twin.named_buffers()}
    _scalar_output(twin, probe).backward()
    for k, v in twin.named_buffers():
        if k not in before or before[k].shape != v.shape or not torch.equal(before[k], v):
            raise DPModelError(
                f"buffer {k!r} changes during training and would leave the site "
                f"without noise; make it a constant or a parameter ({NORM_FIX} "
                "for normalisation)"
            )


# ---- clipping modes ---------------------------------------------------------------
def bk_problem(model: nn.Module, probe: torch.Tensor) -> str | None:
    """Why book-keeping clipping would be wrong for ``model``, or None when it is exact."""
    reason = unsupported_reason(model)
    if reason is not None:
        return reason
    twin = _deterministic_twin(model)
    ref = per_example_grads(twin, probe)
    clipper = BookKeepingClipper(twin, _probe_clip(ref))
    try:
        loss = _scalar_output(twin, probe)
        norms = clipper.backward(loss)
    except BookKeepingError as exc:
        return str(exc).removeprefix("book-keeping clipping: ").split(";")[0]
    except RuntimeError as exc:
        return f"the backward pass failed ({str(exc).splitlines()[0][:200]})"
    finally:
        clipper.close()
    got = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    return _compare(ref, norms, got, clipper.max_grad_norm)


def opacus_problem(model: nn.Module, probe: torch.Tensor, mode: str) -> str | None:
    """Why Opacus's ``mode`` ('hooks' or 'ew') gets wrong per-sample gradients, or None."""
    twin = _deterministic_twin(model)
    ref = per_example_grads(twin, probe)
    named = [(n, p) for n, p in twin.named_parameters() if p.requires_grad]
    wrapped: Callable | None = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode == "hooks":
                wrapped = GradSampleModule(twin, loss_reduction="sum")
            else:
                from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

                wrapped = call_for_per_sample_grads(
                    twin, batch_size=len(probe), loss_reduction="sum"
                )
            _scalar_output(wrapped, probe).backward()
        samples = {n: p.__dict__.get("grad_sample") for n, p in named}
    except Exception as exc:  # noqa: BLE001 - Opacus/torch refuse with many exception types
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        if isinstance(wrapped, GradSampleModule):
            wrapped._close()
    missing = [n for n, g in samples.items() if g is None]
    if missing:
        return f"no per-sample gradient for parameter {missing[0]!r}"
    got_norms = torch.stack([g.flatten(1).norm(dim=1) for g in samples.values()]).norm(dim=0)
    if not torch.allclose(got_norms, ref["norms"], rtol=1e-3, atol=1e-6):
        return "per-sample gradient norms differ from a per-example computation"
    return None


def per_example_grads(model: nn.Module, probe: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample gradients of ``_scalar_output`` by a plain loop: name -> [B, *shape],
    plus 'norms' -> [B] (over trainable parameters only)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows = []
    for i in range(len(probe)):
        out = _scalar_output(model, probe[i : i + 1])
        rows.append(torch.autograd.grad(out, [p for _, p in named], allow_unused=True))
    grads = {
        n: torch.stack(
            [g if g is not None else torch.zeros_like(p) for g in (row[j] for row in rows)]
        )
        for j, (n, p) in enumerate(named)
    }
    grads["norms"] = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)
    return grads


def _compare(
    ref: dict[str, torch.Tensor],
    norms: torch.Tensor | None,
    got: dict[str, torch.Tensor | None],
    clip: float,
) -> str | None:
    if norms is None or not torch.allclose(norms, ref["norms"], rtol=1e-3, atol=1e-6):
        return "per-sample gradient norms differ from a per-example computation"
    factor = (clip / (ref["norms"] + 1e-6)).clamp(max=1.0)
    for name, g in got.items():
        want = torch.einsum("b,b...->...", factor, ref[name])
        if g is None or not torch.allclose(g, want, rtol=1e-3, atol=1e-5):
            return f"the clipped gradient of {name!r} differs from a per-example computation"
    return None


def _deterministic_twin(model: nn.Module) -> nn.Module:
    """A copy in training mode (Opacus's hooks only record then) with dropout off."""
    twin = copy.deepcopy(model).train()
    for m in twin.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    return twin


def _probe_clip(ref: dict[str, torch.Tensor]) -> float:
    """A clipping bound that clips some probe samples and not others."""
    return float(ref["norms"].median()) or 1.0


def _probe_input(example: torch.Tensor) -> torch.Tensor:
    """A synthetic batch with the example's per-sample shape and dtype (values unused)."""
    example = torch.as_tensor(example)
    if example.dim() == 0:
        raise DPModelError("example_input must have a batch dimension")
    shape = (PROBE_BATCH, *example.shape[1:])
    gen = torch.Generator().manual_seed(0)
    if example.is_floating_point():
        return torch.randn(shape, generator=gen, dtype=example.dtype).to(example.device)
    return torch.zeros(shape, dtype=example.dtype, device=example.device)


def _scalar_output(model: Callable, x: torch.Tensor) -> torch.Tensor:
    """A fixed random projection of the output, summed: a sum of per-sample terms."""
    out = model(x)
    if not isinstance(out, torch.Tensor):
        raise DPModelError("the model's forward must return one tensor under DP")
    gen = torch.Generator().manual_seed(1)
    proj = torch.randn(out.shape[1:], generator=gen, dtype=out.dtype).to(out.device)
    return (out * proj).sum()
