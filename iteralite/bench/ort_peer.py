"""ONNX Runtime as a peer: the headline artifact's single-token step (dequantized once, as the
fused runtime holds it) exported with `torch.onnx.export(dynamo=True)` and run by onnxruntime's
CPU provider. The step is the fused one (`runtime.fused`), whose matmuls export as plain
`F.linear` (ONNX Gemm/MatMul): the multiply-and-sum form chosen for inductor is never exported.
Exported at batch 1; its quality is the artifact's own (same weights, same math), so its row
takes the mixed row's quality; tests/bench/test_ort_peer.py checks its logits against the fused
step's."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from iteralite.bench.memory import state_bytes
from iteralite.bench.variants import load_artifact
from iteralite.runtime.native.runtime import InferenceOnly


class _Step(nn.Module):
    def __init__(self, fused):
        super().__init__()
        self.fused = fused

    def forward(self, token, *state):
        return self.fused._step_eager(token, *state)


def export_step(fused) -> bytes:
    """The fused model's batch-1 step as ONNX bytes (inputs token, s0, s1, ...; outputs logits, ...)."""
    state = fused.init_state(1)
    names = [f"s{i}" for i in range(len(state))]
    with torch.no_grad():
        program = torch.onnx.export(_Step(fused).eval(), (torch.zeros(1, dtype=torch.long), *state), dynamo=True,
                                    input_names=["token", *names], output_names=["logits", *[f"o{n}" for n in names]],
                                    verbose=False)
    return program.model_proto.SerializeToString()


class OrtStep(InferenceOnly):
    """`init_state` / `step` / `forward` over an onnxruntime session (one per thread count, made
    when first used at that count: the benchmark times 1 thread and all threads)."""

    def __init__(self, fused, onnx_bytes: bytes):
        import onnxruntime as ort
        self._ort, self._bytes, self._sessions = ort, onnx_bytes, {}
        self._shapes = [tuple(s.shape) for s in fused.init_state(1)]
        self.cfg = fused.cfg
        self.resident_weight_bytes = state_bytes(fused)

    def _session(self):
        n = torch.get_num_threads()
        if n not in self._sessions:
            so = self._ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = n, 1
            self._sessions[n] = self._ort.InferenceSession(self._bytes, so, providers=["CPUExecutionProvider"])
        return self._sessions[n]


    def init_state(self, batch: int = 1):
        return [[np.zeros(s, np.float32) for s in self._shapes] for _ in range(batch)]

    def _step1(self, token: int, st: list) -> tuple[np.ndarray, list]:
        feeds = {"token": np.array([token], dtype=np.int64), **{f"s{i}": s for i, s in enumerate(st)}}
        logits, *new = self._session().run(None, feeds)
        return logits[0], new

    @torch.no_grad()
    def step(self, token, state):
        rows = [self._step1(t, st) for t, st in zip(token.reshape(-1).tolist(), state)]
        return torch.from_numpy(np.stack([r[0] for r in rows])), [r[1] for r in rows]

    @torch.no_grad()
    def forward(self, idx, state=None, return_state: bool = False):
        state = self.init_state(idx.shape[0]) if state is None else state
        out = []
        for b, row in enumerate(idx.tolist()):
            seq = []
            for t in row:
                logits, state[b] = self._step1(t, state[b])
                seq.append(logits)
            out.append(np.stack(seq))
        logits = torch.from_numpy(np.stack(out))
        return (logits, logits.new_zeros(()), state) if return_state else (logits, logits.new_zeros(()))

    __call__ = forward


def load_onnxruntime(path) -> OrtStep:
    """A packed checkpoint -> its step on onnxruntime (exported here, at load)."""
    from iteralite.runtime.fused import FusedIteraLite
    fused = FusedIteraLite.from_model(load_artifact(path))
    return OrtStep(fused, export_step(fused))


def score_onnxruntime(model, path, evaluator, fp32: dict, results: dict) -> dict:
    """Same weights and math as the artifact it runs: the mixed row's quality, memory size."""
    mixed = results["mixed"]
    keep = ("params", "val_ppl", "val_bpb", "val_ppl_delta_pct", "wikitext2_ppl")
    size = model.resident_weight_bytes
    return {**{k: mixed[k] for k in keep if k in mixed}, "size_bytes": size, "size_kind": "memory",
            "bits_per_weight": round(8 * size / mixed["params"], 4),
            "compression_vs_fp32": round(fp32["size_bytes"] / size, 3),
            "quality_from": f"{mixed['quality_from']} (same weights as mixed, FP32 in memory)"}
