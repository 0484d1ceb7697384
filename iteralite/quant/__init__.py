"""Quantization: how weights are stored in fewer bits, and trained to survive it.

One path serves every format. A `QuantSpec` (spec) says how one tensor is stored: an integer
method (rtn, awq, gptq) at 2/3/4/8 bits, bitsandbytes' nf4, or fp16. `swap.quantize(model,
spec_for)` turns a float model into a stored one, `swap.build_empty` rebuilds the empty stored
modules for a strict load, and `swap.dequantize_model` turns any stored model back into floats.
Uniform int4 is a spec_for that returns one spec everywhere; mixed precision is a spec_for that
returns each unit's spec (a list of per-expert specs for experts).

Modules:
    spec         QuantSpec, its validation and group-size rules
    packing      b-bit codes in a dense bitstream (and its bit-by-bit reference twin)
    intcodes     integer group quantization: codes, scales, zero-points, QTensor, round to nearest
    awq, gptq    the activation-aware and error-feedback integer quantizers
    nf4          bitsandbytes' NormalFloat4 in its own packed form, and a plain-torch twin
    registry     THE table: format (rtn/awq/gptq/nf4/fp16) -> quantizer, calibration statistic,
                 stored class per module kind, packing, code fields, native source; precision
                 (ternary/int2/int3/int4/int8/fp16) -> bits, levels, config character, spec
    modules      stored modules (QuantLinear/Experts/Embedding, HalfLinear/Embedding, MixedExperts)
    kernels      torch's packed int4 CPU matmul (opt-in, measured)
    coding       which stored tensors are integer codes (bits, count), their rANS round trip, report
    swap         the module swap: float <-> stored, by the registry's stored classes
    config       the quant config stored in checkpoint headers (uniform and mixed formats)
    calib_stats  per-weight activation statistics (mean x^2, X^T X) for awq, gptq and clipping
    calibrate    the calibrate stage's statistics and per-tensor sensitivity (scored with
                 `train.evaluate.mean_loss` on dev windows)
    fake         fake quantization with a straight-through gradient (QAT's forward)
    qat          attaching fake quantization, distilling, exporting: quantization-aware training
    units        mixed precision's allocation units and their exact stored bits
    allocate     the sensitivity profile and the budgeted greedy allocator
"""
