"""SophiaG with the Hugging Face Trainer: pass the optimizer and one callback."""

import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import curvlab
from curvlab.integrations.transformers import CurvatureCallback

config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16)
model = GPT2LMHeadModel(config)  # random init, nothing downloaded
ids = torch.randint(0, 32, (64, 12), generator=torch.Generator().manual_seed(0))
data = [{"input_ids": row, "labels": row} for row in ids]  # labels: the model computes its loss

optimizer = curvlab.optim.Sophia(model.parameters(), lr=1e-3, update_period=5, seed=0)
args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8,
                         max_steps=12, report_to="none", use_cpu=True, save_strategy="no")  # fmt: skip
trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None),
                  callbacks=[CurvatureCallback()])  # fmt: skip
print(trainer.train().training_loss)
