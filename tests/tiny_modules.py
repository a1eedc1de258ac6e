"""Tiny models for the adapter tests, built in-process from a seed: one per base-layer type LoRA
adapts (Linear with biases, Embedding, Conv1d, Conv2d, Conv3d, transformers' Conv1D), plus a tiny GPT-2."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Linear layers with biases and an output head."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 12)
        self.lm_head = nn.Linear(12, 4)

    def forward(self, x):
        return self.lm_head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))

    @staticmethod
    def inputs(n=6):
        return torch.randn(n, 10)


class EmbNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 12)
        self.lin0 = nn.Linear(12, 6)

    def forward(self, x):
        return self.lin0(self.emb(x)).sum(1)

    @staticmethod
    def inputs(n=6):
        return torch.randint(0, 50, (n, 7))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.lin0 = nn.Linear(6 * 9, 5)

    def forward(self, x):
        return self.lin0(torch.relu(self.conv(x)).flatten(1))

    @staticmethod
    def inputs(n=6):
        return torch.randn(n, 4, 9)


class Conv2dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, stride=2)
        self.pw = nn.Conv2d(5, 4, 1)
        self.lin0 = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        return self.lin0(self.pw(torch.relu(self.conv(x))).flatten(1))

    @staticmethod
    def inputs(n=6):
        return torch.randn(n, 3, 7, 7)


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 2)
        self.lin0 = nn.Linear(4 * 2 * 2 * 2, 3)

    def forward(self, x):
        return self.lin0(self.conv(x).flatten(1))

    @staticmethod
    def inputs(n=6):
        return torch.randn(n, 2, 3, 3, 3)


class GPT2Style(nn.Module):
    """transformers' Conv1D, stored (in, out) as in GPT-2."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_fc = Conv1D(16, 10)  # (nf=out, nx=in)
        self.c_proj = Conv1D(6, 16)

    def forward(self, x):
        return self.c_proj(torch.relu(self.c_fc(x)))

    @staticmethod
    def inputs(n=6):
        return torch.randn(n, 10)


MODELS = {"mlp": MLP, "emb": EmbNet, "conv1d": Conv1dNet, "conv2d": Conv2dNet, "conv3d": Conv3dNet,
          "gpt2style": GPT2Style}


def make(kind: str, seed: int = 0, double: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    m = MODELS[kind]()
    # Random biases everywhere (Conv1D starts them at zero), so bias handling shows in outputs.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return m.double() if double else m


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=320, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def tiny_gemma3(seed: int = 0):
    """Gemma 3's text model: its embedding multiplies by a scale held as a tensor (sqrt(hidden))."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, vocab_size=320, sliding_window=16)
    return Gemma3ForCausalLM(config).eval()


def tiny_phi(seed: int = 0):
    """A tiny Phi: its output head has a bias."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(seed)
    config = PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       vocab_size=320, max_position_embeddings=64)
    return PhiForCausalLM(config).eval()
