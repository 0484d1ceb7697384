"""Fast CPU inference.

Modules:
    fused   `FusedIteraLite`: any artifact dequantized once, one fused single-token step and a
            chunked prefill (each op with a `_ref` twin), compiled with AOTInductor or Inductor
    deploy  the fuse stage's `fuse`, the fused artifact (`save_fused` / `load_fused`)
"""
