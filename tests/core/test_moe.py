import torch

from iteralite.core.moe import MoE, moe_dense_ref


def test_dispatch_equals_dense_reference():
    torch.manual_seed(0)
    moe = MoE(d_model=16, n_experts=5, d_ff=12, top_k=2)
    x = torch.randn(3, 7, 16)
    out, aux = moe(x)
    torch.testing.assert_close(out, moe_dense_ref(moe, x), atol=1e-6, rtol=1e-5)
    assert out.shape == x.shape


def test_balance_loss_is_one_when_uniform_and_has_gradient():
    torch.manual_seed(0)
    moe = MoE(d_model=8, n_experts=4, d_ff=8, top_k=1)
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probs; argmax ties all go to expert 0
    x = torch.randn(64, 8)
    _, aux = moe(x)
    # all tokens to one expert with uniform probs: e * (1 * 1/e) = 1
    assert abs(aux.item() - 1.0) < 1e-6
    moe2 = MoE(d_model=8, n_experts=4, d_ff=8, top_k=2)
    out, aux2 = moe2(x)
    (out.sum() + aux2).backward()
    assert moe2.router.weight.grad.abs().sum() > 0
    assert moe2.experts.w1.grad.abs().sum() > 0


def test_unused_expert_is_skipped():
    torch.manual_seed(0)
    moe = MoE(d_model=8, n_experts=4, d_ff=8, top_k=1)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 100.0  # only expert 2 is ever chosen for x[:, 0] > 0
    x = torch.randn(10, 8).abs()
    out, _ = moe(x)
    torch.testing.assert_close(out, moe.experts.run(2, x))
