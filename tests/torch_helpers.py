"""Small models and gradient fixtures shared by the PyTorch tests."""

import torch


def tiny_mlp(seed=0, sizes=(5, 7, 3)):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def backward(model, seed=0, n=8, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model[0].in_features, generator=g)
    model.zero_grad(set_to_none=True)
    (scale * model(x).pow(2).mean()).backward()


def state_copy(model, optimizer):
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = {k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
           for k, v in optimizer.state_dict()["state"].items()}
    return params, opt


def assert_bit_identical(a, b):
    pa, oa = a
    pb, ob = b
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    assert oa.keys() == ob.keys()
    for k in oa:
        for kk in oa[k]:
            va, vb = oa[k][kk], ob[k][kk]
            assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb, (k, kk)
