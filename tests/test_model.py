import torch

from moebalance import LossFreeBalancer
from moebalance.train.config import ModelConfig
from moebalance.train.model import MoETransformer


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, num_experts=4, top_k=2, d_expert=16, d_ff_dense=32)
    base.update(kw)
    return ModelConfig(**base)


def test_forward_shapes_and_routing_per_layer():
    model = MoETransformer(tiny(n_layers=3, first_dense_layers=1, num_shared_experts=1))
    x = torch.randint(0, 64, (2, 16))
    out = model(x, x)
    assert out.logits.shape == (2, 16, 64)
    assert len(out.routing) == 2 and len(model.routers) == 2
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_causal():
    model = MoETransformer(tiny()).eval()
    x = torch.randint(0, 64, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 64
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])


def test_biases_in_state_dict_and_bf16():
    model = MoETransformer(tiny())
    keys = [k for k in model.state_dict() if k.endswith("expert_bias")]
    assert len(keys) == 2
    model.to(torch.bfloat16)
    assert all(r.expert_bias.dtype == torch.float32 for r in model.routers)


def test_one_training_step_moves_biases_not_via_optimizer():
    model = MoETransformer(tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 64, (4, 16))
    model(x, x).loss.backward()
    opt.step()
    assert all(torch.equal(r.expert_bias, torch.zeros(4)) for r in model.routers)
    LossFreeBalancer().step(model)
    assert all(r.expert_bias.abs().max() > 0 for r in model.routers)


def test_router_init_follows_init_std_unless_set():
    """Routers get the model's init_std by default; a set router_init_std wins for routers only."""
    torch.manual_seed(0)
    cfg = tiny(d_model=256, n_heads=4, num_experts=64, init_std=0.02)
    m = MoETransformer(cfg)
    for r in m.routers:
        assert abs(r.weight.std().item() - 0.02) < 0.002
    assert abs(m.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    m = MoETransformer(tiny(d_model=256, n_heads=4, num_experts=64, router_init_std=256**-0.5))
    for r in m.routers:
        assert abs(r.weight.std().item() - 256**-0.5) < 0.1 * 256**-0.5
    assert abs(m.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
