"""Evaluation of LIMoE models: zero-shot classification, retrieval and routing analysis.

Modules (each readable alone):
  prompts     class names and prompt templates (ImageNet's from open_clip, or files)
  classifier  zero-shot classifier weights from prompts, with an on-disk cache
  metrics     top-1 / top-5 / mean per-class recall from logits
  datasets    labelled image folders, ImageNet layout, WebDataset shards
  benchmark_sets  CLIP_benchmark's WebDataset dataset folders (shards, class names, templates, captions)
  zeroshot    `evaluate_zeroshot`: top-1 / top-5 / mean per-class recall on labelled images
  retrieval   image<->text recall@k on caption shards, in bounded memory
  routing     tokens per expert, drop rates and router entropy per layer and modality
  interop     a CLIP_benchmark-style loader returning (model, transform, tokenizer); CLIP_benchmark's CLI
  evaluators  ZeroShot, Retrieval, Routing: one class per kind, built by training's `evals:` and by the CLI
  suite       one export on a list of dataset folders, into one table (CSV / JSON / markdown)
  cli         `limoe eval zeroshot|retrieval|suite|routing`
"""
