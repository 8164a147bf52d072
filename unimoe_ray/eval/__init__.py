"""Evaluation of a checkpoint per task (tts_zh, tts_en, t2m, v2m): weight-free metrics
(teacher-forced CE / accuracy per codebook, experts per token, duration error, EOS rate,
silence and clipping) and model-based ones from locally supplied weights (WER/CER, speaker
similarity, UTMOS, CLAP score, FAD). Torch only: `jobs/evaluate.py` is the entry point.

- `metrics.py`: the arithmetic, on tensors, arrays and strings;
- `judges.py`: the model-based judges, each loaded from a local path and optional;
- `harness.py`: shard rows or a task file → teacher forcing, generation, judging → report;
- `report.py`: the report as eval.json and an eval.md table.
- `evaluate.py`: a checkpoint folder evaluated from paths (model, tokenizer, DAC, judges).
"""
