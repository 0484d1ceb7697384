"""Structured pruning of the float model: SSM heads, expert hidden channels and (optionally) whole
experts are physically removed from the tensors, and `model.cfg` records the new per-layer sizes
(layer_n_heads, layer_n_experts, layer_d_ff), so a checkpoint rebuilds the pruned model from its
config and loads with strict shapes.

Modules (this file imports none of them; import the one you need):
  config       PruneConfig (params.yaml "prune"), the accepted importance / allocation names,
               ratio checks, iterative_schedule (cumulative ratios of iterative pruning)
  counting     prunable-parameter accounting: head_params, layer_count, layer_shapes,
               prunable_params, and require_float (quantized models are refused)
  pruners      the torch-pruning pruning functions that cut one kind of unit each:
               SSMHeadPruner, ExpertChannelPruner, ExpertPruner
  importance   Scores; magnitude_scores, taylor_scores, routing_stats; importance_scores picks
               a scorer by name from SCORERS
  plan         protection patterns, LayerPlan / PrunePlan and plan(): how many units each
               layer loses (allocation modes in ALLOCATION_WEIGHTS) and which ones
  apply        apply_plan (cut the planned units, update model.cfg) and prune() (score + plan +
               apply, returns the report)
  sensitivity  measure_sensitivity: per-layer loss increase under a zero-masked probe plan
  recovery     prune_with_recovery: the prune stage (dequantize, prune in steps, recover by
               fake-quantized distillation between steps)
  report       the pruning sweep's CSV table and PNG charts
  width        prune_residual: remove residual (d_model) channels from every d_model tensor, with
               the exact RMSNorm compensation; mask_residual_channels is its reference twin
  depth        prune_layers: remove whole blocks; skip_layers is its reference twin
  activation   activation_scores (Minitron-style residual-channel and block scores from
               calibration batches) and the helpers that pick what to remove
  rebuild      the checks width and depth share: indices, float model, shapes vs IteraLite(cfg)

Pruning units of layer i (p headdim, d d_model, f d_ff):
  SSM head        in_proj rows (x and z halves), conv1d channels, x_proj columns, dt_proj row,
                  A_log[h], D[h], out_proj columns. A layer keeps >= 1 head.
  expert channel  hidden unit j of expert e: w1[e, j, :] and w2[e, :, j]. The experts are stacked
                  tensors, so every expert of a layer loses the same count, each choosing by its
                  own scores. A layer keeps >= max(1, channel_multiple) channels.
  expert          w1[e], w2[e] and router row e. Optional (expert_removal); a layer keeps
                  >= top_k experts.
`plan` / `prune` never touch the tied embedding / LM head, the norms or d_model; `width` and
`depth` cut d_model and whole blocks (not wired into the prune stage yet). Ratios count parameters
(see `counting`): the fraction of all SSM-mixer and MoE parameters removed, cumulative against
the unpruned model.

Our names and torch-pruning's (torch_pruning.pruner.MetaPruner arguments and classes); the
concepts match, the details differ where noted:
  ours                        torch-pruning
  ratio / ratios              pruning_ratio (theirs: channels per layer; ours: parameters)
  layer_ratios                pruning_ratio_dict
  steps, iterative_schedule   iterative_steps, iterative_pruning_ratio_scheduler (linear)
  protected                   ignored_layers (ours: name patterns, not module objects)
  channel_multiple            round_to
  max_layer_ratio             max_pruning_ratio
  importance "magnitude"      MagnitudeImportance (p=2, group L2 norm)
  importance "taylor"         TaylorImportance (|w * dL/dw| of the group)
  Scores                      the importance tensor an Importance returns for a group
  SSMHeadPruner, ...          customized_pruners (BasePruningFunc subclasses)
  allocation "uniform"        global_pruning=False (every layer the same ratio)
  allocation "sensitivity"    (no counterpart)
torch-pruning's DependencyGraph is not used for grouping (see `pruners` for why); the coupling
of each unit is encoded in its pruner.
"""
