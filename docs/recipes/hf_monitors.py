"""Monitors into the Hugging Face Trainer's reporting (TensorBoard here): add_callback puts the
MonitorCallback before the reporters, so they report its values."""

import tempfile

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from curvlab.integrations.transformers import MonitorCallback, add_callback
from curvlab.monitors import GradientNoiseScale

config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16)
model = GPT2LMHeadModel(config)
ids = torch.randint(0, 32, (64, 12), generator=torch.Generator().manual_seed(0))
data = [{"input_ids": row, "labels": row} for row in ids]


class Logits(torch.nn.Module):  # monitors take (inputs, targets) and a loss on tensors
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, x):
        return self.lm(input_ids=x).logits[:, :-1].reshape(-1, 32)


def next_token_loss(logits, x):
    return F.cross_entropy(logits, x[:, 1:].reshape(-1))


noise = GradientNoiseScale(Logits(model), next_token_loss, (ids[:32], ids[:32]), batch_size=4,
                           every=2, params=list(model.parameters()))  # fmt: skip
args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, max_steps=6,
                         report_to="tensorboard", logging_steps=2, use_cpu=True, save_strategy="no")  # fmt: skip
trainer = Trainer(model=model, args=args, train_dataset=data)
add_callback(trainer, MonitorCallback([noise]))  # first, before the TensorBoard reporter
trainer.train()
print([k for k in trainer.state.log_history[0] if k.startswith("noise_scale/")])
