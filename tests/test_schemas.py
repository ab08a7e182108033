"""The op layout of guidg_fast: the dispatcher knows exactly one forward and one backward schema per
fused op (guidg_fast::<op> / guidg_fast::<op>_backward; bma_update_ alone, in place), each with its
fake function and (the forward) its autograd formula, and guidg_fast._C declares no operators of its
own (its kernels are plain functions the ops' ext backend calls). A stray schema fails here."""
import pytest
import torch
from torch._library.custom_ops import OPDEFS

import guidg_fast  # noqa: F401  (imports guidg_fast.ops and guidg_fast.text: every registration)
from guidg_fast.ops import _backend

FUSED_OPS = ("cmattn", "multi_expert_loss", "ensemble_logits", "prefix_attention", "prefix_attention_packed",
             "eot_project")
EXPECTED = {f"guidg_fast::{op}{part}" for op in FUSED_OPS for part in ("", "_backward")} | {"guidg_fast::bma_update_"}


def _guidg_schemas():
    return {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("guidg_fast::")}


def test_dispatcher_holds_exactly_the_op_schemas():
    _backend.load_extension()  # loading guidg_fast._C must add nothing to the dispatcher
    assert _guidg_schemas() == EXPECTED


def test_each_schema_is_one_custom_op_with_its_fake_and_autograd():
    for name in sorted(EXPECTED):
        opdef = OPDEFS.get(name)
        assert opdef is not None, f"{name} is not a torch.library custom op of guidg_fast/ops"
        assert opdef._abstract_fn is not None, f"{name} has no register_fake (torch.compile could not trace it)"
        # the forwards carry the autograd formula; backwards and the in-place average are never differentiated
        differentiable = not name.endswith("_backward") and name != "guidg_fast::bma_update_"
        assert (opdef._backward_fn is not None) == differentiable, name


def test_extension_functions_pick_the_device_per_call():
    ext = _backend.load_extension()
    if ext is None:
        pytest.skip("guidg_fast._C not built")
    q, keys = torch.randn(2, 3, 4), torch.randn(5, 3, 4)
    assert ext.cmattn_forward(q, keys, True).shape == (2, 5)
    meta = torch.empty(5, 3, 4, device="meta")
    with pytest.raises(RuntimeError, match="cmattn_forward: every tensor argument must be on one device, but q is on"):
        ext.cmattn_forward(q, meta, True)
    if not ext.WITH_CUDA:
        assert not _backend.ext_has_kernels(("cmattn_forward",), "cuda")
    assert not _backend.ext_has_kernels(("no_such_kernel",), "cpu")
