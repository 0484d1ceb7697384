import torch

from iteralite.quant.calibrate import CalibrateConfig, calibrate, load_stats, plot_sensitivity, save_stats


def test_calibrate_collects_stats_and_sensitivity(model, cfg, tmp_path):
    data = torch.randint(0, cfg.vocab_size, (5000,), generator=torch.Generator().manual_seed(0))
    ccfg = CalibrateConfig(n_samples=8, seq_len=16, batch_size=4, sens_samples=4, group_size=8)
    tensors, summary = calibrate(model, data, ccfg, progress=False)
    # every quantizable module has statistics of the right width
    assert tensors["layers.0.mixer.in_proj.act_sq_mean"].shape == (cfg.d_model,)
    assert tensors["layers.0.mixer.out_proj.hessian"].shape == (cfg.d_inner(0), cfg.d_inner(0))
    assert tensors["layers.1.moe.experts.w2.act_sq_mean"].shape == (cfg.n_experts, cfg.d_ff)
    assert tensors["embedding.act_sq_mean"].shape == (cfg.d_model,)
    h = tensors["layers.0.mixer.in_proj.hessian"]
    torch.testing.assert_close(torch.diagonal(h), tensors["layers.0.mixer.in_proj.act_sq_mean"])
    sens = summary["sensitivity"]
    assert set(sens["layers.0.mixer.in_proj"]) == {"4", "8"}
    # 8-bit hurts less than 4-bit for nearly every tensor (exact ties possible on tiny models)
    worse = sum(v["8"] > v["4"] + 1e-4 for v in sens.values())
    assert worse <= 1, sens
    r = summary["act_ranges"]["layers.0.mixer.in_proj"]
    assert 0 < r["p999"] <= r["absmax"]
    save_stats(tmp_path / "s.safetensors", tensors, summary)
    stats, summary2 = load_stats(tmp_path / "s.safetensors", "act_sq_mean")
    assert torch.equal(stats["embedding"], tensors["embedding.act_sq_mean"])
    assert summary2["sensitivity"] == sens
    plot_sensitivity(summary, tmp_path / "s.png", tmp_path / "s.csv")
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert (tmp_path / "s.csv").read_text().startswith("tensor,bits4,bits8")
