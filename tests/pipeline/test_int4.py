import pytest
import torch

from iteralite.io.checkpoint import load_model, save_checkpoint
from iteralite.io.errors import ParamsError
from iteralite.train.evaluate import storage_bits
from iteralite.pipeline.int4 import Int4Config, quantize_int4
from iteralite.io.params import from_dict
from iteralite.quant.calib_stats import collect_act_stats
from iteralite.quant.config import quant_config
from iteralite.quant.modules import QuantEmbedding, QuantExperts, QuantLinear


@pytest.fixture
def stats(model, cfg):
    batches = [torch.randint(0, cfg.vocab_size, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    h = collect_act_stats(model, batches, hessian=True)
    return {"hessian": h, "act_sq_mean": {k: torch.diagonal(v, dim1=-2, dim2=-1) for k, v in h.items()}}


@pytest.mark.parametrize("method", ["rtn", "awq", "gptq", "nf4"])
def test_every_method_packs_reloads_and_matches(model, cfg, stats, method, tmp_path):
    icfg = Int4Config(group_size=16)
    q = quantize_int4(model, method, icfg, stats)
    assert isinstance(q.layers[0].mixer.in_proj, QuantLinear)
    assert isinstance(q.layers[0].moe.experts, QuantExperts)
    assert isinstance(q.embedding, QuantEmbedding)
    assert isinstance(q.layers[0].mixer.dt_proj, torch.nn.Linear)  # kept float by policy
    path = tmp_path / f"{method}.safetensors"
    size = save_checkpoint(path, q, kind=f"int4-{method}", tokenizer_sha256="", quant=quant_config(q))
    loaded, _ = load_model(path)
    idx = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], q(idx)[0])
        diff = (loaded(idx)[0] - model(idx)[0]).abs().max()
    assert diff < 1.0  # close to the float model, not identical
    # the file is the packed form: its bytes are the stored bits plus a small header
    assert abs(size - storage_bits(loaded) / 8) < 16_384


def test_embedding_policy_float_keeps_it(model, stats):
    q = quantize_int4(model, "rtn", Int4Config(group_size=16, embedding="float"), stats)
    assert not isinstance(q.embedding, QuantEmbedding)


def test_config_errors_name_the_key():
    with pytest.raises(ParamsError, match=r"'int4.method' must be one of rtn, awq, gptq, nf4; got 'int3'"):
        from_dict(Int4Config, {"method": "int3"}, "int4")
    with pytest.raises(ParamsError, match=r"'int4.embedding'"):
        from_dict(Int4Config, {"embedding": "int8"}, "int4")
    with pytest.raises(ParamsError, match="int4.compare"):
        from_dict(Int4Config, {"compare": ["rtn", "magic"]}, "int4")
