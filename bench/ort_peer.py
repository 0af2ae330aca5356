"""The ONNX Runtime peer: what the HF ecosystem's own CPU guides deploy (Optimum's path).

The HF peer's `EsmModel` (bench/hf_peer.py: the benchmark's random fair-esm checkpoint renamed to
transformers' layout) is exported to ONNX with dynamic batch and length axes, and run by ONNX
Runtime's CPU execution provider with every graph optimization on, at the same thread count as
torch, over the same sorted token-budget batches as the other peers. `parity()` checks that the
exported graph computes the same function as stock fair-esm.

The export is of the model with transformers' eager attention, the peer's best graph: the sdpa
model exports as SDPA's decomposition, whose NaN guard for fully masked rows (IsNaN + Where over
every [batch, heads, L, L] score tensor) took half of ONNX Runtime's time (8M shape: 4.0 s against
1.8 s for the eager export on the same batches), and onnxruntime.transformers' BERT fusions do not
match ESM's rotary attention (4.7 s).
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.baseline import max_abs_diff, stock_last_layer_rows
from bench.hf_peer import tokenized_batches


class _LastHidden(torch.nn.Module):
    """EsmModel -> its last hidden state only (the export's one output)."""

    def __init__(self, embedder):
        super().__init__()
        self.embedder = embedder

    def forward(self, input_ids, attention_mask):
        return self.embedder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


EXPORT = "torch.onnx.export (dynamo), EsmModel with eager attention, dynamic batch and length"


def export(hf_peer, path: Path) -> Path:
    """The HF peer's EsmModel, with eager attention, as an ONNX graph at `path`: inputs input_ids
    and attention_mask [batch, length] int64, output last_hidden_state [batch, length, embed]."""
    from transformers import EsmForMaskedLM

    # A copy of the config: _from_config sets the attention implementation on the config it is given,
    # which the HF peer's own sdpa model reads on every call.
    eager = EsmForMaskedLM._from_config(copy.deepcopy(hf_peer.mlm.config), attn_implementation="eager")
    eager.load_state_dict(hf_peer.mlm.state_dict())
    encoded = hf_peer.tokenizer(["MKTAYIAKQR", "MKTAYIAKQRQISFVKSHFSRQ"], padding=True, return_tensors="pt")
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", min=3, max=4096)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            _LastHidden(eager.esm).eval(), (encoded["input_ids"], encoded["attention_mask"]),
            input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
            dynamic_shapes={"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}},
            dynamo=True, optimize=True, verbose=False)
    program.save(str(path), external_data=True)
    return path


class OrtPeer:
    """An ONNX Runtime InferenceSession over the exported EsmModel, fed by the HF peer's tokenizer."""

    def __init__(self, hf_peer, threads: int | None = None):
        import onnxruntime as ort

        self.tokenizer = hf_peer.tokenizer
        implementation = hf_peer.mlm.config._attn_implementation
        self._tmp = tempfile.TemporaryDirectory(prefix="esm-bench-onnx-")
        model = export(hf_peer, Path(self._tmp.name) / "esm.onnx")
        if hf_peer.mlm.config._attn_implementation != implementation:  # the peers must not change each other
            raise RuntimeError(f"exporting changed the HF peer's attention to {hf_peer.mlm.config._attn_implementation}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.version = ort.__version__
        self.export_description = EXPORT

    def close(self) -> None:
        self.session = None
        self._tmp.cleanup()

    def _run(self, encoded) -> np.ndarray:
        feeds = {"input_ids": encoded["input_ids"].numpy(), "attention_mask": encoded["attention_mask"].numpy()}
        return self.session.run(["last_hidden_state"], feeds)[0]

    def mean_pass(self, sequences, toks_per_batch: int) -> float:
        """Seconds for mean-of-last-layer embeddings of every sequence."""
        start = time.perf_counter()
        for batch, encoded in tokenized_batches(self.tokenizer, sequences, toks_per_batch):
            out = self._run(encoded)
            for i, s in enumerate(batch):
                out[i, 1 : len(s) + 1].mean(0)
        return time.perf_counter() - start

    def parity(self, loaded, sequences) -> dict[str, float]:
        """Max |ONNX Runtime - stock fair-esm| of the last layer over `sequences`, one batch."""
        ours = self._run(self.tokenizer(list(sequences), padding=True, return_tensors="pt"))
        rows = [ours[i, 1 : len(s) + 1] for i, s in enumerate(sequences)]
        return {"max_abs_diff_representations": max_abs_diff(rows, stock_last_layer_rows(loaded, sequences))}
