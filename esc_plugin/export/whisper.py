"""Whole-model Whisper deployment: encoder ONNX + decoder-step ONNX, greedy decoding over runtimes.

>>> from esc_plugin.export.whisper import export_whisper, WhisperArtifact
>>> export_whisper(qmodel, "runs/whisper_int8")                               # doctest: +SKIP
>>> tokens = WhisperArtifact("runs/whisper_int8", runtime="ort")(mel)         # doctest: +SKIP
>>> tokens = WhisperArtifact("runs/whisper_int8", runtime="openvino")(mel)    # doctest: +SKIP

:func:`export_whisper` writes into a folder:

* ``encoder.onnx``: ``mel (B, 80, 3000) -> cross_kv``, the encoder and every
  decoder layer's cross-attention keys / values (computed once per clip);
* ``decoder.onnx``: one decoding step with a static KV cache
  (:mod:`esc_plugin.export._whisper_graphs` explains the layout): the decoder
  is **not** re-run over the whole prefix, each step feeds one token;
* ``whisper.json``: the prompt, the stop token, the suppressed token ids and
  the cache geometry, so that decoding needs neither torch nor transformers.

A quantized model (from ``esc.quantize`` / ``esc.load``) is exported with
Q/DQ nodes (:func:`~esc_plugin.export.export_qdq_onnx`, int8 weight
initializers, identical int8 tables stored once: the token embedding and the
output projection are tied); an FP32 model with the plain TorchScript exporter.

:class:`WhisperArtifact` runs the folder with ONNX Runtime
(:class:`~esc_plugin.export.OrtRunner`) or OpenVINO
(``esc_plugin.export.openvino.OpenVinoRunner``), decoding with the same
prompt, suppression and stop rules as
:func:`esc_plugin.tasks.whisper.decoding.greedy_decode`.
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..core.io import atomic_path, write_json
from .compact import zero_point_names
from .errors import ExportError

SPEC_FILE = "whisper.json"
FORMAT = "esc_plugin.whisper_onnx/1"
ENCODER_IO = (["mel"], ["cross_kv"])
DECODER_IO = (["tokens", "position", "self_kv", "cross_kv"], ["logits", "new_self_kv"])
RUNTIMES = ("ort", "openvino")


def _decoding_spec(model):
    """Prompt, stop token, suppressed ids: the rules of ``tasks.whisper.decoding.greedy_decode``."""
    from esc_plugin.tasks.whisper.decoding import EOS, NO_TIMESTAMPS, SOT, _suppress_mask

    cfg = model.config
    suppress, begin = _suppress_mask(model, model.proj_out.out_features)
    return {"format": FORMAT, "prompt": [SOT, NO_TIMESTAMPS], "eos": EOS,
            "suppress": np.flatnonzero(suppress.numpy()).tolist(),
            "begin_suppress": np.flatnonzero(begin.numpy()).tolist(),
            "layers": cfg.decoder_layers, "heads": cfg.decoder_attention_heads,
            "head_dim": cfg.d_model // cfg.decoder_attention_heads,
            "max_positions": cfg.max_target_positions, "vocab": model.proj_out.out_features}


def dedupe_initializers(model):
    """Store identical initializers (same type, shape and bytes) once; returns how many were removed.

    The tied token embedding / output projection of Whisper reach the graph as
    two identical int8 tables (one per Q/DQ site).
    """
    from onnx import numpy_helper

    from onnx import helper

    def digest(array):
        return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()

    zero_points = zero_point_names(model.graph)
    seen, rename, transposed, kept = {}, {}, {}, []
    for t in model.graph.initializer:
        if t.name in zero_points:  # each quantizer keeps its own (see compact.zero_point_names)
            kept.append(t)
            continue
        array = numpy_helper.to_array(t)
        key = (t.data_type, array.shape, digest(array))
        if key in seen:
            rename[t.name] = seen[key]
            continue
        if array.ndim == 2 and array.size > 1 << 16:
            key_t = (t.data_type, array.shape[::-1], digest(array.T))
            if key_t in seen:  # the exporter's pre-transposed copy of a tied MatMul weight
                transposed[t.name] = seen[key_t]
                continue
        seen[key] = t.name
        kept.append(t)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    # A Transpose node instead of the stored copy: runtimes fold it once when they load the model.
    extra = [helper.make_node("Transpose", [source], [name], name=f"{name}_from_tied", perm=[1, 0])
             for name, source in transposed.items()]
    nodes = extra + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return len(rename) + len(transposed)


def _export_graph(module, model, example, path, names, dynamic_axes, quantized, clip_activations=False):
    import onnx
    import torch

    if quantized:
        from .onnx import export_qdq_onnx
        module.__dict__["esc_plan"] = model.__dict__["esc_plan"]  # the graph is a view of qmodel
        export_qdq_onnx(module, example, path, names[0], names[1], dynamic_axes=dynamic_axes,
                        clip_activations=clip_activations)
    else:
        with atomic_path(path) as tmp, torch.no_grad():
            torch.onnx.export(module, example, tmp, input_names=names[0], output_names=names[1],
                              dynamic_axes=dynamic_axes, opset_version=17, do_constant_folding=True,
                              dynamo=False)
    proto = onnx.load(path)
    removed = dedupe_initializers(proto)
    if removed:
        onnx.checker.check_model(proto, full_check=True)
        with atomic_path(path) as tmp:
            onnx.save(proto, tmp)
    return removed


def export_whisper(model, folder, example_mel=None, cache_len=16, clip_activations=False):
    """Write ``encoder.onnx``, ``decoder.onnx`` and ``whisper.json`` for ``model`` into ``folder``.

    Arguments
    ---------
    model : transformers.WhisperForConditionalGeneration
        FP32, or quantized by ``esc.quantize`` (then exported with Q/DQ, W8A8 only).
    folder : str or Path
        Output folder (created); each file is written atomically.
    example_mel : torch.Tensor, optional
        (B, 80, 3000) log-mel used to trace (default zeros); any batch runs later.
    cache_len : int
        Cache length of the traced example; the exported axis is dynamic.
    clip_activations : bool
        Passed to :func:`~esc_plugin.export.export_qdq_onnx`: a Clip before each activation
        QuantizeLinear, so that values beyond ``-amax`` saturate at -127 as in the simulation.

    Returns
    -------
    dict
        The ``whisper.json`` contents plus ``files`` and ``bytes``.
    """
    import torch

    from ._whisper_graphs import WhisperDecoderStep, WhisperEncoderGraph

    quantized = model.__dict__.get("esc_plan") is not None
    if model.training:
        raise ExportError("the Whisper model is in training mode: call model.eval() before exporting.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = _decoding_spec(model)
    mel = torch.zeros(1, model.config.num_mel_bins, 2 * model.config.max_source_positions) \
        if example_mel is None else example_mel[:1].float()
    encoder = WhisperEncoderGraph(model).eval()
    with torch.no_grad():
        cross = encoder(mel)
    shape = (2 * spec["layers"], 1, spec["heads"], cache_len, spec["head_dim"])
    step_inputs = (torch.full((1, 1), spec["prompt"][0], dtype=torch.long), torch.tensor([0]),
                   torch.zeros(shape), cross)
    kv_axes = {1: "batch", 3: "cache_len"}
    spec["deduplicated_initializers"] = {
        "encoder": _export_graph(encoder, model, (mel,), folder / "encoder.onnx", ENCODER_IO,
                                 {"mel": {0: "batch"}, "cross_kv": {1: "batch"}}, quantized, clip_activations),
        "decoder": _export_graph(WhisperDecoderStep(model).eval(), model, step_inputs, folder / "decoder.onnx",
                                 DECODER_IO, {"tokens": {0: "batch"}, "self_kv": kv_axes,
                                              "cross_kv": {1: "batch"}, "logits": {0: "batch"},
                                              "new_self_kv": kv_axes}, quantized, clip_activations)}
    spec.update(quantized=quantized, clip_activations=bool(clip_activations and quantized), files={"encoder": "encoder.onnx", "decoder": "decoder.onnx"})
    spec["bytes"] = {k: os.path.getsize(folder / v) for k, v in spec["files"].items()}
    write_json(folder / SPEC_FILE, spec)
    return spec


def _runner(runtime, path, threads):
    if runtime == "ort":
        from .ort import OrtRunner
        return OrtRunner(path, threads=threads)
    if runtime == "openvino":
        from .openvino import OpenVinoRunner
        return OpenVinoRunner(path, threads=threads)
    raise ExportError(f"runtime={runtime!r} is unknown: choose one of {', '.join(RUNTIMES)}.")


class WhisperArtifact:
    """Greedy transcription with an exported Whisper folder: ``WhisperArtifact(folder)(mel) -> token ids``.

    Arguments
    ---------
    folder : str or Path
        A folder written by :func:`export_whisper`.
    runtime : str
        ``"ort"`` (ONNX Runtime, CPU) or ``"openvino"`` (OpenVINO, CPU).
    threads : int
        Intra-op threads of both sessions.
    """

    def __init__(self, folder, runtime="ort", threads=1):
        self.folder = Path(folder)
        spec_path = self.folder / SPEC_FILE
        if not spec_path.is_file():
            raise ExportError(f"{spec_path} does not exist: export the model first with "
                              "esc_plugin.export.whisper.export_whisper(model, folder).")
        self.spec = json.loads(spec_path.read_text())
        if self.spec.get("format") != FORMAT:
            raise ExportError(f"{spec_path} has format {self.spec.get('format')!r}, expected {FORMAT!r}: "
                              "re-export with this version of esc_plugin.")
        self.runtime = runtime
        self.encoder = _runner(runtime, self.folder / self.spec["files"]["encoder"], threads)
        self.decoder = _runner(runtime, self.folder / self.spec["files"]["decoder"], threads)
        vocab = self.spec["vocab"]
        self.suppress = np.zeros(vocab, bool)
        self.suppress[self.spec["suppress"]] = True
        self.begin_suppress = np.zeros(vocab, bool)
        self.begin_suppress[self.spec["begin_suppress"]] = True

    def encode(self, mel):
        """``cross_kv`` of a (B, 80, 3000) log-mel batch (numpy or torch)."""
        mel = mel.detach().cpu().numpy() if hasattr(mel, "detach") else mel
        return self.encoder(np.ascontiguousarray(mel, dtype=np.float32))[0]

    def __call__(self, mel, max_new_tokens=100):
        """Greedy token ids per clip (no prompt, no EOS), like ``greedy_decode``."""
        s = self.spec
        prompt, eos = s["prompt"], s["eos"]
        if len(prompt) + max_new_tokens > s["max_positions"]:
            raise ExportError(f"max_new_tokens={max_new_tokens}: Whisper has {s['max_positions']} "
                              f"positions, the prompt takes {len(prompt)}; use at most "
                              f"{s['max_positions'] - len(prompt)}.")
        cross = self.encode(mel)
        batch = cross.shape[1]
        cache = np.zeros((2 * s["layers"], batch, s["heads"], len(prompt) + max_new_tokens, s["head_dim"]),
                         np.float32)
        for pos, token in enumerate(prompt):
            logits, cache = self.decoder(np.full((batch, 1), token, np.int64), np.array([pos], np.int64),
                                         cache, cross)
        done, out = np.zeros(batch, bool), []
        for step in range(max_new_tokens):
            masked = np.where(self.begin_suppress if step == 0 else self.suppress, -np.inf, logits)
            nxt = np.where(done, eos, masked.argmax(-1)).astype(np.int64)
            out.append(nxt)
            done |= nxt == eos
            if done.all() or step == max_new_tokens - 1:
                break
            logits, cache = self.decoder(nxt[:, None], np.array([len(prompt) + step], np.int64), cache, cross)
        tokens = np.stack(out, 1).tolist() if out else [[] for _ in range(batch)]
        return [t[: t.index(eos)] if eos in t else t for t in tokens]
