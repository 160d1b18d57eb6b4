"""Fine-tuning exported models on GLUE tasks: `elastic-jax finetune`.

  metrics.py   the task metrics (Matthews, F1, accuracy, Pearson, Spearman)
  inputs.py    GLUE examples as the model reads them (pairs with separator / token types for
               encoders, last-token pooling for decoders)
  classifier.py  the exported model with a task head (classification or regression)
  trainer.py   the fine-tuning loop: dev evaluation each epoch, best checkpoint kept (Orbax,
               resumable), optional distillation from a fine-tuned teacher; the glue-small suite
  export_hf.py a fine-tuned BERT classifier as a transformers sequence-classification directory
"""
