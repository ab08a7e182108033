"""torch.compile traces the trainer's own step-2 loss (vision encoder -> cmattn -> multi_expert_loss)
with no graph break, and the compiled step computes the same loss and gradients as eager."""
import re

import pytest
import torch

import guidg_fast as gf
from guidg_fast import ops
from guidg_fast.train import GuiDG
from conftest import assert_close

C, DOMAINS = 5, ["a", "b", "c"]


def _trainer(weight_mode: str, baseline: str) -> GuiDG:
    torch.manual_seed(0)
    g = GuiDG(gf.TINY_ARCH, None, [f"class {i}" for i in range(C)], DOMAINS, n_ctx=2,
              weight_mode=weight_mode, baseline=baseline)
    g.refresh_expert_features()
    g.model.visual.requires_grad_(True)
    return g


def _grads(g: GuiDG, fn, x, y):
    params = list(g.model.visual.parameters()) + list(g.attn.parameters())
    loss, w = fn(x, y)
    return loss.detach(), w.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("weight_mode,baseline", [("sample", "clipood"), ("batch", "ueo")])
def test_step2_loss_compiles_without_graph_breaks(weight_mode, baseline):
    g = _trainer(weight_mode, baseline)
    x = torch.randn(7, 3, 32, 32)
    y = torch.randint(0, C, (7,))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(g.step2_loss)(x, y)
    assert explained.graph_break_count == 0, explained.break_reasons
    code = "".join(gm.code for gm in explained.graphs)
    for op in ("cmattn", "multi_expert_loss"):
        if ops.choose(op, torch.device("cpu")) != "eager":
            # the op packet or its .default overload, as dynamo records the call
            assert re.search(rf"torch\.ops\.guidg_fast\.{op}(\.default)?\(", code), (
                f"{op} is not in the traced graph as one fused op")
    torch._dynamo.reset()
    # aot_eager: the whole autograd graph through both custom ops, without inductor's minute of C++
    # codegen for a ViT (the per-op tests compile with inductor)
    compiled = torch.compile(g.step2_loss, fullgraph=True, backend="aot_eager")
    got_loss, got_w, got_grads = _grads(g, compiled, x, y)
    want_loss, want_w, want_grads = _grads(g, g.step2_loss, x, y)
    assert_close(got_loss, want_loss, "loss")
    assert_close(got_w, want_w, "expert weights")
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert_close(a, b, f"grad of parameter {i}")
    torch._dynamo.reset()
