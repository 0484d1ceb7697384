"""The model: the Itera-Lite architecture (selective SSM mixer + top-k mixture of experts).

Modules:
    config   `ModelConfig`, one dataclass, with per-layer head/expert counts and widths so pruned
             models are described exactly
    ssm      the selective state-space mixer (Mamba names, Mamba-2 scalar decay per head), its
             chunked scan `ssd_scan`, the sequential twin `ssd_scan_ref` and the O(1) `step`
    moe      the router, experts held as 3-D weights, per-expert dispatch and `moe_dense_ref`
    model    `IteraLite`: embedding -> blocks [RMSNorm -> SSM -> residual; RMSNorm -> MoE ->
             residual] -> RMSNorm -> LM head tied to the embedding

Dimension letters used in shape comments throughout the package:
    b  batch                         l  sequence length (tokens)
    d  d_model, the residual width   V  vocabulary size
    h  SSM heads                     p  head dim (headdim); d_inner = h * p
    n  SSM state size (d_state)      r  dt_rank (input width of dt_proj)
    c  number of scan chunks         q  chunk length (chunk_size)
    kh conv taps (d_conv)            e  experts
    k  top-k experts per token       f  expert hidden width (d_ff)
    t  tokens routed to an expert (flattened b * l)
    g  quantization group size       G  groups per row (in / g)
    out, in  a weight's output and input dims; N, K the same in torch's int4 kernel notation
"""
