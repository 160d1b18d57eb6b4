"""Fine-tuning exported models on GLUE tasks and SQuAD: `elastic-jax finetune`.

  metrics.py   the task metrics (Matthews, F1, accuracy, Pearson, Spearman)
  inputs.py    GLUE examples as the model reads them (pairs with separator / token types for
               encoders, last-token pooling for decoders)
  classifier.py  the exported model with a task head (classification or regression)
  glue_job.py  a GLUE task for the trainer: classifier head, encoded splits, loss, dev metrics
  squad_data.py  SQuAD v1.1 / v2.0 questions from the official JSON files or tfds:squad
  squad_windows.py  questions as [CLS] question [SEP] context [SEP] windows (document stride)
  span_head.py the exported encoder with start / end logits (extractive QA)
  squad_predict.py  window logits -> answer text via the tokenizer's offsets (n-best, no-answer)
  squad_metrics.py  SQuAD exact match and F1 by the official scripts' normalisation
  squad_job.py SQuAD for the trainer: span head, windows, loss, dev EM / F1
  trainer.py   the fine-tuning loop: dev evaluation each epoch, best checkpoint kept (Orbax,
               resumable), optional distillation from a fine-tuned teacher; the glue-small suite
  export_hf.py a fine-tuned BERT classifier as a transformers sequence-classification directory
"""
