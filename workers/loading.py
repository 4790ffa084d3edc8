"""Helpers shared by the two weight loaders (:mod:`workers.build` for the official folder,
:mod:`workers.refstream_folder` for RefStream's own layout): dtype casting and meta-buffer rebuilding.

Both loaders build the model on the meta device and assign the file tensors (``load_state_dict(assign=True)``),
so nothing is initialised twice; these two steps finish that.
"""

from __future__ import annotations

import torch

__all__ = ["cast_state_dict", "materialize_meta_buffers"]


def cast_state_dict(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``state`` with its floating-point tensors cast to ``dtype`` (integer tensors untouched).

    Args:
        state: parameter name -> tensor (any device, any dtype).
        dtype: target dtype, or None to keep each tensor's own dtype (``state`` is returned as is).

    Returns:
        a new dict (the same tensors where no cast is needed).
    """
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v for k, v in state.items()}


def materialize_meta_buffers(model: torch.nn.Module) -> None:
    """Recompute buffers left on the meta device (non-persistent ones: rotary ``inv_freq``, position ids).

    Each module holding one is rebuilt on the CPU from its own ``config`` (``type(m)(m.config)``, under a
    private RNG), or from its nearest ancestor's config when it keeps none, or else from a sub-config of one of
    those (``sub_configs`` entries and ``*_config`` attributes), and its buffers are copied over.
    Afterwards no parameter or buffer may be on the meta device.

    Raises:
        RuntimeError: a meta tensor could not be rebuilt or remains (named).
    """
    modules = dict(model.named_modules())
    for name, module in modules.items():
        metas = [b for b, t in module.named_buffers(recurse=False) if t is not None and t.is_meta]
        if not metas:
            continue
        # the module's own config, else the nearest ancestor's (e.g. CLIPTextEmbeddings keeps none), then the
        # sub-configs of those (SAM2's positional embedding is built from ``prompt_encoder_config``)
        parts = name.split(".") if name else []
        configs = [getattr(modules[".".join(parts[:i])], "config", None) for i in range(len(parts), -1, -1)]
        configs = [c for c in configs if c is not None and not isinstance(c, dict)]
        configs += [sub for c in configs for sub in _sub_configs(c)]
        fresh = None
        for cfg in (c for c in configs if c is not None and not isinstance(c, dict)):
            try:
                with torch.device("cpu"), torch.random.fork_rng(devices=[]):
                    candidate = type(module)(cfg)
            except Exception:  # noqa: BLE001 - not this module's config; try the next ancestor's
                continue
            if all(candidate._buffers.get(b) is not None
                   and candidate._buffers[b].shape == module._buffers[b].shape for b in metas):
                fresh = candidate
                break
        if fresh is None:
            raise RuntimeError(f"cannot rebuild meta buffers {metas} of {name or 'the model'} ({type(module).__name__})")
        for buffer in metas:
            module._buffers[buffer] = fresh._buffers[buffer]
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading: {left[:20]}")


def _sub_configs(config) -> list:
    """The nested configs of a transformers config: its ``sub_configs`` entries and ``*_config`` attributes."""
    names = list(getattr(config, "sub_configs", None) or {}) + [k for k in vars(config) if k.endswith("_config")]
    return [getattr(config, n, None) for n in dict.fromkeys(names)]
