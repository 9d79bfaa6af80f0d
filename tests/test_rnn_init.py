"""The RNN's W_hh initialisations: default N(0, 1/H) as drawn before, orthogonal, identity."""
import math

import pytest
import torch
from conftest import assert_usage_error, run_script

from models.rnn import RNN
from trainers.cli import build
from trainers.lstm import LSTMConfig, build_model


def test_default_init_is_the_documented_draw():
    D, H, K = 3, 16, 4
    torch.manual_seed(0)
    model = RNN(D, H, K)
    torch.manual_seed(0)   # the oracle: the draws in the order the docstring gives
    W_hx = torch.randn(D, H) / math.sqrt(D)
    W_hh = torch.randn(H, H) / math.sqrt(H)
    W_ph = torch.randn(H, K) / math.sqrt(H)
    assert torch.equal(model.W_hx, W_hx) and torch.equal(model.W_hh, W_hh) and torch.equal(model.W_ph, W_ph)


def test_orthogonal_and_identity_set_w_hh_only():
    H = 24
    torch.manual_seed(1)
    default = RNN(10, H, 10)
    torch.manual_seed(1)
    ortho = RNN(10, H, 10, init="orthogonal")
    torch.manual_seed(1)
    ident = RNN(10, H, 10, init="identity")
    W = ortho.W_hh.detach().double()
    assert torch.allclose(W.T @ W, torch.eye(H, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(torch.linalg.svdvals(W), torch.ones(H, dtype=torch.float64), atol=1e-5)
    assert not torch.allclose(W, torch.eye(H, dtype=torch.float64), atol=0.1)   # a random rotation, not I
    assert torch.equal(ident.W_hh, torch.eye(H))
    for other in (ortho, ident):   # the same input and output weights as the default for the same seed
        for name in ("W_hx", "b_h", "W_ph", "b_p"):
            assert torch.equal(getattr(other, name), getattr(default, name)), name


def test_identity_rnn_starts_as_a_leaky_sum():
    """With W_hh = I and tiny inputs, tanh is linear: h_L is close to the sum of the inputs' x W_hx."""
    model = RNN(3, 8, 2, init="identity", backend="eager").double()
    x = 1e-4 * torch.randn(2, 20, 3, dtype=torch.float64)
    _, states = model(x, return_states=True)
    total = (x @ model.W_hx + model.b_h).sum(1)
    assert torch.allclose(states["h"][:, -1], total, rtol=1e-4, atol=1e-9)


def test_the_trainer_flag_reaches_the_model():
    for init in ("orthogonal", "identity"):
        model = build_model(build(LSTMConfig, model="rnn", hidden_dim=12, rnn_init=init))
        W = model.W_hh.detach()
        assert torch.allclose(W.T @ W, torch.eye(12), atol=1e-5)
        assert torch.equal(W, torch.eye(12)) == (init == "identity")
    with pytest.raises(ValueError, match="init"):
        RNN(2, 3, 4, init="xavier")


def test_bad_rnn_init_flag_is_one_line(tmp_path):
    assert_usage_error(run_script(["trainers/lstm.py", "--model", "rnn", "--rnn-init", "xavier",
                                   "--out-dir", tmp_path]), "--rnn-init")
