import pytest
import torch

from iteralite.core.ssm import SSM, ssd_scan, ssd_scan_ref


def _inputs(b=2, l=21, h=3, p=4, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=g))
    A = -torch.rand(h, generator=g) * 4 - 0.1
    B = torch.randn(b, l, n, generator=g)
    C = torch.randn(b, l, n, generator=g)
    return x, dt, A, B, C


@pytest.mark.parametrize("l,chunk", [(21, 8), (16, 8), (5, 8), (32, 32), (1, 4)])
def test_chunked_scan_equals_ref(l, chunk):
    x, dt, A, B, C = _inputs(l=l)
    y, s = ssd_scan(x, dt, A, B, C, chunk)
    y_ref, s_ref = ssd_scan_ref(x, dt, A, B, C)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-4)


def test_chunked_scan_with_initial_state():
    x, dt, A, B, C = _inputs(l=13)
    s0 = torch.randn(2, 3, 4, 5)
    y, s = ssd_scan(x, dt, A, B, C, 4, s0)
    y_ref, s_ref = ssd_scan_ref(x, dt, A, B, C, s0)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-4)


def test_chunked_scan_gradients_match_ref():
    x, dt, A, B, C = _inputs(l=12)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    ssd_scan(x1, dt, A, B, C, 4)[0].square().sum().backward()
    ssd_scan_ref(x2, dt, A, B, C)[0].square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-4)


def _mixer():
    torch.manual_seed(0)
    return SSM(d_model=16, n_heads=2, headdim=8, d_state=4, d_conv=4, dt_rank=4, chunk_size=4).eval()


def test_step_equals_parallel_forward():
    m = _mixer()
    u = torch.randn(2, 11, 16)
    with torch.no_grad():
        y = m(u)
        st = m.init_state(2)
        ys = []
        for t in range(u.shape[1]):
            yt, st = m.step(u[:, t], st)
            ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("split", [1, 2, 3, 7])
def test_prefill_state_continues_with_step_and_forward(split):
    m = _mixer()
    u = torch.randn(1, 10, 16)
    with torch.no_grad():
        y = m(u)
        _, st = m(u[:, :split], return_state=True)
        y_rest = m(u[:, split:], state=st)
        ys = []
        for t in range(split, 10):
            yt, st = m.step(u[:, t], st)
            ys.append(yt)
    torch.testing.assert_close(y_rest, y[:, split:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.stack(ys, 1), y[:, split:], atol=1e-5, rtol=1e-4)
