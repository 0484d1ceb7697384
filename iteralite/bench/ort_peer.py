"""ONNX Runtime as a peer: the headline artifact (dequantized once, as the fused runtime holds
it) exported with `torch.onnx.export(dynamo=True)` and run by onnxruntime's CPU provider. The
graphs are the fused ones (`runtime.fused`), whose matmuls export as plain `F.linear` (ONNX
Gemm/MatMul): the multiply-and-sum form chosen for inductor is never exported.

Two graphs: the batch-1 single-token step, which the benchmark times (`OrtStep`), and the
full-sequence forward from a zero state, on which the row's quality is scored here
(`OrtSequence`, `score_onnxruntime`): scoring ~900k tokens through the step one session call per
token would take minutes. The scorer checks the two graphs' logits agree on one window and
records the difference."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from iteralite.bench.memory import state_bytes
from iteralite.bench.variants import load_artifact
from iteralite.runtime.native.runtime import InferenceOnly

STEP_MATCH_ATOL = 1e-3  # sequence graph vs step graph, max |logit difference| over one window


class _Step(nn.Module):
    def __init__(self, fused):
        super().__init__()
        self.fused = fused

    def forward(self, token, *state):
        return self.fused._step_eager(token, *state)


class _Forward(nn.Module):
    def __init__(self, fused):
        super().__init__()
        self.fused = fused

    def forward(self, idx):
        return self.fused._forward_eager(idx, *self.fused.init_state(idx.shape[0]))[0]


def export_step(fused) -> bytes:
    """The fused model's batch-1 step as ONNX bytes (inputs token, s0, s1, ...; outputs logits, ...)."""
    state = fused.init_state(1)
    names = [f"s{i}" for i in range(len(state))]
    with torch.no_grad():
        program = torch.onnx.export(_Step(fused).eval(), (torch.zeros(1, dtype=torch.long), *state), dynamo=True,
                                    input_names=["token", *names], output_names=["logits", *[f"o{n}" for n in names]],
                                    verbose=False)
    return program.model_proto.SerializeToString()


def export_forward(fused, length: int) -> bytes:
    """The fused model's forward over `length` tokens from a zero state as ONNX bytes (input idx
    (b, length), any b; output logits (b, length, V)). The length is fixed: the chunked scan
    loops over its chunks in Python."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        program = torch.onnx.export(_Forward(fused).eval(), (torch.zeros(2, length, dtype=torch.long),),
                                    dynamo=True, input_names=["idx"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), verbose=False)
    return program.model_proto.SerializeToString()


class _Sessions:
    """onnxruntime sessions made when first used, one per (thread count, key): the benchmark
    times 1 thread and all threads."""

    def __init__(self):
        import onnxruntime as ort
        self._ort, self._sessions = ort, {}

    def get(self, key, make_bytes):
        n = torch.get_num_threads()
        if (n, key) not in self._sessions:
            so = self._ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = n, 1
            self._sessions[n, key] = self._ort.InferenceSession(make_bytes(), so, providers=["CPUExecutionProvider"])
        return self._sessions[n, key]


class OrtStep(InferenceOnly):
    """`init_state` / `step` / `forward` (the step loop) over an onnxruntime session of the step."""

    def __init__(self, fused, onnx_bytes: bytes):
        self._bytes, self._sessions = onnx_bytes, _Sessions()
        self._shapes = [tuple(s.shape) for s in fused.init_state(1)]
        self.cfg = fused.cfg
        self.resident_weight_bytes = state_bytes(fused)

    def _session(self):
        return self._sessions.get("step", lambda: self._bytes)

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


class OrtSequence(InferenceOnly):
    """`model(idx)` -> (logits (b, l, V), 0) from a zero state, over an onnxruntime session of the
    full-sequence graph, exported when a length is first met (the evaluator meets one)."""

    def __init__(self, fused):
        self._fused, self._sessions, self.cfg = fused, _Sessions(), fused.cfg

    @torch.no_grad()
    def forward(self, idx):
        session = self._sessions.get(idx.shape[1], lambda: export_forward(self._fused, idx.shape[1]))
        logits = torch.from_numpy(session.run(None, {"idx": idx.cpu().numpy().astype(np.int64)})[0])
        return logits, logits.new_zeros(())

    __call__ = forward


def load_onnxruntime(path) -> OrtStep:
    """A packed checkpoint -> its step on onnxruntime (exported here, at load)."""
    from iteralite.runtime.fused import FusedIteraLite
    fused = FusedIteraLite.from_model(load_artifact(path))
    return OrtStep(fused, export_step(fused))


def step_vs_sequence(step: OrtStep, sequence: OrtSequence, length: int) -> float:
    """Max |logit difference| between the step loop and the sequence graph on one fixed window."""
    idx = torch.randint(0, step.cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    return float((step(idx)[0] - sequence(idx)[0]).abs().max())


def score_onnxruntime(model, path, evaluator, fp32: dict, results: dict) -> dict:
    """The ONNX Runtime row's quality, scored here through onnxruntime (the sequence graph of the
    same artifact, on the evaluator's windows); deltas against FP32 and against the same artifact
    in PyTorch (results["mixed"], scored by its stage on the same evaluation)."""
    from iteralite.runtime.fused import FusedIteraLite

    sequence = OrtSequence(FusedIteraLite.from_model(load_artifact(path)))
    q = evaluator(sequence)
    diff = step_vs_sequence(model, sequence, evaluator.cfg.seq_len - 1)  # the length scored: no new export
    mixed, size = results["mixed"], model.resident_weight_bytes  # the plan lists mixed before this row
    agree = (f"agrees with the timed step graph within {STEP_MATCH_ATOL:g}" if diff <= STEP_MATCH_ATOL else
             f"DIFFERS from the timed step graph by {diff:.3g} > {STEP_MATCH_ATOL:g}")
    return {**q, "params": mixed["params"], "size_bytes": size, "size_kind": "memory",
            "bits_per_weight": round(8 * size / mixed["params"], 4),
            "compression_vs_fp32": round(fp32["size_bytes"] / size, 3),
            "val_ppl_delta_pct": round(100 * (q["val_ppl"] / fp32["val_ppl"] - 1), 3),
            "val_ppl_delta_vs_dequantized_pct": round(100 * (q["val_ppl"] / mixed["val_ppl"] - 1), 3),
            "eval_tokens": evaluator.cfg.max_tokens or "all",
            "max_abs_logit_diff_sequence_vs_step": round(diff, 6),
            "quality_from": f"benchmark (the mixed artifact's sequence graph on onnxruntime; {agree})"}
